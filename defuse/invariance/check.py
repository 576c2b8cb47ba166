"""The check stage: Effective Invariance and ML4ML variance matrices of one classifier on the test split.

``check-before`` checks the original classifier, ``check-after`` the repaired one, on the same test images (a
seeded subset of ``check.max_images`` when the split is larger), and compares the two image by image: a repair
that fixes a region but costs an invariance shows here. Both only read the test split, like verify: nothing here
shapes the model.

Artifacts, under ``checks/`` (``<name>`` is ``before``, ``after`` or a checked file's stem):

* ``<name>.json``: per EI transform its figures with 95% bootstrap intervals, overall and per class
  (``ei.<transform>``); per family the variance matrix's features and image counts (``variance.<family>``);
  for ``after``, the paired EI change against ``before`` and the change of each matrix's mean.
* ``<name>_ei.npz``: the per-image EI of every transform and the images' test positions, for the pairing.
* ``<name>_<family>_correct.npy`` / ``_incorrect.npy`` (and ``_class<k>.npy`` with ``check.per_class``): the
  matrices; ``<name>_<family>.png`` their heat maps.

Each matrix gets the assessor's verdict (invariant or variant, with the probability of invariant), from a forest
fitted on the shipped zoo table (:mod:`defuse.invariance.assessor`); without a zoo table ``verdict`` is ``null``
and the JSON says why.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defuse.artifacts import CHECKS_DIR  # noqa: F401  (re-exported)
from defuse.config import CheckConfig
from defuse.data import ImageSet
from defuse.invariance.assessor import Verdict, verdict
from defuse.invariance.ei import (
    EIChange,
    PerImage,
    TransformEI,
    compare_ei,
    per_image_scores,
    summarize,
)
from defuse.invariance.variance import FamilyVariance, family_variance
from defuse.models.inference import inference_copy, same_weights
from defuse.rundir import atomic_write_bytes, atomic_write_json
from defuse.seeding import numpy_rng

NO_ASSESSOR = "no assessor yet: scripts/build_zoo.py builds the model zoo it is trained on"
HEATMAP_MAX = 0.3  # one colour scale for every heat map, so before and after compare by eye


@dataclass(frozen=True)
class InvarianceCheck:
    """One classifier's invariance figures on the checked test images (see the module docstring).

    Attributes:
        name: ``before``, ``after`` or the checked file's stem.
        positions: the checked images' positions in the test split (N,).
        ei: transform -> its figures (:class:`~defuse.invariance.ei.TransformEI`).
        per_image: transform -> per-image figures (absent where the transform does not apply).
        variance: family -> its matrices and features.
        ei_change: transform -> the paired change against the reference check (``after`` only).
        seconds: wall time of the check.
    """

    name: str
    positions: np.ndarray
    ei: dict[str, TransformEI]
    per_image: dict[str, PerImage]
    variance: dict[str, FamilyVariance]
    ei_change: dict[str, EIChange | None] = field(default_factory=dict)
    variance_change: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    verdicts: dict[str, Verdict | None] = field(default_factory=dict)
    drift: dict[str, Any] | None = None  # defuse.drift.forensics.drift_forensics's result (check.drift)
    drift_strip: bytes | None = field(default=None, repr=False)  # PNG: sample images under each drift preset

    @property
    def metrics(self) -> dict[str, Any]:
        """Key figures for the manifest and the CLI: mean EI per transform, matrix mean per family, regressions."""
        out: dict[str, Any] = {"images": int(len(self.positions))}
        out.update({f"ei.{t}": round(e.ei.mean, 4) for t, e in self.ei.items() if e.applicable})
        out.update({f"variance.{f}.mean": round(v.features["mean"], 4) for f, v in self.variance.items()})
        out.update({f"variance.{f}.p_invariant": answer.probability for f, answer in self.verdicts.items()
                    if answer is not None})
        if self.ei_change:
            out["ei_regressions"] = sorted(t for t, c in self.ei_change.items() if c is not None and c.regression)
        return out

    def to_json(self) -> dict[str, Any]:
        variance = {}
        for family, v in self.variance.items():
            variance[family] = {
                "grid": [round(float(x), 4) for x in v.grid], "counts": v.counts, "mean": v.features["mean"],
                "features": v.features, **_verdict_json(self.verdicts.get(family)),
                "matrices": {"correct": f"{self.name}_{family}_correct.npy",
                             "incorrect": f"{self.name}_{family}_incorrect.npy",
                             **{f"class{k}": f"{self.name}_{family}_class{k}.npy" for k in v.per_class}},
                "heatmap": f"{self.name}_{family}.png",
            }
        out = {"model": self.name, "images": int(len(self.positions)), "seconds": round(self.seconds, 2),
               "ei": {t: e.to_dict() for t, e in self.ei.items()}, "variance": variance}
        if self.ei_change:
            out["ei_change"] = {t: asdict(c) if c is not None else None for t, c in self.ei_change.items()}
            out["variance_mean_change"] = self.variance_change
        if self.drift is not None:
            out["drift"] = {**self.drift, "tolerance_file": f"{self.name}_drift_tolerance.json",
                            "presets_strip": f"{self.name}_drift_presets.png" if self.drift_strip else None}
        return out

    def save(self, directory: str | Path) -> None:
        """Write the JSON, the per-image EI, the matrices and their heat maps under ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"positions": self.positions, **{f"ei_{t}": s.ei for t, s in self.per_image.items()}}
        atomic_write_bytes(directory / f"{self.name}_ei.npz", _npz_bytes(arrays))
        for family, v in self.variance.items():
            matrices = {"correct": v.correct, "incorrect": v.incorrect,
                        **{f"class{k}": m for k, m in v.per_class.items()}}
            for kind, matrix in matrices.items():
                buffer = io.BytesIO()
                np.save(buffer, matrix)
                atomic_write_bytes(directory / f"{self.name}_{family}_{kind}.npy", buffer.getvalue())
            atomic_write_bytes(directory / f"{self.name}_{family}.png", _heatmap_png(v, self.name))
        if self.drift is not None:
            atomic_write_json(directory / f"{self.name}_drift_tolerance.json", {"model": self.name, **self.drift})
        if self.drift_strip:
            atomic_write_bytes(directory / f"{self.name}_drift_presets.png", self.drift_strip)
        atomic_write_json(directory / f"{self.name}.json", self.to_json())


