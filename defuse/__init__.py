"""defuse: find, explain and repair the bugs of image classifiers.

The public API; everything else is private to its module.
"""

from defuse.config import RunConfig, config_from_mapping, load_config
from defuse.correct import Repair, repair
from defuse.data import ImageDataModule, ImageSet, load_source
from defuse.distill import RealEvidence, Regions, distill
from defuse.fit import fit_classifier, fit_generator
from defuse.identify import Discovery, Failures, discover
from defuse.label import LabelBook, auto_labels, label_stage
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
from defuse.validity import ValidityModel
from defuse.verify import Verification, verify

__version__ = "0.1.0"

__all__ = [
    "ClassifierModule", "ConvVAE", "Discovery", "Failures", "Generator", "ImageDataModule", "ImageSet", "LabelBook",
    "RealEvidence", "Regions", "Repair", "RunConfig", "RunDir", "VAEModule", "ValidityModel", "Verification",
    "auto_labels", "config_from_mapping", "discover", "distill", "fit_classifier", "fit_generator", "label_stage",
    "load_classifier", "load_config", "load_generator", "load_source", "predict_labels", "repair", "run_pipeline",
    "run_stage", "verify",
]
