"""Model zoo for the invariance assessor, and the EI paper's model-centric finding on it.

Trains ``--models`` small CNNs on the MNIST split (``configs/mnist-test-split.yaml``'s training images) with
defuse's own ``train_classifier``, each under a recipe drawn from a seeded grid: random rotation (0 to 45
degrees, beyond the +-15 of the check grid), zoom and brightness augmentation, 1 to 8 epochs, width 8 or 16, and
one anomaly in three: label noise (30% of training labels), class imbalance (90% of three classes dropped), a
small training fraction (10%), or impaired rotation augmentation (half the images turned by -12 or +12 degrees
only, none between: the ML4ML paper's anomaly). For each model, on the first ``--images`` (1,000) test images split in two
disjoint halves:

* half A: the variance matrices of the three families and their features (what ``defuse check`` computes), EI
  per transform and the accuracy;
* half B: the accuracy at every grid value, which labels the model invariant to a family or not
  (:func:`defuse.invariance.assessor.invariance_label`: no value costs more than 3 points), so the labels
  come from other images than the features;
* half A under a fixed shift (Gaussian noise, std 0.3, clipped): accuracy and EI again.

Then, printed as JSON:

* the assessor (a random forest) by held-out-model cross-validation: stratified 5-fold, repeated 4 times; each
  fold's test models were never seen in its training; accuracy with a 95% interval over folds, against the
  majority-class baseline and a one-feature threshold rule (a depth-1 tree on the best single feature, chosen
  within each training fold);
* the correlation across models between EI (each transform) and accuracy, in distribution and under the shift:
  Pearson r and Spearman rho with 95% bootstrap intervals over models.

The feature table is written to ``defuse/invariance/zoo.csv`` (shipped; ``defuse check`` rebuilds the assessor
from it) unless ``--no-write``.

Run: ``python scripts/build_zoo.py [--models 160] [--out FILE]``. Needs the MNIST files ($DEFUSE_MNIST_RAW or
../shared/data/MNIST/raw).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from _bench import emit, progress  # scripts/_bench.py
from scipy import stats
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.tree import DecisionTreeClassifier

from defuse.config import load_config
from defuse.data import ImageDataModule, ImageSet
from defuse.invariance.assessor import Assessor, feature_columns, invariance_label
from defuse.invariance.ei import per_image_scores
from defuse.invariance.variance import family_variance
from defuse.models.inference import inference_copy, predict_labels
from defuse.models.training import train_classifier
from defuse.seeding import int_seed, numpy_rng, torch_generator
from defuse.transforms import (
    EI_TRANSFORMS,
    GRID_TRANSFORMS,
    GRIDS,
    IDENTITY_INDEX,
)

ROOT = Path(__file__).resolve().parents[1]
ZOO_CSV = ROOT / "defuse" / "invariance" / "zoo.csv"
ANOMALIES = (None, None, "label_noise", "imbalance", "fraction", "impaired_rotation")
IMPAIRED_ANGLES = (-12.0, 12.0)  # the impaired augmentation's only angles: it skips everything between
SHIFT_NOISE = 0.3


def recipes(count: int, seed: int) -> list[dict]:
    """``count`` training recipes drawn from the grid, from the stream ``zoo.recipes``."""
    rng = numpy_rng(seed, "zoo.recipes")
    out = []
    for index in range(count):
        out.append({
            "model": index,
            # few or many epochs: a model needs both a wide zoom range and 4 or more epochs to be invariant to the
            # whole scale grid (measured on a zoo with 1, 2 or 4 epochs: median accuracy drop 0.4 to 1.6 points
            # with zoom +-0.4 or more and 4 epochs, 3.8 to 22 points with fewer)
            "epochs": int(rng.choice([1, 2, 4, 8])), "width": int(rng.choice([8, 16])),
            "augment_rotation": float(rng.choice([0, 0, 5, 10, 15, 30, 45])),
            # zoom up to +-60%: the check's scale grid reaches +-30%, and only a wide zoom range with 4 or more epochs
            # makes a model invariant to all of it. A zoo needs both verdicts to teach and test an assessor: the
            # choices [0, 0.1, 0.2, 0.3, 0.4, 0.5] gave 19 scale-invariant models of 96 (and a first zoo of 64, 7),
            # too few for the forest to beat the majority class; these give wide ranges four times in six.
            "augment_scale": float(rng.choice([0, 0.2, 0.4, 0.5, 0.6, 0.6])),
            "augment_brightness": float(rng.choice([0, 0, 0.1, 0.3, 0.6])),
            "anomaly": ANOMALIES[int(rng.integers(len(ANOMALIES)))] or "none",
        })
    return out


def with_anomaly(train: ImageSet, anomaly: str, rng: np.random.Generator) -> ImageSet:
    """The training split as the anomaly leaves it."""
    if anomaly == "label_noise":
        labels = train.labels.clone()
        flip = torch.from_numpy(rng.random(len(labels)) < 0.3)
        labels[flip] = torch.from_numpy(rng.integers(0, len(train.classes), int(flip.sum())))
        return dataclasses.replace(train, labels=labels)
    if anomaly == "imbalance":
        rare = rng.choice(len(train.classes), size=3, replace=False)
        drop = np.isin(train.labels.numpy(), rare) & (rng.random(len(train)) < 0.9)
        return train.subset(torch.from_numpy(~drop))
    if anomaly == "fraction":
        return train.subset(torch.from_numpy(rng.random(len(train)) < 0.1))
    if anomaly == "impaired_rotation":
        # ML4ML's impaired augmentation: half the training images turned by one of a few fixed angles only, so the
        # model sees those angles and none between them (a non-smooth variance matrix, not a smooth one).
        from torchvision.transforms.v2 import functional as TF

        images = train.images.clone()
        turn = np.nonzero(rng.random(len(images)) < 0.5)[0]
        angles = rng.choice(IMPAIRED_ANGLES, size=len(turn))
        for angle in IMPAIRED_ANGLES:
            rows = torch.from_numpy(turn[angles == angle])
            images[rows] = TF.rotate(images[rows], angle)
        return dataclasses.replace(train, images=images)
    return train


def shifted(images: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed distribution shift: Gaussian noise (std ``SHIFT_NOISE``), clipped to [0, 1], the same for every
    model."""
    noise = torch.randn(images.shape, generator=torch_generator(seed, "zoo.shift")) * SHIFT_NOISE
    return (images + noise).clamp(0, 1)


