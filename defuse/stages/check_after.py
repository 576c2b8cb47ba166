"""check-after: the checks of check-before on the repaired classifier, paired image by image with check-before's
(:func:`defuse.invariance.check.run_check`); checks/after* and checks/drift_tolerance.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    CHECK_AFTER,
    CHECK_BEFORE,
    CHECKS_DIR,
    CLASSIFIER_CKPT,
    DRIFT_TOLERANCE,
    REPAIRED_CKPT,
)
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def check_after_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """The same checks of the repaired classifier, paired image by image with check-before's; write checks/."""
    from defuse.data import ImageDataModule
    from defuse.invariance.check import run_check
    from defuse.models.loading import load_classifier

    return run_check(load_classifier(run.path(REPAIRED_CKPT)).model, load_classifier(run.path(CLASSIFIER_CKPT)).model,
                     ImageDataModule(config.data, config.seed).split("test"), config.check, run.path(CHECKS_DIR),
                     name="after", reference="before", seed=config.seed)


STAGE = Stage("check-after", check_after_stage, (CHECK_AFTER, f"{CHECKS_DIR}/after_*", DRIFT_TOLERANCE),
              ("data", "check"), (REPAIRED_CKPT, CHECK_BEFORE))
