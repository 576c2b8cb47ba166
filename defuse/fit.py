"""The two training stages: fit-classifier and fit-generator.

Each takes the run config and the run directory, trains (or adopts) a model with
Lightning's Trainer, writes its checkpoint atomically and returns its metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from defuse.artifacts import CLASSIFIER_CKPT, GENERATOR_CKPT
from defuse.config import ClassifierConfig, GeneratorConfig, RunConfig, TrainerConfig
from defuse.data import ImageDataModule
from defuse.models.classifiers import ClassifierModule
from defuse.models.generators import ConvVAE, VAEModule
from defuse.models.inference import predict_labels, reconstruct
from defuse.models.loading import (
    load_classifier,
    load_factory,
    load_generator,
    load_torchscript,
    save_classifier,
    save_classifier_pointer,
    save_generator,
)
from defuse.models.training import make_trainer
from defuse.rundir import RunDir, atomic_write_bytes
from defuse.seeding import int_seed

log = logging.getLogger(__name__)


def accuracy_report(pred: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, Any]:
    correct = pred == labels
    per_class = {
        name: round(float(correct[labels == k].float().mean()), 4)
        for k, name in enumerate(classes)
        if bool((labels == k).any())
    }
    return {"accuracy": round(float(correct.float().mean()), 4), "n": int(len(labels)), "per_class": per_class}


def train_classifier(
    data: ImageDataModule, config: ClassifierConfig, trainer: TrainerConfig, root: str = ".", seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a built-in classifier on ``data``; returns the model ([0,1] images -> logits) and its hparams.

    ``seed``: the run's seed (stream ``classifier.augment``, drawn only when ``config`` asks for augmentation)."""
    mean, std = data.channel_stats()
    augment = {}
    if config.augment_rotation or config.augment_scale or config.augment_brightness:
        augment = {"augment_rotation": config.augment_rotation, "augment_scale": config.augment_scale,
                   "augment_brightness": config.augment_brightness,
                   "augment_seed": int_seed(seed, "classifier.augment")}
    module = ClassifierModule(
        arch=config.arch, width=config.width, in_channels=data.channels, num_classes=data.num_classes,
        mean=mean, std=std, lr=config.lr, weight_decay=config.weight_decay, classes=list(data.classes), **augment,
    )
    # Channels-last convolutions train 20-40% faster on CPU (SmallCNN, batch 128: 40-53 ms a step against 66-79);
    # the trained weights go back to the standard format, so what is saved and loaded is as before.
    module.model.to(memory_format=torch.channels_last)
    make_trainer(trainer, config.epochs, root, num_sanity_val_steps=0).fit(module, datamodule=data)
    return module.model.to(memory_format=torch.contiguous_format).eval(), dict(module.hparams)


def train_vae(
    data: ImageDataModule, config: GeneratorConfig, trainer: TrainerConfig, root: str = "."
) -> tuple[ConvVAE, dict[str, Any]]:
    """Train the beta-VAE on the images of ``data`` (labels unused); returns it and its hparams."""
    module = VAEModule(
        in_channels=data.channels, image_size=int(data.split("train").images.shape[-1]),
        latent_dim=config.latent_dim, width=config.width, beta=config.beta, lr=config.lr,
    )
    module.vae.to(memory_format=torch.channels_last)  # 43 ms a step against 49 (batch 128, 28 px); as the classifier
    make_trainer(trainer, config.epochs, root, num_sanity_val_steps=0).fit(module, datamodule=data)
    return module.vae.to(memory_format=torch.contiguous_format).eval(), dict(module.hparams)


def fit_classifier(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the classifier (or adopt the user's) and write ``classifier.ckpt``.

    Returns:
        metrics: test accuracy and per-class accuracy on the test split, train time.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    data = ImageDataModule(config.data, config.seed)
    data.setup()
    data.require_enough_images()
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


def fit_generator(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the VAE (or adopt ``generator.checkpoint``) and write ``generator.ckpt``.

    It reads images only: no label and no classifier, so relabelling the data's classes or retraining the
    classifier leaves the generator current. How well it draws the data *as the classifier sees it*
    (``reconstruction_accuracy``, the ceiling of the search) is measured by identify on the images it searches;
    here, the label-free ``reconstruction_mse`` of the audit split.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    data = ImageDataModule(config.data, config.seed)
    data.setup()
    data.require_enough_images()
    g = config.generator
    start = time.perf_counter()
    if g.checkpoint:
        vae = adopt_generator(g.checkpoint, data)
        atomic_write_bytes(run.path(GENERATOR_CKPT), Path(g.checkpoint).read_bytes())
    else:
        vae, hparams = train_vae(data, g, config.trainer, str(run.root))
        save_generator(run.path(GENERATOR_CKPT), vae, hparams)
    seconds = time.perf_counter() - start
    measured = next(name for name in ("audit", "val", "train") if len(data.split(name)))
    images = data.split(measured).float_images()
    mse = float((reconstruct(vae, images) - images).pow(2).mean())
    metrics: dict[str, Any] = {"reconstruction_mse": round(mse, 5), "reconstruction_split": measured,
                               "train_seconds": round(seconds, 2)}
    if g.checkpoint:
        metrics["adopted"] = str(g.checkpoint)
    return metrics


def adopt_generator(path: str, data: ImageDataModule) -> nn.Module:
    """A generator.ckpt written by defuse (read weights-only), checked against the data it will draw."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"`generator.checkpoint` {path} does not exist. Point it at a generator.ckpt that "
                                f"`defuse fit-generator` wrote, or remove it to train one.")
    vae = load_generator(path)
    size = int(data.split("train").images.shape[-1])
    if (vae.in_channels, vae.image_size) != (data.channels, size):
        raise ValueError(
            f"`generator.checkpoint` {path} draws {vae.in_channels}-channel {vae.image_size}px images, but the data "
            f"has {data.channels} channel(s) at {size}px. Use a generator trained on this data, or remove the key."
        )
    return vae
