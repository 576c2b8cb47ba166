"""Exploratory probe (issue 33, beyond its acceptance): when a planted pair ranks below the top 3, what do the
regions above it show the person?

On fresh seeds 3 and 4 two planted pairs ranked 4th and 5th (squat on seed 3, narrow on seed 4; record
``poisoned_discovery_fresh_seeds34``). The benchmark's rank counts only regions of the planted pair itself, in
either orientation. A region of another pair can still show the bug: its row of hardest-learnt training images
(``doubted_nearest``, the images the person is shown beside the samples) may be the bug's mislabelled images.

For each kept case run of ``scripts/bench_planted.py --keep DIR`` given (``DIR/seedS/CASE``), this prints JSON with,
for every region shown down to the planted pair's first one: its pair and bug score with the score's factors, the
share of its hardest-learnt row whose labels the benchmark poisoned (against ``DIR/seedS/clean.npz``), how many of
that row the clean reference (the simulated person's eyes, ``DIR/seedS/reference``) reads as the planted source
class, and the simulated person's answer (:func:`bench_planted.simulated_person`, the rule the repair benchmark
uses): where it is the planted source class, the region's samples show the bug too, through another pair. Trains
nothing; writes only the run's ``person.yaml``, as the benchmark's repair would (the same answers).

Run: ``python scripts/probe_rank_misses.py --keep DIR --runs 3:squat 4:narrow [--out FILE]`` with the same
``DEFUSE_MNIST_RAW`` as the benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_planted as bench  # the benchmark's own case data, reference and simulated person

from defuse.data import ImageDataModule
from defuse.models.inference import predict_labels
from defuse.models.loading import load_classifier
from defuse.rundir import RunDir

FACTORS = ("error_rate", "validity", "confidence", "real_error_rate", "label_doubt")


@torch.no_grad()
def probe_run(keep: Path, seed: int, case: str) -> dict:
    """The regions shown down to the planted pair's first one, and what each shows of the bug (module docstring)."""
    folder = keep / f"seed{seed}"
    npz = folder / f"{case}.npz"
    config = bench.case_config(npz, seed)
    run = RunDir(folder / case)
    clean_labels, given_labels = np.load(folder / "clean.npz")["y"], np.load(npz)["y"]
    data = ImageDataModule(config.data, seed)
    train_rows = data.indices("train").numpy()
    train = data.split("train").float_images()
    reference = load_classifier(folder / "reference" / "classifier.ckpt").model.eval()
    person = yaml.safe_load(bench.simulated_person(run, config, reference).read_text())
    source, planted = bench.case_spec(case)[:2]
    pair_names = {f"{source} -> {planted}": "direct", f"{planted} -> {source}": "reversed"}
    shown = []
    for region in json.loads(run.path("regions.json").read_text())["regions"]:
        row = np.asarray(region["doubted_nearest"], dtype=np.int64)
        rows = train_rows[row]
        read = predict_labels(reference, train[torch.as_tensor(row)]).numpy() if len(row) else np.zeros(0, int)
        shown.append({
            "rank": region["id"], "pair": region["pair"], "planted_pair": pair_names.get(region["pair"]),
            "bug_score": region["bug_score"], **{name: region[name] for name in FACTORS},
            "hardest_row": len(row),
            "hardest_row_poisoned": int((clean_labels[rows] != given_labels[rows]).sum()),
            "hardest_row_read_as_source": int((read == source).sum()),
            "person": person[region["id"]], "person_gives_source": person[region["id"]] == source,
        })
        if region["pair"] in pair_names:
            break
    found = bool(shown) and shown[-1]["planted_pair"] is not None
    above = shown[:-1] if found else shown  # no region of the pair: every region is above it
    return {"seed": seed, "case": case, "planted": f"{source} labelled {planted}",
            "planted_rank": shown[-1]["rank"] if found else None,
            # Regions above the pair that show the bug anyway: by their hardest-learnt row (mostly the bug's
            # mislabelled images) or by their samples (the simulated person answers the planted source class).
            "above_with_bug_row": sum(2 * r["hardest_row_poisoned"] > r["hardest_row"] > 0 for r in above),
            "above_answered_source": sum(r["person_gives_source"] for r in above),
            "regions": shown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, required=True, help="the --keep DIR of bench_planted.py")
    parser.add_argument("--runs", nargs="+", required=True, metavar="SEED:CASE", help="e.g. 3:squat 4:narrow")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs:
        seed, _, case = item.partition(":")
        if not seed.isdigit() or not case:
            parser.error(f"--runs takes SEED:CASE (e.g. 3:squat), got {item!r}")
        if not (args.keep / f"seed{seed}" / case / "regions.json").exists():
            parser.error(f"no kept run at {args.keep / f'seed{seed}' / case}: run `python scripts/bench_planted.py "
                         f"--seeds {seed} --cases {case} --no-repair --keep {args.keep}` first")
        runs.append(probe_run(args.keep, int(seed), case))
    text = json.dumps({"runs": runs}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
