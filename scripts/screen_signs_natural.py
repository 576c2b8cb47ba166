"""Choose the signs source's built-in natural bug by measurement (issue 36, point 2).

For each candidate factor combination, the shipped classifier (``configs/signs.yaml``, the same fit-classifier stage
``defuse run`` runs) is trained on the labelled pool that keeps 3% of that combination, then graded on the test
split's images of the combination (rendered as often as ever) and on the rest of the test split. A candidate
qualifies when the classifier reads at most ``--bar`` (0.7) of its subgroup. Only train, val and the pool's labels
shape the classifier; the test split is read once, to grade. Prints JSON.

    python scripts/screen_signs_natural.py --out benchmarks/records/screen_signs_natural.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from defuse.config import load_config
from defuse.data import ImageDataModule
from defuse.models.inference import predict_labels
from defuse.models.loading import load_classifier
from defuse.pipeline import run_stage, stage_named
from defuse.rundir import RunDir
from defuse.signs import CLASSES, Rare, sign_sets

ROOT = Path(__file__).resolve().parents[1]

# (sign, factor, values): about 10-20% of the sign each, the kinds of condition a data set under-samples.
CANDIDATES = (
    ("50kmh", "illumination", ("night",)),
    ("50kmh", "yaw", ("30", "45")),
    ("50kmh", "illumination", ("glare",)),
    ("50kmh", "occlusion", ("0.2", "0.35")),
    ("80kmh", "illumination", ("night",)),
    ("80kmh", "yaw", ("-45", "-30")),
)


def screen(sign: str, factor: str, values: tuple[str, ...], keep: float, seed: int, workdir: Path) -> dict:
    overrides = [f"seed={seed}", f"data.signs.rare.sign={sign}", f"data.signs.rare.factor={factor}",
                 f"data.signs.rare.values={json.dumps(list(values))}", f"data.signs.rare.keep={keep}",
                 "trainer.progress_bar=false"]
    config = load_config(ROOT / "configs" / "signs.yaml", overrides)
    run = RunDir(workdir)
    start = time.perf_counter()
    run_stage(stage_named("fit-classifier"), config, run)
    seconds = time.perf_counter() - start
    model = load_classifier(run.path("classifier.ckpt")).model
    signs = config.data.signs
    rare = Rare(sign, factor, values, keep)
    pool, test = sign_sets(signs.images_per_class, signs.test_per_class, signs.seed, config.data.image_size,
                           CLASSES, rare)
    module = ImageDataModule(config.data, config.seed)
    assert np.array_equal(module.split("test").labels.numpy(), test.labels.numpy())  # the run's own test split
    predicted = predict_labels(model, test.images.float() / 255.0).numpy()
    right = predicted == test.labels.numpy()
    inside = rare.matches(test.factors)
    same_sign = test.labels.numpy() == CLASSES.index(sign)
    misread = predicted[inside & ~right]
    return {"sign": sign, "factor": factor, "values": list(values), "keep": keep, "seed": seed,
            "pool_images_of_subgroup": int(rare.matches(pool.factors).sum()),
            "test_subgroup_size": int(inside.sum()), "subgroup_share_of_sign": round(float(inside[same_sign].mean()), 4),
            "subgroup_accuracy": round(float(right[inside].mean()), 4),
            "sign_accuracy_outside_subgroup": round(float(right[same_sign & ~inside].mean()), 4),
            "accuracy_outside_subgroup": round(float(right[~inside].mean()), 4),
            "misread_as": {CLASSES[int(k)]: int(n) for k, n in zip(*np.unique(misread, return_counts=True))},
            "train_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="run seeds, comma-separated (default 0)")
    parser.add_argument("--keep", type=float, default=0.03, help="share of the combination the pool keeps")
    parser.add_argument("--bar", type=float, default=0.7, help="a candidate qualifies at or below this accuracy")
    parser.add_argument("--only", default=None, help="candidate numbers to screen, comma-separated (default all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    chosen = [CANDIDATES[int(i)] for i in args.only.split(",")] if args.only else list(CANDIDATES)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for i, (sign, factor, values) in enumerate(chosen):
                result = screen(sign, factor, values, args.keep, seed, Path(tmp) / f"{seed}_{i}")
                result["qualifies"] = result["subgroup_accuracy"] <= args.bar
                print(json.dumps(result), flush=True)
                results.append(result)
    out = {"command": "python scripts/screen_signs_natural.py " + " ".join(argv or sys.argv[1:]), "bar": args.bar,
           "candidates": results}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
