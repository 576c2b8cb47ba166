"""``defuse drift synth|forensics|optimize --model before|after|PATH``: physical drift (after raw2logit) of one
classifier on the test images the checks read. Not a stage of the run (check-before and check-after run the drift
forensics); the acquisition model and the three analyses: :mod:`defuse.drift`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defuse.artifacts import CHECKS_DIR, CLASSIFIER_CKPT, REPAIRED_CKPT

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir

DRIFT_ACTIONS = ("synth", "forensics", "optimize")


def drift_command(config: RunConfig, run: RunDir, action: str, model: str) -> dict[str, Any]:
    """``defuse drift synth|forensics|optimize --model before|after|PATH``: physical drift of one classifier on the
    test images the checks read; writes checks/drift_<action>_<model name>.json."""
    from defuse.data import ImageDataModule
    from defuse.models.loading import load_classifier

    if action not in DRIFT_ACTIONS:
        raise ValueError(f"`defuse drift` takes one of {', '.join(DRIFT_ACTIONS)}; got {action!r} instead.")
    path = {"before": CLASSIFIER_CKPT, "after": REPAIRED_CKPT}.get(model, model)
    name = model if model in ("before", "after") else Path(model).stem
    if not run.path(path).is_file():
        raise FileNotFoundError(f"{run.path(path)} is missing: `--model` takes before (after fit-classifier), after "
                                f"(after correct) or a classifier checkpoint file.")
    return run_drift(action, load_classifier(run.path(path)).model, ImageDataModule(config.data, config.seed).split(
        "test"), config.check, run.path(CHECKS_DIR), name=name, seed=config.seed)


def run_drift(action: str, classifier: Any, test: Any, config: Any, directory: str | Path, *, name: str,
              seed: int = 0) -> dict[str, Any]:
    """``defuse drift ACTION`` on the test images the checks read (``check.max_images``, the same seeded subset):
    synth (:func:`~defuse.drift.synthesis.drift_synthesis`), forensics (:func:`~defuse.drift.forensics.
    drift_forensics`) or optimize (:func:`~defuse.drift.optimize.worst_case_drift`); writes
    ``<directory>/drift_<action>_<name>.json`` and returns its key figures."""
    import torch

    from defuse.invariance.check import checked_positions
    from defuse.rundir import atomic_write_json

    positions = torch.from_numpy(checked_positions(test, config.max_images, seed))
    images, labels = test.float_images()[positions], test.labels[positions]
    start = time.perf_counter()
    if action == "synth":
        from defuse.drift.synthesis import drift_synthesis

        result = drift_synthesis(classifier, images, labels, seed=seed)
        metrics = {"ratio_post_hoc_to_physical": result["ratio"],
                   **{f"preset.{k}": v["accuracy"] for k, v in result["presets"].items()}}
    elif action == "forensics":
        from defuse.drift.forensics import drift_forensics

        result = drift_forensics(classifier, images, labels, max_drop=config.drift_max_drop, seed=seed)
        metrics = {f"tolerance.{k}": [v.get("tolerance_low"), v.get("tolerance_high")]
                   for k, v in result["parameters"].items()}
    else:
        from defuse.drift.optimize import worst_case_drift

        result = worst_case_drift(classifier, images, labels, seed=seed)
        metrics = {k: result[k] for k in ("clean_accuracy", "worst_accuracy", "random_accuracy_mean")}
    seconds = round(time.perf_counter() - start, 2)
    file = Path(directory) / f"drift_{action}_{name}.json"
    atomic_write_json(file, {"model": name, "images": int(len(images)), "seconds": seconds, **result})
    return {"images": int(len(images)), "seconds": seconds, **metrics, "file": f"{Path(directory).name}/{file.name}"}
