"""Every repair candidate of a kept planted run, graded afterwards on the planted subgroup of the test split.

The correct stage chooses among its candidates (layers, lambda, epoch) on held-out images only; this diagnosis
asks, after the fact, whether a different choice could have done better on test, or whether every candidate falls
short (then the fine-tune, not the choice, is what to change). Nothing is chosen on what it prints.

Each candidate is rebuilt as the stage returns a winner: its checkpoint's weights (:func:`defuse.stages.
correct.finetune.candidate_weights`). The held-out figures are the stage's own, read from the run's manifest.

Run: ``python scripts/bench_candidates.py --keep DIR --seed N --case NAME [--out FILE]`` on a run kept by
``scripts/bench_planted.py --keep DIR``. Prints JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import bench_planted as planted
import torch
from _bench import emit

from defuse.data import ImageDataModule
from defuse.models import load_classifier
from defuse.models.inference import predict_labels
from defuse.stages.correct.finetune import candidate_weights


def candidate_figures(keep: Path, seed: int, case: str) -> dict:
    folder = keep / f"seed{seed}"
    run = folder / case
    if not (run / "manifest.json").exists():
        raise SystemExit(f"{run / 'manifest.json'} is missing: keep a run with `scripts/bench_planted.py --keep "
                         f"{keep} --seeds {seed} --cases {case}` first.")
    metrics = json.loads((run / "manifest.json").read_text())["stages"].get("correct", {}).get("metrics", {})
    if not metrics.get("candidates"):
        raise SystemExit(f"{run} has no repair candidates to grade (its correct stage did not run, or trained "
                         f"nothing): replay it with `scripts/bench_planted.py --keep {keep} --seeds {seed} --cases "
                         f"{case} --replay-correct`.")
    npz, info, _ = planted.write_case_data(folder, case, seed)
    config = planted.case_config(npz, seed)
    test = ImageDataModule(config.data, config.seed).split("test")
    group = planted.subgroup(test, case, info["threshold"])
    images, labels = test.float_images(), test.labels
    original = load_classifier(run / "classifier.ckpt").model
    before = predict_labels(original, images)
    rows = []
    for candidate in metrics["candidates"]:
        family = "lambda" if candidate["layers"] == "all" else "head_lambda"
        path = run / "correct" / f"{family}_{candidate['lambda']:g}" / f"epoch{candidate['epoch']}.ckpt"
        fine_tuned = copy.deepcopy(original)
        fine_tuned.load_state_dict(candidate_weights(torch.load(path, map_location="cpu", weights_only=True)))
        after = predict_labels(fine_tuned.eval(), images)
        outside = float((after[~group] == labels[~group]).float().mean() - (before[~group] == labels[~group])
                        .float().mean())
        rows.append({**{k: candidate[k] for k in ("layers", "lambda", "epoch", "admissible", "bug_accuracy",
                                                  "bug_confidence", "guard_change")},
                     "test_subgroup_accuracy": round(float((after[group] == labels[group]).float().mean()), 4),
                     "test_outside_change": round(outside, 4)})
    return {"case": case, "seed": seed, "chosen": metrics.get("chosen"),
            "real_bug_images": metrics.get("real_bug_images"), "test_subgroup_size": int(group.sum()), "candidates": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, required=True, help="the folder `bench_planted.py --keep` wrote")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--case", required=True, choices=sorted(set(planted.CASES)))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    return emit(candidate_figures(args.keep, args.seed, args.case), args.out)


if __name__ == "__main__":
    sys.exit(main())
