"""Physical drift (after raw2logit, Oala et al. 2023): a differentiable acquisition model (acquisition.py), drift
forensics (forensics.py: sensitivities and tolerances), synthesis (presets, parameter grids, post-hoc corruptions)
and optimisation (the worst-case drift)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


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
