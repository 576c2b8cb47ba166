"""defuse: find, explain and repair the bugs of image classifiers.

The public API; everything else is private to its module.
"""

from defuse.config import RunConfig, load_config
from defuse.data import ImageDataModule, ImageSet, load_source
from defuse.fit import fit_classifier, fit_generator
from defuse.models import (
    ClassifierModule,
    ConvVAE,
    Generator,
    VAEModule,
    load_classifier,
    load_generator,
    predict_labels,
)
from defuse.pipeline import run_pipeline, run_stage
from defuse.rundir import RunDir

__version__ = "0.1.0"

__all__ = [
    "ClassifierModule", "ConvVAE", "Generator", "ImageDataModule", "ImageSet", "RunConfig", "RunDir",
    "VAEModule", "fit_classifier", "fit_generator", "load_classifier", "load_config", "load_generator",
    "load_source", "predict_labels", "run_pipeline", "run_stage",
]
