"""The two training stages: fit-classifier and fit-generator.

Each takes the run config and the run directory, trains (or adopts) a model with
Lightning's Trainer, writes its checkpoint atomically and returns its metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch

from torch import nn

from defuse.config import ClassifierConfig, GeneratorConfig, RunConfig, TrainerConfig
from defuse.data import ImageDataModule
from defuse.models.classifiers import ClassifierModule
from defuse.models.generators import ConvVAE, VAEModule
from defuse.models.inference import predict_labels, reconstruct
from defuse.models.loading import (
    load_classifier,
    load_factory,
    load_torchscript,
    save_classifier,
    save_classifier_pointer,
    save_generator,
)
from defuse.rundir import RunDir

CLASSIFIER_CKPT = "classifier.ckpt"
GENERATOR_CKPT = "generator.ckpt"
WEAK_GENERATOR_THRESHOLD = 0.9

log = logging.getLogger(__name__)


def make_trainer(
    config: TrainerConfig, max_epochs: int, root: str, callbacks: list | None = None, **kwargs: Any
) -> pl.Trainer:
    """A Trainer with the run's accelerator, determinism and progress-bar settings; no logger files."""
    callbacks = list(callbacks or [])
    kwargs.setdefault("enable_checkpointing", False)
    if config.progress_bar and sys.stderr.isatty():
        from pytorch_lightning.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator=config.accelerator,
        devices=config.devices if config.devices == "auto" else int(config.devices),
        deterministic=config.deterministic,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        logger=False,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )


def accuracy_report(pred: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, Any]:
    correct = pred == labels
    per_class = {
        name: round(float(correct[labels == k].float().mean()), 4)
        for k, name in enumerate(classes)
        if bool((labels == k).any())
    }
    return {"accuracy": round(float(correct.float().mean()), 4), "n": int(len(labels)), "per_class": per_class}


def train_classifier(
    data: ImageDataModule, config: ClassifierConfig, trainer: TrainerConfig, root: str = "."
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a built-in classifier on ``data``; returns the model ([0,1] images -> logits) and its hparams."""
    mean, std = data.channel_stats()
    module = ClassifierModule(
        arch=config.arch, width=config.width, in_channels=data.channels, num_classes=data.num_classes,
        mean=mean, std=std, lr=config.lr, weight_decay=config.weight_decay, classes=list(data.classes),
    )
    make_trainer(trainer, config.epochs, root, num_sanity_val_steps=0).fit(module, datamodule=data)
    return module.model.eval(), dict(module.hparams)


def train_vae(
    data: ImageDataModule, config: GeneratorConfig, trainer: TrainerConfig, root: str = "."
) -> tuple[ConvVAE, dict[str, Any]]:
    """Train the beta-VAE on the images of ``data`` (labels unused); returns it and its hparams."""
    module = VAEModule(
        in_channels=data.channels, image_size=int(data.split("train").images.shape[-1]),
        latent_dim=config.latent_dim, width=config.width, beta=config.beta, lr=config.lr,
    )
    make_trainer(trainer, config.epochs, root, num_sanity_val_steps=0).fit(module, datamodule=data)
    return module.vae.eval(), dict(module.hparams)


def fit_classifier(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the classifier (or adopt the user's) and write ``classifier.ckpt``.

    Returns:
        metrics: test accuracy and per-class accuracy on the test split, train time.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    data = ImageDataModule(config.data, config.seed)
    data.setup()
    c = config.classifier
    start = time.perf_counter()
    if c.user_supplied:
        kind = "torchscript" if c.torchscript else "factory"
        model = load_torchscript(c.torchscript) if c.torchscript else load_factory(c.factory, c.weights)
        source = {"torchscript": c.torchscript} if c.torchscript else {"factory": c.factory, "weights": c.weights or ""}
        save_classifier_pointer(run.path(CLASSIFIER_CKPT), kind, source, data.classes)
    else:
        model, hparams = train_classifier(data, c, config.trainer, str(run.root))
        save_classifier(run.path(CLASSIFIER_CKPT), model, hparams)
    seconds = time.perf_counter() - start
    loaded = load_classifier(run.path(CLASSIFIER_CKPT))  # evaluate exactly what was saved
    test = data.split("test")
    report = accuracy_report(predict_labels(loaded.model, test.float_images()), test.labels, data.classes)
    return {"test_accuracy": report["accuracy"], "test_n": report["n"], "per_class_accuracy": report["per_class"],
            "split_sizes": data.sizes(), "train_seconds": round(seconds, 2)}


def reconstruction_report(classifier: nn.Module, generator: nn.Module, images: torch.Tensor,
                          labels: torch.Tensor) -> dict[str, float]:
    """How much of the data the generator can draw, as the classifier sees it."""
    recon = reconstruct(generator, images)
    recon_ok = predict_labels(classifier, recon) == labels
    orig_ok = predict_labels(classifier, images) == labels
    return {
        "reconstruction_accuracy": round(float(recon_ok.float().mean()), 4),
        "reconstruction_accuracy_of_correct": round(float(recon_ok[orig_ok].float().mean()), 4) if orig_ok.any() else 0.0,
        "reconstruction_mse": round(float((recon - images).pow(2).mean()), 5),
    }


def fit_generator(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the VAE, write ``generator.ckpt`` and measure how much of the data it can draw.

    The key figure, ``reconstruction_accuracy``, is the fraction of audit images (the split the search
    starts from) whose reconstruction decode(mu(x)) the classifier still classifies correctly: a bug
    the generator cannot draw cannot be found, so this bounds every later stage.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    data = ImageDataModule(config.data, config.seed)
    data.setup()
    start = time.perf_counter()
    vae, hparams = train_vae(data, config.generator, config.trainer, str(run.root))
    seconds = time.perf_counter() - start
    save_generator(run.path(GENERATOR_CKPT), vae, hparams)
    classifier = load_classifier(run.path(CLASSIFIER_CKPT)).model
    measured = next(name for name in ("audit", "val", "train") if len(data.split(name)))
    images = data.split(measured)
    metrics = {**reconstruction_report(classifier, vae, images.float_images(), images.labels),
               "reconstruction_split": measured, "train_seconds": round(seconds, 2)}
    if metrics["reconstruction_accuracy"] < WEAK_GENERATOR_THRESHOLD:
        log.warning(
            f"Only %.1f%% of {measured} reconstructions are classified correctly (< %.0f%%): the generator is too weak "
            "to search with reliably. Train longer (generator.epochs) or widen it (generator.width, latent_dim).",
            100 * metrics["reconstruction_accuracy"], 100 * WEAK_GENERATOR_THRESHOLD,
        )
    return metrics
