"""Classifiers under test and the LightningModule that trains them.

Every classifier here maps float images in [0, 1], ``(N, C, H, W)``, to logits
``(N, K)``. The input normalisation is a buffer *inside* the model, so search,
transforms and drift all work in image space.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
import torchvision
from torch import nn

from defuse.models.inference import as_input, is_channels_last


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, stored as buffers so it travels with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """A LeNet-style CNN: cheap enough to query ~10k times a second on CPU, ~99% on MNIST-sized data.

    The search spends nearly all its time in this forward pass, so the full-resolution
    layer is a single conv and the wide layers run at 1/2 and 1/4 resolution.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.25),
            nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18_small(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, so 28-64 px inputs keep their detail."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_classifier(
    arch: str, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float], width: int = 32
) -> nn.Sequential:
    """The network with its normalisation in front: a module mapping [0,1] images to logits."""
    if arch == "small_cnn":
        body = SmallCNN(in_channels, num_classes, width)
    elif arch == "resnet18":
        body = resnet18_small(in_channels, num_classes)
    else:
        raise ValueError(f"`arch` must be one of small_cnn, resnet18; got {arch!r} instead.")
    return nn.Sequential(Normalize(mean, std), body)


def is_batch_norm(module: nn.Module) -> bool:
    """A batch-norm layer, ours or inside a TorchScript module (whose submodules only keep the class's name)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or getattr(module, "original_name", None) in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def classifier_head(model: nn.Module) -> nn.Module:
    """The last block of a classifier :func:`build_classifier` builds (SmallCNN's ``head``, ResNet's ``fc``): what a
    head-only fine-tune trains on frozen features."""
    body = model[-1] if isinstance(model, nn.Sequential) else model
    for name in ("head", "fc"):
        if isinstance(getattr(body, name, None), nn.Module):
            return getattr(body, name)
    raise ValueError(f"{type(body).__name__} has no `head` or `fc` block: a head-only fine-tune needs one; set "
                     "`correct.layers` to [all].")


class ClassifierModule(pl.LightningModule):
    """Trains a classifier with cross-entropy, AdamW and a one-cycle schedule.

    Args:
        arch: ``small_cnn`` or ``resnet18``.
        width: channels of the small CNN's first conv.
        in_channels: C.
        num_classes: K.
        mean, std: per-channel input statistics, baked into the model.
        lr, weight_decay: AdamW settings; ``lr`` is the one-cycle peak.
        classes: class names, saved with the weights for reports and the labelling prompt.
        augment_rotation, augment_scale, augment_brightness: random per-image training augmentation (degrees;
            zoom and intensity half-ranges), 0 for none (see :func:`defuse.transforms.random_augment`).
        augment_seed: seeds the augmentation's own generator.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        width: int = 32,
        in_channels: int = 1,
        num_classes: int = 10,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        classes: Sequence[str] | None = None,
        augment_rotation: float = 0.0,
        augment_scale: float = 0.0,
        augment_brightness: float = 0.0,
        augment_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._augment_generator: torch.Generator | None = None
        self.model = build_classifier(arch, in_channels, num_classes, mean, std, width)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Trained channels-last (see :func:`defuse.models.training.train_classifier`), the inputs follow the weights' format.
        return self.model(as_input(x, is_channels_last(self.model)))

    def _common_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric = {"train": self.train_acc, "val": self.val_acc, "test": self.test_acc}[stage]
        metric(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_epoch=True, on_step=False)
        self.log(f"{stage}_acc", metric, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, batch_idx):
        h = self.hparams
        if h.augment_rotation or h.augment_scale or h.augment_brightness:
            from defuse.transforms import random_augment

            if self._augment_generator is None:
                self._augment_generator = torch.Generator().manual_seed(int(h.augment_seed))
            x, y = batch
            batch = (random_augment(x, self._augment_generator, h.augment_rotation, h.augment_scale,
                                    h.augment_brightness), y)
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr, total_steps=max(1, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