def load_per_image(directory: str | Path, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """(positions, transform -> per-image EI) of an earlier check, or ``None`` if there is none."""
    path = Path(directory) / f"{name}_ei.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as stored:
        return stored["positions"], {k.removeprefix("ei_"): stored[k] for k in stored.files if k.startswith("ei_")}


def checked_positions(test: ImageSet, max_images: int, seed: int) -> np.ndarray:
    """The test positions a check reads: all of them, or a seeded subset of ``max_images`` in split order (the same
    for every model of a run, so before and after pair image by image)."""
    if len(test) <= max_images:
        return np.arange(len(test))
    return np.sort(numpy_rng(seed, "check.images").choice(len(test), size=max_images, replace=False))


def check_invariance(classifier: nn.Module, test: ImageSet, config: CheckConfig, *, name: str, seed: int = 0,
                     reference: tuple[np.ndarray, dict[str, np.ndarray]] | None = None) -> InvarianceCheck:
    """The check stage: EI per transform and a variance matrix per family of ``classifier`` on ``test``.

    Args:
        classifier: [0, 1] images -> logits.
        test: the test split (only its first ``config.max_images``-subset is read; see :func:`checked_positions`).
        config: the check section of the run config.
        name: ``before``, ``after`` or a label for this model (the artifacts' prefix).
        seed: the run's seed (streams ``check.images``, ``check.bootstrap``, ``check.subsample``).
        reference: an earlier check's per-image EI (:func:`load_per_image`) to compare with, image by image.
    """
    start = time.perf_counter()
    positions = checked_positions(test, config.max_images, seed)
    subset = torch.from_numpy(positions)
    images, labels = test.float_images()[subset], test.labels[subset]
    if reference is not None and not np.array_equal(reference[0], positions):
        raise ValueError(f"The reference check read other test images ({len(reference[0])}) than this one "
                         f"({len(positions)}): re-run `defuse check --model before` with the same config.")
    model = inference_copy(classifier)
    rng = numpy_rng(seed, "check.bootstrap")
    ei, per_image, changes = {}, {}, {}
    for transform in config.ei_transforms:
        scores = per_image_scores(model, images, transform, labels)
        ei[transform] = summarize(scores, transform, rng, labels.numpy())
        if scores is not None:
            per_image[transform] = scores
        if reference is not None:
            changes[transform] = compare_ei(reference[1].get(transform), scores.ei if scores else None,
                                            transform, rng)
    subsample = numpy_rng(seed, "check.subsample")
    variance = {family: family_variance(model, images, labels, family, subsample, per_class=config.per_class)
                for family in config.families}
    verdicts = {family: verdict(family, v.features) for family, v in variance.items()}
    drift = strip = None
    if config.drift:
        from defuse.drift.forensics import drift_forensics
        from defuse.drift.synthesis import preset_strip

        drift = drift_forensics(classifier, images, labels, max_drop=config.drift_max_drop, seed=seed)
        strip = preset_strip(images, seed=seed)
    return InvarianceCheck(name, positions, ei, per_image, variance, changes, seconds=time.perf_counter() - start,
                           verdicts=verdicts, drift=drift, drift_strip=strip)


def run_check(classifier: nn.Module, original: nn.Module, test: ImageSet, config: CheckConfig,
              directory: str | Path, *, name: str, reference: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The check stage as the pipeline runs it: check ``classifier`` on ``test``, paired with the ``reference``
    check saved in ``directory`` when there is one, save it there as ``name``, and return its key figures.

    With ``config.enabled`` false only a record saying so is written (check-after reads it as its input). A
    classifier with ``original``'s weights (a refused repair) gets the reference's figures with a zero change,
    copied rather than computed again."""
    directory = Path(directory)
    file = f"{directory.name}/{name}.json"
    if not config.enabled:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / f"{name}.json", {"model": name, "enabled": False})
        return {"enabled": False}
    saved = directory / f"{reference}.json" if reference else None
    before = json.loads(saved.read_text()) if saved is not None and saved.exists() else {}
    if "ei" in before and same_weights(classifier, original):
        checked = copy_unchanged(directory, reference, name)
        if name == "after":
            write_tolerance_spec(directory)
        return {"images": checked["images"], "same_weights_as": reference, "ei_regressions": [], "file": file}
    earlier = load_per_image(directory, reference) if reference else None
    result = check_invariance(classifier, test, config, name=name, seed=seed, reference=earlier)
    if before.get("variance"):
        result = with_variance_change(result, before)
    result.save(directory)
    if name == "after":
        write_tolerance_spec(directory)
    return {**result.metrics, "file": file}


def write_tolerance_spec(directory: str | Path) -> None:
    """checks/drift_tolerance.json: the "acceptable data environment" of the model before and after the repair
    (each parameter's tolerated range and sensitivity), from the two checks' drift forensics."""
    directory = Path(directory)
    specs = {}
    for name in ("before", "after"):
        path = directory / f"{name}_drift_tolerance.json"
        if path.exists():
            specs[name] = json.loads(path.read_text())
    if specs:
        atomic_write_json(directory / "drift_tolerance.json", {
            "what": "per acquisition parameter, the range within which the accuracy drop stays within max_drop "
                    "(defuse.drift.forensics), for the original (before) and the repaired (after) classifier",
            **specs})


def with_variance_change(after: InvarianceCheck, before_json: dict[str, Any]) -> InvarianceCheck:
    """``after`` with each family's change of matrix mean against a saved ``before`` check's JSON."""
    change = {family: round(v.features["mean"] - before_json["variance"][family]["mean"], 5)
              for family, v in after.variance.items() if family in before_json.get("variance", {})}
    return replace(after, variance_change=change)


def copy_unchanged(directory: str | Path, reference: str, name: str) -> dict[str, Any]:
    """Write ``reference``'s check again as ``name``'s, with a zero paired change: for a model whose weights are the
    reference's (a refused repair keeps the original's), instead of computing the same numbers twice. Returns the
    JSON written."""
    directory = Path(directory)
    for path in sorted(directory.glob(f"{reference}_*")):
        atomic_write_bytes(directory / (name + path.name[len(reference):]), path.read_bytes())
    checked = json.loads((directory / f"{reference}.json").read_text())
    zero = {"mean": 0.0, "low": 0.0, "high": 0.0}
    checked.update({
        "model": name, "same_weights_as": reference,
        "ei_change": {t: ({"transform": t, "change": zero, "regression": False} if e["applicable"] else None)
                      for t, e in checked["ei"].items()},
        "variance_mean_change": {family: 0.0 for family in checked["variance"]},
    })
    for family, v in checked["variance"].items():
        v["matrices"] = {k: name + f[len(reference):] for k, f in v["matrices"].items()}
        v["heatmap"] = name + v["heatmap"][len(reference):]
        # The copied heat map would carry the reference's name in its title: draw it again under this one.
        matrices = {kind: np.load(directory / file, allow_pickle=False) for kind, file in v["matrices"].items()
                    if kind in ("correct", "incorrect")}
        redrawn = FamilyVariance(family, np.asarray(v["grid"]), matrices["correct"], matrices["incorrect"],
                                 v["features"], v["counts"], {})
        atomic_write_bytes(directory / v["heatmap"], _heatmap_png(redrawn, name))
    if checked.get("drift"):
        drift = checked["drift"]
        drift["tolerance_file"] = f"{name}_drift_tolerance.json"
        if drift.get("presets_strip"):
            drift["presets_strip"] = f"{name}_drift_presets.png"
        spec = json.loads((directory / f"{name}_drift_tolerance.json").read_text())
        atomic_write_json(directory / f"{name}_drift_tolerance.json", {**spec, "model": name})
    atomic_write_json(directory / f"{name}.json", checked)
    return checked


def _verdict_json(answer: Verdict | None) -> dict[str, Any]:
    if answer is None:
        return {"verdict": None, "assessor": NO_ASSESSOR}
    return {"verdict": "invariant" if answer.invariant else "variant", "probability_invariant": answer.probability,
            "assessor": answer.trained_on}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _heatmap_png(variance: FamilyVariance, name: str) -> bytes:
    """The matrices of the images read right and wrong at the identity, side by side as heat maps, axes in the
    family's transform values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = variance.grid
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=100, layout="constrained")
    for ax, kind, matrix in zip(axes, ("correct", "incorrect"), (variance.correct, variance.incorrect)):
        image = ax.imshow(matrix, vmin=0.0, vmax=HEATMAP_MAX, cmap="magma", origin="lower",
                          extent=(grid[0], grid[-1], grid[0], grid[-1]))
        mean = float(matrix.mean()) if variance.counts[kind] else float("nan")
        ax.set_title(f"{name}: {variance.family}\nread {'right' if kind == 'correct' else 'wrong'} at the identity: "
                     f"{variance.counts[kind]} images, mean {mean:.3f}", fontsize=8)
        ax.set_xlabel(variance.family)
        ax.set_ylabel(variance.family)
    fig.colorbar(image, ax=axes, extend="max", label="RMS confidence change")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
