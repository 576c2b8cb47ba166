"""check-before: Effective Invariance, ML4ML variance matrices and drift tolerances of the original classifier on
the test split (:func:`defuse.invariance.check.run_check`); checks/before*."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import CHECK_BEFORE, CHECKS_DIR, CLASSIFIER_CKPT
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def check_before_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Effective Invariance and variance matrices of the original classifier on the test split; write checks/."""
    from defuse.data import ImageDataModule
    from defuse.invariance.check import run_check
    from defuse.models.loading import load_classifier

    original = run.path(CLASSIFIER_CKPT)
    return run_check(load_classifier(original).model, load_classifier(original).model,
                     ImageDataModule(config.data, config.seed).split("test"), config.check, run.path(CHECKS_DIR),
                     name="before", seed=config.seed)


STAGE = Stage("check-before", check_before_stage, (CHECK_BEFORE, f"{CHECKS_DIR}/before_*"), ("data", "check"),
              (CLASSIFIER_CKPT,))
