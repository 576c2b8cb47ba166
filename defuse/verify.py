"""Verification: is the repaired classifier better where it was buggy, and no worse elsewhere?

Everything here is measured on data the fine-tune never saw: the test split (clean and
per-class accuracy, with paired 95% bootstrap intervals), fresh region samples drawn with
their own seed (neither the training nor the selection samples of ``correct``), and a
re-discovery search: the same search, seed and budget run against the repaired model,
counting how many new failures still land in each labelled region.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from defuse.distill import Region, Regions
from defuse.models.inference import predict_labels

_VERIFY_SEED_OFFSET = 13  # correct draws its samples with offsets 11 and 12


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


def failures_in_region(region: Region, failures: pd.DataFrame, z: np.ndarray, tau: float) -> int:
    """How many failures of the region's pair lie inside its 90% ellipsoid under N(mean, tau * cov)."""
    same = (failures["source_label"].to_numpy() == region.source_label) & (
        failures["predicted_label"].to_numpy() == region.predicted_label)
    if not same.any():
        return 0
    return int(region.contains(z[same], tau).sum())


@torch.no_grad()
def verify(
    before: nn.Module,
    after: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: tuple[str, ...],
    regions: Regions,
    bug_labels: dict[int, int],
    generator: nn.Module,
    *,
    tau: float,
    samples_per_region: int = 256,
    failures_before: tuple[pd.DataFrame, np.ndarray] | None = None,
    failures_after: tuple[pd.DataFrame, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare ``before`` and ``after`` on the test split, on fresh region samples and by re-discovery."""
    pred_before, pred_after = predict_labels(before, images), predict_labels(after, images)
    ok_before, ok_after = pred_before == labels, pred_after == labels
    result: dict[str, Any] = {"clean_accuracy": bootstrap_accuracy(ok_before, ok_after, seed=seed)}
    result["per_class_accuracy"] = {
        name: {"before": round(float(ok_before[labels == k].float().mean()), 4),
               "after": round(float(ok_after[labels == k].float().mean()), 4),
               "n": int((labels == k).sum())}
        for k, name in enumerate(classes) if bool((labels == k).any())
    }
    rng = np.random.default_rng(seed + _VERIFY_SEED_OFFSET)
    rows = []
    for region in regions.regions:
        entry: dict[str, Any] = {"id": region.id, "pair": region.pair, "label": bug_labels.get(region.id)}
        if region.id in bug_labels:
            z = torch.from_numpy(region.sample(samples_per_region, tau, rng))
            x = generator.eval().decode(z)
            target = bug_labels[region.id]
            entry["accuracy_before"] = round(float((predict_labels(before, x) == target).float().mean()), 4)
            entry["accuracy_after"] = round(float((predict_labels(after, x) == target).float().mean()), 4)
        if failures_before is not None:
            entry["failures_before"] = failures_in_region(region, *failures_before, tau)
        if failures_after is not None:
            entry["failures_after"] = failures_in_region(region, *failures_after, tau)
        rows.append(entry)
    result["regions"] = rows
    labelled = [r for r in rows if r["label"] is not None]
    if failures_before is not None and failures_after is not None:
        result["rediscovery"] = {
            "regions_before": sum(r["failures_before"] > 0 for r in labelled),
            "regions_after": sum(r["failures_after"] > 0 for r in labelled),
            "failures_before": sum(r["failures_before"] for r in labelled),
            "failures_after": sum(r["failures_after"] for r in labelled),
        }
    return result
