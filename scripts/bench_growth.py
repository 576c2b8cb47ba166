"""Growth benchmark: how identify + distill scale with the number of sources, and correct with labelled regions.

On the shipped ``configs/mnist-test-split.yaml`` (models trained once, through ``run_stage`` as ``defuse run``
does), it re-runs:

* identify + distill at ``identify.max_sources`` = 500, 1,000 and 2,000. The audit split holds 1,600 images, so
  for this measurement only the search starts from the training split (``identify.split=train``, 5,600 images):
  the search's cost per source does not depend on which split the images come from;
* correct with the top 5, 15 and 30 regions labelled a bug (their source class, from a labels file) and the rest
  not-a-bug.

For each it prints the wall time and the fitted exponent k of time ~ n^k (least squares on the log-log points).

Run: ``python scripts/bench_growth.py [--run-dir DIR] [--out FILE]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from _bench import emit, progress  # scripts/_bench.py

from defuse.config import RunConfig, config_from_mapping, load_config
from defuse.pipeline import run_stage, stage_named
from defuse.rundir import RunDir

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "mnist-test-split.yaml"
SOURCES = (500, 1000, 2000)
LABELLED = (5, 15, 30)


def exponent(sizes, seconds) -> float:
    """k of seconds ~ sizes^k, least squares in log-log."""
    return round(float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0]), 2)


def stage(name: str, config: RunConfig, run: RunDir, force: bool = True) -> dict:
    start = time.perf_counter()
    result = run_stage(stage_named(name), config, run, force=force)
    return {"seconds": round(time.perf_counter() - start, 2), "metrics": result.metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    base = load_config(SHIPPED, ["trainer.progress_bar=false", "identify.split=train"])
    out: dict = {"config": SHIPPED.name, "identify_split": "train (for sizes beyond the 1,600 audit images)"}
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(args.run_dir or tmp)
        out["training"] = {name: stage(name, base, run, force=False)["seconds"]
                           for name in ("fit-classifier", "fit-generator")}
        rows = []
        for n in SOURCES:
            config = config_from_mapping(base.to_dict(), [f"identify.max_sources={n}"])
            found, grouped = stage("identify", config, run), stage("distill", config, run)
            rows.append({"sources": n, "identify_seconds": found["seconds"], "distill_seconds": grouped["seconds"],
                         "seconds": round(found["seconds"] + grouped["seconds"], 2),
                         "failures": found["metrics"]["failures"], "queries": found["metrics"]["queries"],
                         "regions": grouped["metrics"]["regions"], "pairs": grouped["metrics"]["pairs"]})
            progress(f"sources {n}", rows[-1])
        out["identify_distill"] = rows
        out["identify_distill_exponent"] = exponent(SOURCES, [r["seconds"] for r in rows])
        out["identify_exponent"] = exponent(SOURCES, [r["identify_seconds"] for r in rows])
        out["distill_exponent"] = exponent(SOURCES, [r["distill_seconds"] for r in rows])
        regions = json.loads(run.path("regions.json").read_text())["regions"]
        rows = []
        for k in LABELLED:
            answers = {r["id"]: (r["source_label"] if i < k else "not-a-bug") for i, r in enumerate(regions)}
            labels = run.path(f"labels-top{k}.yaml")
            labels.write_text(yaml.safe_dump(answers))
            config = config_from_mapping(config.to_dict(), [f"label.mode={labels}"])
            stage("label", config, run)
            fixed = stage("correct", config, run)
            rows.append({"labelled_regions": min(k, len(regions)), "seconds": fixed["seconds"],
                         "chosen": fixed["metrics"].get("chosen"),
                         "region_samples": fixed["metrics"].get("region_samples_trained")})
            progress(f"labelled {k}", rows[-1])
        out["correct"] = rows
        out["correct_exponent"] = exponent([r["labelled_regions"] for r in rows], [r["seconds"] for r in rows])
    return emit(out, args.out)


if __name__ == "__main__":
    sys.exit(main())
