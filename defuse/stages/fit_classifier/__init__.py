"""fit-classifier: train the classifier under test (or adopt the user's) and write classifier.ckpt and the training
margins (:mod:`.fit`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import CLASSIFIER_CKPT, TRAINING_MARGINS
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def fit_classifier_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the classifier under test (or adopt the user's); write classifier.ckpt."""
    from defuse.stages.fit_classifier.fit import fit_classifier

    return fit_classifier(config, run)


STAGE = Stage("fit-classifier", fit_classifier_stage, (CLASSIFIER_CKPT, TRAINING_MARGINS), ("data", "classifier", "trainer"))
