"""fit-classifier: train the classifier under test with Lightning's Trainer (or adopt the user's) and write
classifier.ckpt atomically."""

from __future__ import annotations

import logging
import time
from typing import Any

from defuse.artifacts import CLASSIFIER_CKPT
from defuse.config import RunConfig
from defuse.models.inference import predict_labels
from defuse.models.loading import (
    load_classifier,
    load_factory,
    load_torchscript,
    save_classifier,
    save_classifier_pointer,
)
from defuse.models.training import accuracy_report, train_classifier, training_data
from defuse.rundir import RunDir

log = logging.getLogger(__name__)


def fit_classifier(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the classifier (or adopt the user's) and write ``classifier.ckpt``.

    Returns:
        metrics: test accuracy and per-class accuracy on the test split, train time.
    """
    data = training_data(config.data, config.seed)
    c = config.classifier
    start = time.perf_counter()
    if c.user_supplied:
        kind = "torchscript" if c.torchscript else "factory"
        model = load_torchscript(c.torchscript) if c.torchscript else load_factory(c.factory, c.weights)
        source = {"torchscript": c.torchscript} if c.torchscript else {"factory": c.factory, "weights": c.weights or ""}
        save_classifier_pointer(run.path(CLASSIFIER_CKPT), kind, source, data.classes)
    else:
        model, hparams = train_classifier(data, c, config.trainer, str(run.root), seed=config.seed)
        save_classifier(run.path(CLASSIFIER_CKPT), model, hparams)
    seconds = time.perf_counter() - start
    loaded = load_classifier(run.path(CLASSIFIER_CKPT))  # evaluate exactly what was saved
    test = data.split("test")
    report = accuracy_report(predict_labels(loaded.model, test.float_images()), test.labels, data.classes)
    if c.factory and not c.weights:
        log.warning("classifier.factory %r was given no classifier.weights: its module is used as the factory "
                    "returns it (test accuracy %.4f). If its trained weights are in a file, set classifier.weights "
                    "(a .safetensors or state-dict file).", c.factory, report["accuracy"])
    return {"test_accuracy": report["accuracy"], "test_n": report["n"], "per_class_accuracy": report["per_class"],
            "split_sizes": data.sizes(), "train_seconds": round(seconds, 2)}