def describe(model: torch.nn.Module, test: ImageSet, seed: int) -> dict:
    """One zoo row's measurements on ``test`` split in two halves (see the module docstring)."""
    half = len(test) // 2
    a, b = test.float_images()[:half], test.float_images()[half:]
    ya, yb = test.labels[:half], test.labels[half:]
    model = inference_copy(model)
    row = {"accuracy": float((predict_labels(model, a) == ya).float().mean())}
    rng = numpy_rng(seed, "zoo.subsample")
    for family in GRIDS:
        variance = family_variance(model, a, ya, family, rng)
        row.update({column: variance.features[column.split(".", 1)[1]] for column in feature_columns(family)})
        grid_accuracy = np.array([float((predict_labels(model, GRID_TRANSFORMS[family](b, float(v))) == yb)
                                        .float().mean()) for v in GRIDS[family]])
        row[f"{family}.accuracy_drop"] = float(grid_accuracy[IDENTITY_INDEX] - grid_accuracy.min())
        row[f"{family}.invariant"] = invariance_label(grid_accuracy, IDENTITY_INDEX)
    noisy = shifted(a, seed)
    row["shift.accuracy"] = float((predict_labels(model, noisy) == ya).float().mean())
    for transform in EI_TRANSFORMS:
        if transform == "grayscale":
            continue  # one-channel digits: not applicable
        row[f"ei.{transform}"] = float(per_image_scores(model, a, transform).ei.mean())
        row[f"shift.ei.{transform}"] = float(per_image_scores(model, noisy, transform).ei.mean())
    return row


def build(count: int, seed: int, images: int) -> pd.DataFrame:
    config = load_config(str(ROOT / "configs" / "mnist-test-split.yaml"), ["trainer.progress_bar=false"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="defuse-zoo-") as scratch:
        for recipe in recipes(count, seed):
            start = time.perf_counter()
            data = ImageDataModule(config.data, config.seed)
            data.setup()
            data.train = with_anomaly(data.train, recipe["anomaly"], numpy_rng(seed, f"zoo.anomaly.{recipe['model']}"))
            classifier = dataclasses.replace(config.classifier, epochs=recipe["epochs"], width=recipe["width"],
                                             augment_rotation=recipe["augment_rotation"],
                                             augment_scale=recipe["augment_scale"],
                                             augment_brightness=recipe["augment_brightness"])
            model_seed = int_seed(seed, f"zoo.model.{recipe['model']}")
            pl.seed_everything(model_seed, verbose=False)  # the weights' initialisation
            model, _ = train_classifier(data, classifier, config.trainer, scratch, seed=model_seed)
            test = data.split("test")
            row = {**recipe, **describe(model, test.subset(torch.arange(min(images, len(test)))), seed),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            progress(f"model {recipe['model']}", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                                                  if not k.startswith(("rotation.", "brightness.", "scale."))
                                                  or k.endswith(("invariant", "accuracy_drop", ".mean"))})
    return pd.DataFrame(rows)


def interval(values: list[float]) -> dict:
    """Mean and a 95% t-interval over folds."""
    values = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": round(float(values.mean()), 4), "ci95": [round(float(values.mean() - half), 4),
                                                              round(float(values.mean() + half), 4)]}


