"""identify: fit the validity judge on the audit split and search around its images for natural failures
(:mod:`.discover`; the search itself: :mod:`defuse.search`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    CLASSIFIER_CKPT,
    FAILURES_TABLE,
    FAILURES_Z,
    GENERATOR_CKPT,
    VALIDITY_MODEL,
)
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def identify_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Fit the validity judge on the audit split and search around its images; write failures and judge."""
    from defuse.data import ImageDataModule
    from defuse.models.loading import load_classifier, load_generator
    from defuse.stages.identify.discover import discover

    data = ImageDataModule(config.data, config.seed)
    discovery = discover(load_classifier(run.path(CLASSIFIER_CKPT)).model, load_generator(run.path(GENERATOR_CKPT)),
                         data.split(config.identify.split), data.split(config.identify.validity_split),
                         config.identify, seed=config.seed, trainer=config.trainer)
    discovery.save(run.root)
    return discovery.metrics


STAGE = Stage("identify", identify_stage, (FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL), ("data", "identify"),
              (CLASSIFIER_CKPT, GENERATOR_CKPT))
