"""``defuse check --model before|after|PATH``: the invariance checks of any classifier file, paired with
check-before's when it ran (:func:`defuse.invariance.check.run_check`). Not a stage of the run: check-before and
check-after are."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from defuse.artifacts import CHECKS_DIR, CLASSIFIER_CKPT

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def check_file(config: RunConfig, run: RunDir, path: str) -> dict[str, Any]:
    """The checks of any classifier file (``defuse check --model PATH``), paired with check-before's when it ran."""
    from defuse.data import ImageDataModule
    from defuse.invariance.check import run_check
    from defuse.models.loading import load_classifier

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is not a file: `--model` takes before, after or a classifier checkpoint.")
    return run_check(load_classifier(Path(path).resolve()).model, load_classifier(run.path(CLASSIFIER_CKPT)).model,
                     ImageDataModule(config.data, config.seed).split("test"), config.check, run.path(CHECKS_DIR),
                     name=Path(path).stem, reference="before", seed=config.seed)
