"""Check benchmark: how long does `defuse check` take on the MNIST split's 2,000 test images, every EI transform and
all three variance matrices (the invariance issue's bar: 30 s on this 2-core machine)?

It runs the CLI as a user would, in a fresh run directory, as child processes: ``defuse fit-classifier`` (the
shipped ``configs/mnist-test-split.yaml``; not timed for the bar), then ``defuse check --model before`` three times:
the first pays the process start-up and imports, both do the whole check, without the drift forensics (the bar
covers EI and the matrices); a third run with them (``check.drift``, on by default) times what they add. Printed: each run's wall time, the
check's own time as the stage records it, and the figures it produced (mean EI per transform, matrix means).

Run: ``python scripts/bench_check.py [--run-dir DIR] [--out FILE]`` (``--run-dir`` reuses a run that already has a
classifier.ckpt). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _bench import emit, progress  # scripts/_bench.py
from bench_run import (
    timed,  # scripts/bench_run.py: a CLI child process, its wall time and peak RSS
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(ROOT / "configs" / "mnist-test-split.yaml")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="a run directory with classifier.ckpt (default: a fresh one)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="defuse-bench-check-") as scratch:
        run_dir = Path(args.run_dir or scratch)
        result: dict = {"config": "configs/mnist-test-split.yaml", "run_dir": str(run_dir)}
        if not (run_dir / "classifier.ckpt").exists():
            result["fit_classifier"] = timed(["fit-classifier", *CONFIG, "--run-dir", str(run_dir), "--no-progress"])
            progress("fit-classifier", result["fit_classifier"])
        runs = []
        # The bar covers EI and the matrices; the drift forensics (check.drift, on by default) are timed apart.
        for attempt, drift in enumerate(("false", "false", "true")):
            runs.append(timed(["check", *CONFIG, "--run-dir", str(run_dir), "--model", "before", "--force",
                               "--set", f"check.drift={drift}"]))
            stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["check-before"]
            runs[-1]["check_seconds"] = stage["seconds"]
            runs[-1]["drift"] = drift == "true"
            progress(f"check {attempt + 1}", runs[-1])
        result["check_runs"] = runs
        checked = json.loads((run_dir / "checks" / "before.json").read_text())
        result["images"] = checked["images"]
        result["ei"] = {t: (round(e["ei"]["mean"], 4) if e["applicable"] else "not applicable")
                        for t, e in checked["ei"].items()}
        result["variance_mean"] = {f: round(v["mean"], 4) for f, v in checked["variance"].items()}
        result["bar_seconds"] = 30
        result["met"] = max(r["seconds"] for r in runs if not r["drift"]) <= 30
    return emit(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
