"""Keep the libraries defuse drives from talking over it, while a stage runs.

A digits run printed 116 lines, most of them not defuse's: Lightning's device banner ("GPU available: False ...",
"TPU available ...") and its "Tip: ... litlogger / litmodels" lines for each of the run's Trainers, its "`Trainer.fit`
stopped" notes, and umap-learn's UserWarnings about our own deliberate choices (a precomputed metric, a seed that
forces one job). :func:`quiet_libraries` hides exactly those, for the stage's duration only:

- Lightning's informational messages, all of which go through its ``rank_zero_info`` logger. Lightning sets its
  package logger to INFO whenever it is first imported (defuse imports it lazily, after the CLI's logging setup),
  so the level is raised on the child loggers that carry the chatter, which Lightning never touches, and restored
  after. Its warnings (``rank_zero_warn``) use the warnings module and still show.
- warnings matched by their message, never by category, so a user's own warnings (or an unexpected warning of the
  same library) still show.

``trainer.verbose`` (``defuse run --verbose``) turns this off.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Loggers that carry Lightning's informational chatter (device banners, tips, "fit stopped"). Both package names:
# `pytorch_lightning` (what defuse imports) and the unified `lightning` package, which a user may have instead.
CHATTY_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.accelerators.cuda",  # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"
    "lightning.pytorch.accelerators.cuda",
)

# Warnings about choices defuse makes on purpose; each says why it is harmless here.
EXPECTED_WARNINGS = (
    # Data are in memory tensors; worker processes would only add start-up time on a 2-core machine.
    r".*does not have many workers.*",
    # The fine-tunes of correct and the image judge train without a validation loop on purpose (they are read on
    # held-out images after each epoch, by a callback): Lightning notes the module's unused validation_step.
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    # Lightning's own use of a torch API that torch has deprecated; nothing the user can act on.
    r".*treespec.*",
    # umap-learn: distill passes precomputed distances (faster below 4,096 points) and never inverts the map.
    r".*using precomputed metric; inverse_transform will be unavailable.*",
    # umap-learn: a seeded map (determinism) runs on one thread.
    r".*n_jobs value .* overridden to 1 by setting random_state.*",
)


@contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Hide Lightning's informational messages and the expected library warnings inside the block."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for pattern in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
