"""distill: group the failures into ranked misclassification regions, with real evidence from the audit split,
and draw their pictures (:mod:`.mixture`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    CLASSIFIER_CKPT,
    FAILURES_TABLE,
    FAILURES_Z,
    GENERATOR_CKPT,
    REGIONS_DIR,
    REGIONS_JSON,
    TRAINING_MARGINS,
    UMAP_PNG,
    VALIDITY_MODEL,
)
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def distill_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Group the failures into ranked regions, with real evidence from the audit split; draw their pictures."""
    import numpy as np

    from defuse.data import ImageDataModule
    from defuse.models.inference import latent_means
    from defuse.models.loading import load_classifier, load_generator
    from defuse.records import Failures
    from defuse.stages.distill.mixture import (
        LabelMargins,
        RealEvidence,
        distill,
        save_pictures,
    )
    from defuse.validity import ValidityModel

    failures = Failures.load(run.path(FAILURES_TABLE), run.metrics("identify"))
    judge = ValidityModel.load(run.path(VALIDITY_MODEL))
    loaded = load_classifier(run.path(CLASSIFIER_CKPT))
    generator = load_generator(run.path(GENERATOR_CKPT))
    data = ImageDataModule(config.data, config.seed)
    audit = data.split(config.identify.validity_split)
    real = RealEvidence.observe(loaded.model, generator, audit)
    # The searched split's latents, for each region's reach among real images (the same as real's when both are
    # the audit split, the default).
    sources = (real.z if config.identify.split == config.identify.validity_split else
               latent_means(generator, data.split(config.identify.split).float_images(),
                            labels=data.split(config.identify.split).labels).numpy())
    margins = (LabelMargins.observe(generator, data.split("train"), np.load(run.path(TRAINING_MARGINS)))
               if config.distill.label_margins else None)
    regions = distill(failures, loaded.model, generator, judge, loaded.classes or audit.classes,
                      config.distill, seed=config.seed, real=real, sources=sources, margins=margins)
    regions.save(run.path(REGIONS_JSON))
    save_pictures(run, regions, failures, generator, config.distill, config.seed, real=real,
                  classifier=loaded.model, margins=margins)
    return regions.metrics


STAGE = Stage("distill", distill_stage, (REGIONS_JSON, f"{REGIONS_DIR}/*", UMAP_PNG), ("distill", "data", "identify"),
              (FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL, CLASSIFIER_CKPT, TRAINING_MARGINS, GENERATOR_CKPT))
