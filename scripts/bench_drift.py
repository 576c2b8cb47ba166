"""Drift benchmark: `defuse drift forensics|synth|optimize` on the MNIST test split, and drift-aware repair.

    python scripts/bench_drift.py [--run-dir DIR] [--repair-run DIR] [--out FILE]

1. A classifier of ``configs/mnist-test-split.yaml`` (``defuse fit-classifier``, unless ``--run-dir`` has one), then
   ``defuse drift forensics``, ``synth`` and ``optimize`` on its 2,000 test images, each as a child process: wall
   time (CLI start-up included) and the command's own seconds, the tolerances, the post-hoc/physical ratio at
   matched SSIM and the worst case.
2. With ``--repair-run DIR`` (a finished run whose repair was admitted, e.g. a planted case kept by
   ``scripts/bench_planted.py --keep``): the run is copied and re-run with ``--set correct.drift_augment=true``
   (correct, verify and check-after re-run; nothing else), and its tolerances (check-after, test split) and clean
   accuracy are compared with the plain repair's and the original model's.

Prints JSON. Everything goes through the CLI, the same code `defuse run` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import emit, progress  # scripts/_bench.py

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist-test-split.yaml"


def defuse(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "defuse", *args, "--no-progress"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"defuse {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return round(time.perf_counter() - start, 2), done


def drift_commands(run_dir: Path) -> dict:
    out = {}
    if not (run_dir / "classifier.ckpt").exists():
        progress("drift", {"step": "fit-classifier", "config": CONFIG.name})
        out["fit_classifier_seconds"], _ = defuse("fit-classifier", "--config", str(CONFIG), "--run-dir", str(run_dir))
    for action in ("forensics", "synth", "optimize"):
        progress("drift", {"step": f"defuse drift {action}"})
        wall, _ = defuse("drift", action, "--run-dir", str(run_dir), "--model", "before")
        result = json.loads((run_dir / "checks" / f"drift_{action}_before.json").read_text())
        entry = {"wall_seconds": wall, "seconds": result["seconds"], "images": result["images"]}
        if action == "forensics":
            entry["clean_accuracy"] = result["clean_accuracy"]
            entry["evaluations"] = result["evaluations"]
            entry["tolerance"] = {k: [v.get("tolerance_low"), v.get("tolerance_high")]
                                  for k, v in result["parameters"].items()}
            entry["sensitivity_per_range"] = {k: v["sensitivity_per_range"] for k, v in result["parameters"].items()}
            entry["worst_direction"] = result["worst_direction"]
        elif action == "synth":
            entry["ratio"] = result["ratio"]
            entry["ratio_definition"] = result["ratio_definition"]
            entry["pairs"] = {k: {"post_hoc": v["post_hoc"], "ratio": v["ratio"],
                                  "settings": [(r["value"], r["ssim"], r["physical_drop"], r["post_hoc_drop"])
                                               for r in v["settings"]]}
                              for k, v in result["post_hoc_vs_physical"].items()}
            entry["presets"] = {k: {m: v[m] for m in ("accuracy", "ei", "ssim")} for k, v in result["presets"].items()}
        else:
            entry.update({k: result[k] for k in ("budget", "clean_accuracy", "worst_accuracy", "worst_setting",
                                                 "random_accuracy_mean", "random_accuracy_min")})
        out[action] = entry
    return out


def tolerances(spec: dict) -> dict:
    return {k: [v.get("tolerance_low"), v.get("tolerance_high")] for k, v in spec["parameters"].items()}


def drift_aware_repair(run: Path, folder: Path) -> dict:
    copy = folder / "drift-aware"
    shutil.copytree(run, copy)
    progress("drift", {"step": "drift-aware repair", "run": str(run)})
    wall, _ = defuse("run", "--run-dir", str(copy), "--set", "correct.drift_augment=true")
    out = {"wall_seconds": wall}
    for name, where in (("plain", run), ("drift_aware", copy)):
        spec = json.loads((where / "checks" / "drift_tolerance.json").read_text())
        verify = json.loads((where / "verify.json").read_text())
        correct = json.loads((where / "manifest.json").read_text())["stages"]["correct"]["metrics"]
        out[name] = {"chosen": correct.get("chosen"), "clean_accuracy": verify["clean_accuracy"],
                     "tolerance_after": tolerances(spec["after"]), "drift_box": correct.get("drift_box")}
        out["original_tolerance"] = tolerances(spec["before"])
    widened = []
    for parameter, (low, high) in out["drift_aware"]["tolerance_after"].items():
        base_low, base_high = out["plain"]["tolerance_after"][parameter]
        if (low is not None and base_low is not None and low < base_low) or \
                (high is not None and base_high is not None and high > base_high):
            widened.append(parameter)
    out["widened_against_plain_repair"] = widened
    out["clean_change_against_plain_points"] = round(
        100 * (out["drift_aware"]["clean_accuracy"]["after"] - out["plain"]["clean_accuracy"]["after"]), 2)
    out["clean_change_against_original_points"] = round(
        100 * (out["drift_aware"]["clean_accuracy"]["after"] - out["drift_aware"]["clean_accuracy"]["before"]), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="a run directory with classifier.ckpt (default: train one "
                        "with configs/mnist-test-split.yaml in a temporary folder)")
    parser.add_argument("--repair-run", default=None, help="a finished run with an admitted repair, to re-run with "
                        "drift-aware repair (on a copy)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_drift_") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "mnist"
        result = {"config": CONFIG.name, "drift": drift_commands(run_dir)}
        if args.repair_run:
            result["drift_aware_repair"] = drift_aware_repair(Path(args.repair_run), Path(tmp))
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
