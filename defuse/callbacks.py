"""Lightning callbacks for users' own training scripts.

:class:`InvarianceMonitor` logs Effective Invariance (Deng et al. 2022) per transform at the end of every
validation epoch, on the validation images the Trainer already feeds the model: add it to a Trainer to watch a
model's invariances move while it trains (``scripts/example_invariance_monitor.py`` shows it).

:class:`DefuseCallback` runs discovery (:func:`defuse.scan`) on the trained model at the end of ``trainer.fit`` and
logs the regions it found and where the report is to the Trainer's logger (``examples/train_with_defuse.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from defuse.invariance.ei import per_image_scores
from defuse.transforms import EI_TRANSFORMS


class InvarianceMonitor(pl.Callback):
    """Logs ``ei/<transform>`` (mean EI over up to ``max_images`` validation images) at each validation epoch end.

    The LightningModule's forward must map [0, 1] images (N, C, H, W) to logits, and its validation batches must be
    ``(images, labels)`` pairs or images alone. Transforms that do not apply to the images (grayscale on one
    channel) are not logged. The callback keeps the first ``max_images`` validation images of each epoch in
    memory and writes no file: where the numbers go is the Trainer's logger.

    Args:
        transforms: names among :data:`~defuse.transforms.EI_TRANSFORMS`.
        max_images: validation images scored per epoch (each costs one forward pass per view).
        prefix: the logged names' prefix.
    """

    def __init__(self, transforms: Sequence[str] = ("rotation", "rotation15", "brightness", "scale", "translation"),
                 max_images: int = 512, prefix: str = "ei/") -> None:
        self.transforms = tuple(transforms)
        self.max_images = max_images
        self.prefix = prefix
        self._images: list[torch.Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        unknown = [t for t in self.transforms if t not in EI_TRANSFORMS]
        if unknown:
            raise ValueError(f"`transforms` must be among {', '.join(EI_TRANSFORMS)}, got {unknown[0]!r} instead.")
        if self.max_images < 1:
            raise ValueError(f"`max_images` must be >= 1, got {self.max_images} instead.")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        kept = sum(len(x) for x in self._images)
        if kept >= self.max_images:
            return
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images.append(images[: self.max_images - kept].detach())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._images or trainer.sanity_checking:
            return
        images = torch.cat(self._images)
        for transform in self.transforms:
            scores = per_image_scores(pl_module, images, transform)
            if scores is not None:
                pl_module.log(f"{self.prefix}{transform}", float(scores.ei.mean()), on_epoch=True, prog_bar=False)
        self._images = []


class DefuseCallback(pl.Callback):
    """At the end of ``trainer.fit``, scan the trained model for bugs (:func:`defuse.scan`) on the Trainer's data
    module, and log what was found: ``defuse/regions`` and ``defuse/top_bug_score`` as metrics, the report's path as a
    hyperparameter (``defuse/report``). The result is kept in :attr:`result`.

    Nothing is repaired during training: by default (``labels="later"``) the regions await a person's labels, given
    afterwards with ``defuse label --run-dir RUN_DIR`` and applied by calling :func:`defuse.scan` again (or
    ``defuse run --run-dir RUN_DIR``).

    Args:
        run_dir: the scan's run directory.
        labels: as :func:`defuse.scan` takes them.
        config, overrides: as :func:`defuse.scan` takes them (e.g. ``["generator.epochs=30"]``).
    """

    def __init__(self, run_dir: str | Path = "runs/scan", labels: str | Path = "later", config: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.labels = labels
        self.config = config
        self.overrides = tuple(overrides)
        self.result: Any = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        from defuse.scanner import scan

        data = getattr(trainer, "datamodule", None)
        if data is None:
            raise ValueError("DefuseCallback reads the Trainer's LightningDataModule (trainer.fit(model, datamodule=...))"
                             "; with plain dataloaders, call defuse.scan(model, {'train': ..., 'val': ..., 'test': ...})"
                             " after fit instead.")
        was_training = pl_module.training
        self.result = scan(pl_module, data, run_dir=self.run_dir, labels=self.labels, config=self.config,
                           overrides=self.overrides)
        pl_module.train(was_training)
        top = max((float(region.get("bug_score") or 0.0) for region in self.result.regions), default=0.0)
        for logger in trainer.loggers:
            logger.log_metrics({"defuse/regions": float(len(self.result.regions)), "defuse/top_bug_score": top},
                               step=trainer.global_step)
            logger.log_hyperparams({"defuse/report": str(self.result.report)})
