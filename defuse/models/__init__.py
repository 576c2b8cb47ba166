"""Classifiers, generators and their weights-only checkpoint loading."""

from defuse.models.classifiers import (
    ClassifierModule,
    Normalize,
    SmallCNN,
    build_classifier,
    resnet18_small,
)
from defuse.models.generators import ConvVAE, Generator, VAEModule, elbo_terms
from defuse.models.inference import (
    inference_copy,
    predict_labels,
    predict_logits,
    reconstruct,
)
from defuse.models.loading import (
    LoadedClassifier,
    load_classifier,
    load_generator,
    safe_load,
)

__all__ = [
    "ClassifierModule", "ConvVAE", "Generator", "LoadedClassifier", "Normalize", "SmallCNN", "VAEModule",
    "build_classifier", "elbo_terms", "inference_copy", "load_classifier", "load_generator", "predict_labels", "predict_logits",
    "reconstruct", "resnet18_small", "safe_load",
]
