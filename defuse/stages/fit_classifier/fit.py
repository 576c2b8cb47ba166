"""fit-classifier: train the classifier under test with Lightning's Trainer (or adopt the user's) and write
classifier.ckpt atomically, with every training image's margin per epoch (training_margins.npy)."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Any

import numpy as np

from defuse.artifacts import CLASSIFIER_CKPT, TRAINING_MARGINS
from defuse.config import RunConfig
from defuse.models.inference import predict_labels
from defuse.models.loading import (
    load_classifier,
    load_factory,
    load_torchscript,
    save_classifier,
    save_classifier_pointer,
)
from defuse.models.training import (
    TrainingMargins,
    accuracy_report,
    train_classifier,
    training_data,
)
from defuse.rundir import RunDir, atomic_write_bytes

log = logging.getLogger(__name__)


def fit_classifier(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the classifier (or adopt the user's) and write ``classifier.ckpt`` and ``training_margins.npy``
    (:class:`~defuse.models.training.TrainingMargins`; for a classifier the user brought, those of a small CNN
    trained only to record them, ``classifier.margins_probe``, or none).

    Returns:
        metrics: test accuracy and per-class accuracy on the test split, train time.
    """
    data = training_data(config.data, config.seed)
    c = config.classifier
    start = time.perf_counter()
    train = data.split("train")
    margins = TrainingMargins(train.float_images(), train.labels)
    if c.user_supplied:
        kind = "torchscript" if c.torchscript else "factory"
        model = load_torchscript(c.torchscript) if c.torchscript else load_factory(c.factory, c.weights)
        source = {"torchscript": c.torchscript} if c.torchscript else {"factory": c.factory, "weights": c.weights or ""}
        save_classifier_pointer(run.path(CLASSIFIER_CKPT), kind, source, data.classes)
        if c.margins_probe:
            _train_margins_probe(data, config, run, margins)
    else:
        model, hparams = train_classifier(data, c, config.trainer, str(run.root), seed=config.seed,
                                          callbacks=[margins])
        save_classifier(run.path(CLASSIFIER_CKPT), model, hparams)
    buffer = io.BytesIO()
    np.save(buffer, margins.table(), allow_pickle=False)
    atomic_write_bytes(run.path(TRAINING_MARGINS), buffer.getvalue())
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


def _train_margins_probe(data, config: RunConfig, run: RunDir, margins: TrainingMargins) -> None:
    """A classifier the user brought has no training defuse can watch, yet the training margins describe the labels,
    not the model: train the built-in small CNN on the train split (its own seed stream, so nothing else moves) and
    record them; the model is then dropped."""
    import torch

    from defuse.seeding import int_seed

    probe = dataclasses.replace(config.classifier, arch="small_cnn", torchscript=None, factory=None, weights=None)
    with torch.random.fork_rng():
        torch.manual_seed(int_seed(config.seed, "classifier.margins_probe"))
        train_classifier(data, probe, config.trainer, str(run.root), seed=config.seed, callbacks=[margins])
