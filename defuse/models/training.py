"""Training: the Lightning Trainer every fit in defuse uses (the classifier, the VAE, the repair's fine-tunes, the
image judge), built from the run's trainer config in one place, and the built-in classifier's and VAE's training."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from defuse.config import ClassifierConfig, DataConfig, GeneratorConfig, TrainerConfig
from defuse.data import ImageDataModule
from defuse.models.classifiers import ClassifierModule
from defuse.models.generators import VAEModule
from defuse.seeding import int_seed


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


class TrainingMargins(pl.Callback):
    """Every training image's margin after each epoch: the logit of its given label minus the largest other logit,
    read on the plain image in eval mode (no augmentation, no dropout). Their mean over epochs is the image's *area
    under the margin* (AUM; Pleiss et al. 2020): an image whose label disagrees with what similar images teach is
    learnt late and with a small margin, however consistently the labelling error was made, which is what lets
    distill see a labelling bug that every split carries (docs/benchmarks.md).

    The forward pass draws no random numbers and leaves the module's mode as it found it, so the trained weights are
    the same with or without this callback (a test holds it). ``margins``: one (N,) float32 array per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels.long()
        self.margins: list[np.ndarray] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from defuse.models.inference import predict_logits

        with torch.no_grad():
            logits = predict_logits(module.model, self.images)
        rows = torch.arange(len(self.labels))
        given = logits[rows, self.labels].clone()
        logits[rows, self.labels] = -torch.inf
        self.margins.append((given - logits.max(dim=1).values).numpy().astype(np.float32))

    def table(self) -> np.ndarray:
        """(epochs, N) margins; (0, N) before the first epoch ends."""
        return np.stack(self.margins) if self.margins else np.zeros((0, len(self.labels)), dtype=np.float32)


def train_classifier(
    data: ImageDataModule, config: ClassifierConfig, trainer: TrainerConfig, root: str = ".", seed: int = 0,
    callbacks: list | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a built-in classifier on ``data``; returns the model ([0,1] images -> logits) and its hparams.

    ``seed``: the run's seed (stream ``classifier.augment``, drawn only when ``config`` asks for augmentation).
    ``callbacks``: Lightning callbacks for the fit (e.g. :class:`TrainingMargins`)."""
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
    make_trainer(trainer, config.epochs, root, callbacks=callbacks, num_sanity_val_steps=0).fit(module, datamodule=data)
    return module.model.to(memory_format=torch.contiguous_format).eval(), dict(module.hparams)


def train_vae(
    data: ImageDataModule, config: GeneratorConfig, trainer: TrainerConfig, root: str = ".", seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the configured generator (``config.kind``: the beta-VAE, or the GAN with its inverter) on the images
    of ``data``; returns it and its hparams (with ``kind``). Labels are unused, except by the VAE's perceptual
    term (``config.perceptual``), whose reference network is trained on the train split's labels.

    ``seed``: the run's seed (stream ``generator.reference``, for the reference network)."""
    if config.kind == "gan":
        from defuse.models.gan import GANModule

        gan = GANModule(in_channels=data.channels, image_size=int(data.split("train").images.shape[-1]),
                        latent_dim=config.latent_dim, width=config.width, lr=config.gan_lr,
                        inverter_lr=5 * config.gan_lr)
        # No validation loop: a GAN's losses on held-out images say little; fit-generator measures the result.
        make_trainer(trainer, config.epochs, root, num_sanity_val_steps=0).fit(
            gan, train_dataloaders=data.train_dataloader())
        return gan.gan.eval(), {"kind": "gan", **{k: v for k, v in gan.hparams.items()
                                                  if k in ("in_channels", "image_size", "latent_dim", "width")}}
    features = reference_features(data, config.perceptual_epochs, trainer, root, seed) if config.perceptual else None
    module = VAEModule(
        in_channels=data.channels, image_size=int(data.split("train").images.shape[-1]),
        latent_dim=config.latent_dim, width=config.width, beta=config.beta, lr=config.lr,
        perceptual=config.perceptual, features=features, num_classes=data.num_classes if config.conditional else 0,
    )
    module.vae.to(memory_format=torch.channels_last)  # 43 ms a step against 49 (batch 128, 28 px); as the classifier
    make_trainer(trainer, config.epochs, root, num_sanity_val_steps=0).fit(module, datamodule=data)
    return module.vae.to(memory_format=torch.contiguous_format).eval(), dict(module.hparams)


def reference_features(data: ImageDataModule, epochs: int, trainer: TrainerConfig, root: str, seed: int) -> nn.Module:
    """The convolutional features of a small reference CNN trained for ``epochs`` on the train split: what the
    VAE's perceptual term compares. Its own network, not the classifier under test, so the generator stays
    independent of the model it will search (and works the same for a classifier the user brought)."""
    with torch.random.fork_rng():
        torch.manual_seed(int_seed(seed, "generator.reference"))
        model, _ = train_classifier(data, ClassifierConfig(arch="small_cnn", epochs=epochs), trainer, root, seed)
    normalize, body = model[0], model[1]
    return nn.Sequential(normalize, body.features).eval().requires_grad_(False)


def training_data(config: DataConfig, seed: int) -> ImageDataModule:
    """The run's data, split and checked for enough images of every class, with Lightning seeded: what both fit
    stages start from."""
    pl.seed_everything(seed, workers=True, verbose=False)
    data = ImageDataModule(config, seed)
    data.setup()
    data.require_enough_images()
    return data


__all__ = ["TrainingMargins", "accuracy_report", "make_trainer", "train_classifier", "train_vae", "training_data"]
