"""fit-generator: train the beta-VAE on the images with Lightning's Trainer (or adopt ``generator.checkpoint``)
and write generator.ckpt atomically."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from defuse.artifacts import GENERATOR_CKPT
from defuse.config import RunConfig
from defuse.data import ImageDataModule
from defuse.models.inference import reconstruct
from defuse.models.loading import load_generator, save_generator
from defuse.models.training import train_vae, training_data
from defuse.rundir import RunDir, atomic_write_bytes


def fit_generator(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the VAE (or adopt ``generator.checkpoint``) and write ``generator.ckpt``.

    It reads images only (no classifier, and no label unless ``generator.perceptual`` trains its reference
    network on the train split), so retraining the classifier leaves the generator current. How well it draws the data *as the classifier sees it*
    (``reconstruction_accuracy``, the ceiling of the search) is measured by identify on the images it searches;
    here, the label-free ``reconstruction_mse`` of the audit split.
    """
    data = training_data(config.data, config.seed)
    g = config.generator
    start = time.perf_counter()
    if g.checkpoint:
        vae = adopt_generator(g.checkpoint, data)
        atomic_write_bytes(run.path(GENERATOR_CKPT), Path(g.checkpoint).read_bytes())
    else:
        vae, hparams = train_vae(data, g, config.trainer, str(run.root), config.seed)
        save_generator(run.path(GENERATOR_CKPT), vae, hparams)
    seconds = time.perf_counter() - start
    measured = next(name for name in ("audit", "val", "train") if len(data.split(name)))
    images = data.split(measured).float_images()
    mse = float((reconstruct(vae, images, labels=data.split(measured).labels) - images).pow(2).mean())
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
    classes = int(getattr(vae, "num_classes", 0))
    if classes and classes != data.num_classes:
        raise ValueError(
            f"`generator.checkpoint` {path} is class-conditional on {classes} classes, but the data has "
            f"{data.num_classes}. Use a generator trained on this data, or remove the key."
        )
    return vae
