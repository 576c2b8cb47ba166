"""The Lightning Trainer every fit in defuse uses (the classifier, the VAE, the repair's fine-tunes, the image
judge), built from the run's trainer config in one place."""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl

from defuse.config import TrainerConfig


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


__all__ = ["make_trainer"]
