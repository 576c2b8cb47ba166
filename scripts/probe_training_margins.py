"""Exploratory probe for issue 33 (adopted since: fit-classifier records the margins and distill's bug score reads
them as ``label_doubt``): do the classifier's *training margins* expose a labelling bug that every split carries?

When train, val and audit all carry one labelling error, every judge fitted on those labels agrees with it, and no
label-free score found so far tells a planted pair from a natural class boundary (docs/benchmarks.md). The area
under the margin (AUM; Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the Margin Ranking")
uses the labels differently: an image whose label disagrees with what similar images teach is learnt late and with
a small margin, however consistently the error was made.

For each kept run directory of ``scripts/bench_planted.py --keep`` given, this reads the run's training_margins.npy,
or (a run made before fit-classifier recorded them) retrains the run's classifier as fit-classifier does (same
config, data and epochs; Lightning) and records every training image's margin (logit of
its given label minus the largest other logit) after each epoch; AUM is their mean. It prints JSON with:

* per run, with ``--poisoned-from CLEAN.npz`` (the case's unpoisoned labels): how well a low AUM ranks the
  poisoned training labels (AUROC over all training images, and within the listed label issues of
  ``label_issues.csv``: what would put a person's review pages in order);
* per region shown (regions.json): the mean AUM of the 20 training images of the region's two classes nearest its
  centre (the validity model's standardised latent space), beside its bug score.

Run: ``python scripts/probe_training_margins.py RUN_DIR [RUN_DIR ...] [--poisoned-from CLEAN.npz] [--out FILE]``,
e.g. on ``/tmp/keep/seed2/{clean,squat,leftheavy}`` with ``--poisoned-from /tmp/keep/seed2/clean.npz``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from _bench import emit  # scripts/_bench.py
from sklearn.metrics import roc_auc_score

from defuse.config import config_from_mapping
from defuse.models.classifiers import ClassifierModule
from defuse.models.inference import latent_means, predict_logits
from defuse.models.loading import load_generator
from defuse.models.training import make_trainer, training_data
from defuse.records import Regions
from defuse.validity import ValidityModel

NEAREST = 20  # training images of a region's two classes read around its centre


class _EpochMargins(pl.Callback):
    """Every training image's margin (given label's logit minus the largest other) at the end of each epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.margins = images, labels, []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        module.eval()
        with torch.no_grad():
            logits = predict_logits(module.model, self.images)
        module.train()
        rows = torch.arange(len(self.labels))
        given = logits[rows, self.labels]
        logits[rows, self.labels] = -torch.inf
        self.margins.append((given - logits.max(dim=1).values).numpy())


def area_under_margin(run_dir: Path):
    """(AUM per training image, the run's data, config): from the run's own training_margins.npy (fit-classifier
    records them since 02873f6), else the run's classifier retrained as fit-classifier does."""
    config = config_from_mapping(json.loads((run_dir / "manifest.json").read_text())["config"])
    data = training_data(config.data, config.seed)
    train = data.split("train")
    recorded = run_dir / "training_margins.npy"
    if recorded.exists() and len(np.load(recorded)):
        return np.load(recorded).mean(axis=0), data
    mean, std = data.channel_stats()
    torch.manual_seed(config.seed)
    module = ClassifierModule(arch=config.classifier.arch, width=config.classifier.width, in_channels=data.channels,
                              num_classes=data.num_classes, mean=mean, std=std, lr=config.classifier.lr,
                              weight_decay=config.classifier.weight_decay, classes=list(data.classes))
    margins = _EpochMargins(train.float_images(), train.labels)
    make_trainer(config.trainer, config.classifier.epochs, str(run_dir / "probe"), callbacks=[margins],
                 num_sanity_val_steps=0).fit(module, datamodule=data)
    return np.stack(margins.margins).mean(axis=0), data


def probe(run_dir: Path, clean_labels: np.ndarray | None) -> dict:
    aum, data = area_under_margin(run_dir)
    train = data.split("train")
    labels = train.labels.numpy()
    out: dict = {"run": str(run_dir), "train_images": len(labels)}
    if clean_labels is not None:
        poisoned = clean_labels[data.indices("train").numpy()] != labels
        out["poisoned_train_labels"] = int(poisoned.sum())
        if 0 < poisoned.sum() < len(poisoned):
            out["auroc_low_aum_poisoned_all_train"] = round(roc_auc_score(poisoned, -aum), 4)
            mistaken = int(np.bincount(labels[poisoned]).argmax())  # the label the bug gave them
            same = labels == mistaken
            out["auroc_low_aum_poisoned_within_their_label"] = round(roc_auc_score(poisoned[same], -aum[same]), 4)
            out["aum_quantiles_10_50_90"] = {
                "poisoned": np.round(np.quantile(aum[poisoned], [0.1, 0.5, 0.9]), 3).tolist(),
                "rest_of_their_label": np.round(np.quantile(aum[same & ~poisoned], [0.1, 0.5, 0.9]), 3).tolist()}
            issues = run_dir / "label_issues.csv"  # written once regions are labelled (not by --no-repair runs)
            listed = (pd.read_csv(issues).query("split == 'train'")["position"].to_numpy() if issues.exists()
                      else np.zeros(0, dtype=int))
            hit = poisoned[listed]
            if 0 < hit.sum() < len(hit):
                order = np.argsort(aum[listed])  # most suspect first
                out["listed_train_issues"] = {"listed": len(listed), "poisoned": int(hit.sum()),
                                              "auroc_low_aum": round(roc_auc_score(hit, -aum[listed]), 4),
                                              "precision_of_lowest_aum_k": round(float(hit[order[:hit.sum()]].mean()), 4)}
    z = latent_means(load_generator(run_dir / "generator.ckpt"), train.float_images()).numpy()
    scale = np.asarray(ValidityModel.load(run_dir / "validity.npz").scale)
    regions = []
    for rank, region in enumerate(Regions.load(run_dir / "regions.json").regions, 1):
        distance = np.linalg.norm((z - np.asarray(region.mean)) / scale, axis=1)
        distance[~np.isin(labels, [region.source_label, region.predicted_label])] = np.inf
        nearest = np.argsort(distance)[:NEAREST]
        regions.append({"rank": rank, "pair": region.pair, "bug_score": region.bug_score,
                        "nearest_mean_aum": round(float(aum[nearest].mean()), 3)})
    out["regions"] = regions
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="kept run directories (bench_planted.py --keep)")
    parser.add_argument("--poisoned-from", type=Path, help="npz whose `y` holds the case's unpoisoned labels")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    clean = np.load(args.poisoned_from)["y"] if args.poisoned_from else None
    emit({"probe": "training margins (AUM)", "runs": [probe(run, clean) for run in args.runs]}, args.out)


if __name__ == "__main__":
    main()
