"""verify: the repaired classifier against the original on the test split, on fresh region samples, and by the
same search run around the test images (:mod:`.compare`); verify.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    CLASSIFIER_CKPT,
    GENERATOR_CKPT,
    LABELS_FILE,
    REGIONS_JSON,
    REPAIRED_CKPT,
    VALIDITY_MODEL,
    VERIFY_JSON,
)
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def verify_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Before/after on the test split, on fresh region samples, and by the same search around the test images."""
    from defuse.data import ImageDataModule
    from defuse.models.loading import load_classifier, load_generator
    from defuse.records import LabelBook, Regions
    from defuse.stages.verify.compare import verify
    from defuse.validity import ValidityModel

    before, after = (load_classifier(run.path(name)).model for name in (CLASSIFIER_CKPT, REPAIRED_CKPT))
    checked = verify(before, after, ImageDataModule(config.data, config.seed).split("test"),
                     Regions.load(run.path(REGIONS_JSON)), LabelBook(run.path(LABELS_FILE)).bug_labels(),
                     load_generator(run.path(GENERATOR_CKPT)), ValidityModel.load(run.path(VALIDITY_MODEL)),
                     tau=config.distill.tau, search=config.identify, real_neighbours=config.distill.real_neighbours,
                     seed=config.seed, trainer=config.trainer)
    checked.save(run.path(VERIFY_JSON))
    return checked.metrics


STAGE = Stage("verify", verify_stage, (VERIFY_JSON,), ("data", "identify", "distill", "trainer"),
              (REPAIRED_CKPT, CLASSIFIER_CKPT, GENERATOR_CKPT, LABELS_FILE, REGIONS_JSON, VALIDITY_MODEL))
