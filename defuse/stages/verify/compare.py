"""Verification: is the repaired classifier better where it was buggy, and no worse elsewhere?

Everything here is measured on data no stage fitted, searched or selected on: the test split
(clean and per-class accuracy, with paired 95% bootstrap intervals), fresh region samples drawn
from their own stream (neither the training nor the selection samples of ``correct``), and a
re-discovery search on the test split: the same search, seed and budget run around the test
images against the original and against the repaired model, counting the failures of each
confusion pair and how many land in each labelled region.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from defuse.artifacts import VERIFY_JSON  # noqa: F401  (re-exported)
from defuse.config import IdentifyConfig, TrainerConfig
from defuse.data import ImageSet
from defuse.models.inference import latent_means, predict_labels, same_weights
from defuse.records import Region, Regions, Verification
from defuse.search import identify
from defuse.seeding import int_seed, numpy_rng
from defuse.stats import bootstrap_accuracy
from defuse.validity import ValidityModel, nearest_of_class


def failures_in_region(region: Region, failures: pd.DataFrame, z: np.ndarray, tau: float) -> int:
    """How many failures of the region's pair lie inside its 90% ellipsoid under N(mean, tau * cov)."""
    same = (failures["source_label"].to_numpy() == region.source_label) & (
        failures["predicted_label"].to_numpy() == region.predicted_label)
    if not same.any():
        return 0
    return int(region.contains(z[same], tau).sum())


def verify(
    before: nn.Module,
    after: nn.Module,
    test: ImageSet,
    regions: Regions,
    bug_labels: dict[int, int],
    generator: nn.Module,
    judge: ValidityModel,
    *,
    tau: float,
    search: IdentifyConfig | None = None,
    samples_per_region: int = 256,
    real_neighbours: int = 20,
    seed: int = 0,
    trainer: TrainerConfig | None = None,
) -> Verification:
    """The verify stage: compare ``before`` and ``after`` on the test split, on fresh region samples, and (with
    ``search``, the identify config) by running the same search around the test images against both models.

    Args:
        before, after: the original and the repaired classifier.
        test: the test split, the only data read here; nothing upstream read it.
        regions, bug_labels: the regions and the classes a person gave them (region id -> class).
        generator, judge: the run's generator and validity judge (the search's screening and validity).
        tau: region samples come from N(mean, tau * cov).
        search: the identify config for re-discovery; None skips it, as does ``after`` with ``before``'s weights.
        samples_per_region: fresh samples per labelled region.
        real_neighbours: per region, how many real test images of its source class nearest its centre are graded
            (distill's real-evidence rule, ``distill.real_neighbours``, applied to the test split).
        seed: the run's seed (streams ``verify.bootstrap``, ``verify.region_samples``; the searches use identify's).
        trainer: accelerator settings for the searches.
    """
    # The original kept (no region labelled a bug, or the guard refused every candidate): there is nothing to
    # compare, and a search of the same weights around the test images would only repeat itself on both sides of
    # the report (the MNIST run's verify: 26.0 s -> 1.2 s), so it is not run.
    kept = same_weights(before, after)
    failures_before = failures_after = None
    if search is not None and not kept:
        images = test.float_images()
        for_before, for_after = (identify(model, generator, images, test.labels, judge, search, seed=seed,
                                          trainer=trainer, warn_weak_generator=False) for model in (before, after))
        failures_before, failures_after = (for_before.table, for_before.z), (for_after.table, for_after.z)
    result = compare(before, after, test.float_images(), test.labels, test.classes, regions, bug_labels, generator,
                     tau=tau, samples_per_region=samples_per_region, failures_before=failures_before,
                     failures_after=failures_after, seed=seed, judge=judge, real_neighbours=real_neighbours)
    if failures_before is not None:
        result["failures_by_pair"] = _failures_by_pair(for_before.table, for_after.table, test.classes)
        result["search_queries"] = {"before": for_before.stats["queries"], "after": for_after.stats["queries"]}
    elif search is not None:
        result["search"] = "not run: the original weights were kept, so before and after are the same model"
    return Verification(result)


def _failures_by_pair(before: pd.DataFrame, after: pd.DataFrame, classes: tuple[str, ...]) -> dict[str, Any]:
    """Per confusion pair, for both searches of the test split: failures, valid ones, and the sources they come from."""
    out: dict[str, Any] = {}
    for name, table in (("before", before), ("after", after)):
        for (source, predicted), rows in table.groupby(["source_label", "predicted_label"]):
            entry = out.setdefault(f"{classes[int(source)]} -> {classes[int(predicted)]}", {
                f"{what}_{when}": 0 for what in ("failures", "valid", "sources") for when in ("before", "after")})
            entry[f"failures_{name}"] = int(len(rows))
            entry[f"valid_{name}"] = int(rows["valid"].sum())
            entry[f"sources_{name}"] = int(rows["source_index"].nunique())
    return dict(sorted(out.items(), key=lambda item: -item[1]["failures_before"]))


@torch.no_grad()
def compare(
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
    judge: ValidityModel | None = None,
    real_neighbours: int = 20,
) -> dict[str, Any]:
    """The measurements of :func:`verify` on given images and given failures (tables and latents).

    With ``judge``, each region also gets ``real_accuracy_before/after`` on the ``real_neighbours`` real images of
    its source class nearest its centre (``real_n`` of them, ``real_distance`` their median standardised distance):
    the region's bug as real test images show it, since regions are too tight to contain real images themselves."""
    pred_before, pred_after = predict_labels(before, images), predict_labels(after, images)
    ok_before, ok_after = pred_before == labels, pred_after == labels
    clean = bootstrap_accuracy(ok_before, ok_after, seed=int_seed(seed, "verify.bootstrap"))
    result: dict[str, Any] = {"clean_accuracy": {**clean, "n": int(len(labels))}}
    result["per_class_accuracy"] = {
        name: {"before": round(float(ok_before[labels == k].float().mean()), 4),
               "after": round(float(ok_after[labels == k].float().mean()), 4),
               "n": int((labels == k).sum())}
        for k, name in enumerate(classes) if bool((labels == k).any())
    }
    rng = numpy_rng(seed, "verify.region_samples")
    z_real = latent_means(generator, images, labels=labels).numpy() if judge is not None and regions.regions else None
    labels_np = labels.numpy()
    rows = []
    for region in regions.regions:
        entry: dict[str, Any] = {"id": region.id, "pair": region.pair, "label": bug_labels.get(region.id)}
        if z_real is not None:
            near = nearest_of_class(z_real, labels_np, region.source_label, np.asarray(region.mean), judge,
                                    real_neighbours)
            if len(near):
                entry["real_n"] = int(len(near))
                entry["real_accuracy_before"] = round(float(ok_before[near].float().mean()), 4)
                entry["real_accuracy_after"] = round(float(ok_after[near].float().mean()), 4)
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
