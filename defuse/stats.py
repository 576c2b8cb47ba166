"""Bootstrap intervals, in one place: every figure defuse reports with an interval comes from here.

Three estimators, each as the stage that uses it has always drawn it (their random streams are part of every
recorded figure, so they are kept as they are rather than merged into one):

* :func:`bootstrap_means`: a mean over images and its 95% percentile interval (the EI checks, their paired change);
* :func:`paired_change`: an accuracy change on the same images, drawn as multinomial counts of images gained, lost
  and unchanged (exact, and as fast for a million images as for ten: the repair's guard);
* :func:`bootstrap_accuracy`: accuracy before and after on the test split with paired percentile intervals (verify).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean over images with its 95% percentile bootstrap interval."""

    mean: float
    low: float
    high: float


def bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int = BOOTSTRAP_RESAMPLES) -> Estimate:
    """The mean of ``values`` (N,) and its 95% percentile bootstrap interval (images resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Estimate(float(values.mean()), float(low), float(high))


def paired_change(before: np.ndarray, after: np.ndarray, rng: np.random.Generator,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """Accuracy change after - before on the same images (booleans, correct or not), with the paired bootstrap 95%
    interval. Resampling images with replacement only moves the counts of images gained (+1), lost (-1) and
    unchanged, so the resamples are drawn as multinomial counts: exact, and independent of the number of images."""
    n = len(before)
    if n == 0:
        return 0.0, 0.0, 0.0
    diff = after.astype(np.int64) - before.astype(np.int64)
    probs = np.array([(diff == 1).sum(), (diff == -1).sum(), (diff == 0).sum()], dtype=np.float64) / n
    counts = rng.multinomial(n, probs, size=resamples)
    changes = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.quantile(changes, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high)


def bootstrap_accuracy(
    correct_before: torch.Tensor, correct_after: torch.Tensor, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy before/after with paired 95% percentile-bootstrap intervals (the same resamples for both).

    Args:
        correct_before, correct_after: (N,) booleans, one per test image.
    """
    n = len(correct_before)
    index = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    out: dict[str, Any] = {}
    for name, correct in (("before", correct_before), ("after", correct_after)):
        means = correct.float()[index].mean(dim=1)
        out[name] = round(float(correct.float().mean()), 4)
        out[f"{name}_ci95"] = [round(float(means.quantile(0.025)), 4), round(float(means.quantile(0.975)), 4)]
    diff = correct_after.float()[index].mean(dim=1) - correct_before.float()[index].mean(dim=1)
    out["change"] = round(out["after"] - out["before"], 4)
    out["change_ci95"] = [round(float(diff.quantile(0.025)), 4), round(float(diff.quantile(0.975)), 4)]
    return out


__all__ = ["BOOTSTRAP_RESAMPLES", "Estimate", "bootstrap_accuracy", "bootstrap_means", "paired_change"]