def evaluate_assessor(zoo: pd.DataFrame, family: str, seed: int) -> dict:
    """Held-out-model cross-validation of the forest, the majority baseline and the one-feature rule."""
    x, y = zoo[feature_columns(family)].to_numpy(), zoo[f"{family}.invariant"].to_numpy()
    counts = {"invariant": int(y.sum()), "variant": int(len(y) - y.sum())}
    if min(counts.values()) < 5:
        return {"labels": counts, "evaluated": False,
                "why": "fewer than 5 models of one verdict: stratified 5-fold cross-validation cannot hold them out"}
    scores = {"forest": [], "majority": [], "one_feature": []}
    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=4, random_state=seed)
    for train, test in folds.split(x, y):
        forest = Assessor().fit(x[train], y[train])
        scores["forest"].append(float(((forest.predict_proba(x[test]) >= 0.5) == y[test]).mean()))
        majority = int(y[train].mean() >= 0.5)
        scores["majority"].append(float((y[test] == majority).mean()))
        stump = DecisionTreeClassifier(max_depth=1, random_state=0).fit(x[train], y[train])
        scores["one_feature"].append(float((stump.predict(x[test]) == y[test]).mean()))
    stump = DecisionTreeClassifier(max_depth=1, random_state=0).fit(x, y)
    return {"labels": counts, "evaluated": True, "folds": len(scores["forest"]),
            **{name: interval(values) for name, values in scores.items()},
            "one_feature_rule_on_all_models": feature_columns(family)[int(stump.tree_.feature[0])],
            "forest_beats_majority": interval(np.subtract(scores["forest"], scores["majority"]).tolist())["ci95"][0] > 0}


def correlation(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> dict:
    """Pearson r and Spearman rho across models, each with a 95% bootstrap interval over models."""
    out = {}
    for name, fn in (("pearson_r", lambda a, b: stats.pearsonr(a, b)[0]),
                     ("spearman_rho", lambda a, b: stats.spearmanr(a, b)[0])):
        draws = []
        for _ in range(resamples):
            pick = rng.integers(0, len(x), len(x))
            if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
                draws.append(fn(x[pick], y[pick]))
        low, high = np.quantile(draws, [0.025, 0.975])
        out[name] = {"value": round(float(fn(x, y)), 3), "ci95": [round(float(low), 3), round(float(high), 3)]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1000,
                        help="test images read per model, in two halves (features, labels)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {ZOO_CSV.relative_to(ROOT)}")
    parser.add_argument("--table", default=None, help="evaluate an existing zoo table instead of building one")
    args = parser.parse_args()
    start = time.perf_counter()
    zoo = pd.read_csv(args.table) if args.table else build(args.models, args.seed, args.images)
    if not args.table and not args.no_write:
        zoo.to_csv(ZOO_CSV, index=False, float_format="%.6g")
    rng = numpy_rng(args.seed, "zoo.bootstrap")
    result = {
        "models": len(zoo), "build_seconds": round(time.perf_counter() - start, 1),
        "seconds_per_model": round(float(zoo["seconds"].mean()), 1),
        "label_rule": "invariant when no grid value costs more than 3 points of accuracy (test half B)",
        "assessor": {family: evaluate_assessor(zoo, family, args.seed) for family in GRIDS},
        "ei_vs_accuracy": {
            transform: {"in_distribution": correlation(zoo[f"ei.{transform}"].to_numpy(), zoo["accuracy"].to_numpy(),
                                                       rng),
                        "shifted": correlation(zoo[f"shift.ei.{transform}"].to_numpy(),
                                               zoo["shift.accuracy"].to_numpy(), rng)}
            for transform in EI_TRANSFORMS if f"ei.{transform}" in zoo},
        "shift": f"test half A with Gaussian noise, std {SHIFT_NOISE}, clipped",
    }
    return emit(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
