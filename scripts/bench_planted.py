"""Planted-bug benchmark: can defuse find a bug we put into a classifier on purpose?

On the official MNIST test split (../shared/data/MNIST/raw; fixed split: first 8k train,
last 2k test) we poison the *training* labels of a well-defined subgroup, train a
classifier through defuse's API, run identify + distill, and measure:

* visibility: the share of the planted subgroup's test images whose VAE reconstruction
  the poisoned model reads as the planted class (the ceiling for any latent search);
* the rank of the first region with the planted pair, and its precision: the share of
  its fresh samples that the clean reference classifier reads as the source class while
  the poisoned one reads the planted class;
* whether that region's bug score beats every region of the clean control;
* the validity judge fitted on the poisoned training labels instead (as the prototype did), for comparison
  of how much of the planted subgroup it still calls the source class;
* valid failures per 1,000 classifier queries, against random sampling from the prior
  and against the reference search (Beta(50, 50) shift of the mean, 10 samples per
  source) at equal budget;
* wall time per case.

Cases: slant (the 25% most right-slanted 7s relabelled 1), thin (the 25% thinnest-stroke
6s relabelled 1), clean (no poisoning; its classifier is also the clean reference).

Repair (planted cases; off with --no-repair): a person is simulated by a labels file written from the
clean reference classifier's majority vote on each region's fresh samples ("not-a-bug" where it agrees
with the poisoned model), never from the planted ground truth; then correct + verify, and:
accuracy on the planted subgroup of the test split before/after, clean test accuracy outside the
subgroup before/after, the largest per-class drop, and re-discovery of the planted pair (failures of
that pair found by the same search before and after).

Run: ``python scripts/bench_planted.py [--cases slant,thin,clean] [--no-repair] [--out FILE]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np
import pytorch_lightning as pl
import torch

import tempfile
from pathlib import Path

import yaml

from defuse.config import (
    ClassifierConfig,
    CorrectConfig,
    DataConfig,
    DistillConfig,
    GeneratorConfig,
    IdentifyConfig,
    TrainerConfig,
)
from defuse.correct import contradicting_labels, correct, sample_regions
from defuse.label import file_labels
from defuse.data import ImageDataModule, ImageSet
from defuse.distill import RealEvidence, Regions, distill
from defuse.fit import reconstruction_report, train_classifier, train_vae
from defuse.identify import identify, latent_means, make_evaluate, select_sources
from defuse.models.inference import predict_labels, reconstruct
from defuse.validity import ValidityModel

SEED = 0
DATA = DataConfig(source="idx", test_size=2000, shuffle=False, val_size=0.1, batch_size=128)
CLASSIFIER = ClassifierConfig(width=16, epochs=6, lr=3e-3)
GENERATOR = GeneratorConfig(latent_dim=16, width=32, epochs=12, lr=3e-3)
# The search's defaults otherwise, but for the first shell: at 1,000 sources of the MNIST split, shells from 2 posterior
# scales spend fewer queries where valid flips are rare (the default, 1.0, suits small splits such as digits, where a
# first shell at 2.0 left all but 4 of 439 sources without a valid failure).
IDENTIFY = IdentifyConfig(budget=128, batch_sources=128, max_sources=1000, min_radius=2.0)
DISTILL = DistillConfig(umap=False, fresh_samples=128, max_regions=100)  # the simulated person labels them all
CORRECT = CorrectConfig()
TRAINER = TrainerConfig(progress_bar=False)
PRECISION_SAMPLES = 256


# ----------------------------------------------------------------------------- subgroups


def slant(images: torch.Tensor) -> torch.Tensor:
    """Shear of the ink from its second-order moments: > 0 leans right (top to the right)."""
    x = images[:, 0].double()
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    mass = x.sum(dim=(1, 2)).clamp_min(1e-9)
    r0 = (x * rows).sum(dim=(1, 2)) / mass
    c0 = (x * cols).sum(dim=(1, 2)) / mass
    dr, dc = rows - r0.view(-1, 1, 1), cols - c0.view(-1, 1, 1)
    mu11 = (x * dr * dc).sum(dim=(1, 2)) / mass
    mu02 = (x * dr * dr).sum(dim=(1, 2)) / mass
    return (-mu11 / mu02.clamp_min(1e-9)).float()  # rows grow downwards: a right lean has negative covariance


def stroke_width(images: torch.Tensor) -> torch.Tensor:
    """Mean stroke width: 2 * ink area / ink perimeter, on the image thresholded at 0.5."""
    ink = (images[:, 0] > 0.5).float()
    padded = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    neighbours = torch.stack([padded[:, 1:-1, :-2], padded[:, 1:-1, 2:], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]])
    boundary = ink * (neighbours.min(dim=0).values == 0).float()
    return 2 * ink.sum(dim=(1, 2)) / boundary.sum(dim=(1, 2)).clamp_min(1)


CASES = {
    # name: (source class, planted class, feature, take the top (+1) or bottom (-1) quarter)
    "slant": (7, 1, slant, +1),
    "thin": (6, 1, stroke_width, -1),
}


def subgroup(images: ImageSet, feature, sign: int, source: int, threshold: float) -> torch.Tensor:
    value = feature(images.float_images()) * sign
    return (images.labels == source) & (value >= threshold)


def quartile_threshold(images: ImageSet, feature, sign: int, source: int) -> float:
    value = feature(images.float_images()[images.labels == source]) * sign
    return float(torch.quantile(value, 0.75))


def poisoned(data: ImageDataModule, case: str) -> tuple[ImageDataModule, dict]:
    """A copy of ``data`` whose train and val labels of the planted subgroup are switched."""
    source, planted, feature, sign = CASES[case]
    train, val = data.split("train"), data.split("val")
    threshold = quartile_threshold(ImageSet(torch.cat([train.images, val.images]),
                                            torch.cat([train.labels, val.labels]), train.classes),
                                   feature, sign, source)
    out = ImageDataModule(data.config, data.seed)
    out.train = replace(train, labels=torch.where(subgroup(train, feature, sign, source, threshold), planted, train.labels))
    out.val = replace(val, labels=torch.where(subgroup(val, feature, sign, source, threshold), planted, val.labels))
    out.test = data.split("test")
    test_group = subgroup(out.test, feature, sign, source, threshold)
    return out, {"threshold": threshold, "poisoned_train": int((out.train.labels != train.labels).sum()),
                 "poisoned_train_mask": (out.train.labels != train.labels).numpy(),
                 "poisoned_val": int((out.val.labels != val.labels).sum()), "test_subgroup": test_group}


# ----------------------------------------------------------------------------- baselines


@torch.no_grad()
def random_prior_yield(classifier, generator, validity, queries: int, threshold: float, seed: int,
                       screened: bool = False) -> float:
    """Valid failures per 1,000 decoded prior samples: the validity model is sure of a class the classifier denies.

    ``screened``: give random sampling the search's screening too: draw prior samples until ``queries`` of them
    have a class the validity model is sure of, and query only those (the rest cost no classifier query)."""
    rng = torch.Generator().manual_seed(seed)
    kept = []
    while sum(len(z) for z in kept) < queries:
        z = torch.randn(queries, generator.latent_dim, generator=rng)
        if screened:
            z = z[torch.from_numpy(validity.scores(z).max(axis=1) >= threshold)]
        kept.append(z)
    z = torch.cat(kept)[:queries]
    logits = make_evaluate(generator, classifier)(z)
    probs = validity.scores(z)
    label = probs.argmax(axis=1)
    valid_fail = (logits.argmax(dim=1).numpy() != label) & (probs.max(axis=1) >= threshold)
    return 1000 * float(valid_fail.sum()) / queries


@torch.no_grad()
def reference_yield(classifier, generator, validity, images, labels, index, queries: int, threshold: float,
                    seed: int, samples_per_source: int = 10) -> float:
    """The reference implementation's search: z = mu + Beta(50, 50) noise, 10 samples per source, repeated
    over the sources until ``queries`` are spent. A failure is kept when it is valid by our validity model."""
    rng = torch.Generator().manual_seed(seed)
    mu = latent_means(generator, images[index])
    y = labels[index]
    beta = torch.distributions.Beta(torch.tensor(50.0), torch.tensor(50.0))
    evaluate = make_evaluate(generator, classifier)
    spent, valid = 0, 0
    torch.manual_seed(seed)
    while spent < queries:
        z = (mu[:, None] + beta.sample((len(mu), samples_per_source, mu.shape[1]))).reshape(-1, mu.shape[1])
        source = y.repeat_interleave(samples_per_source)
        take = min(len(z), queries - spent)
        z, source = z[:take], source[:take]
        pred = evaluate(z).argmax(dim=1)
        p_source = validity.validity(z, source.numpy())
        valid += int(((pred != source).numpy() & (p_source >= threshold)).sum())
        spent += take
    return 1000 * valid / queries


# ----------------------------------------------------------------------------- the benchmark


@torch.no_grad()
def planted_precision(regions: Regions, pair: tuple[int, int], poisoned_model, reference_model, generator,
                      tau: float) -> tuple[int | None, float | None, float | None]:
    for region in regions.regions:
        if (region.source_label, region.predicted_label) == pair:
            z = torch.from_numpy(region.sample(PRECISION_SAMPLES, tau, np.random.default_rng(SEED + 7)))
            x = generator.decode(z)
            hit = (predict_labels(reference_model, x) == pair[0]) & (predict_labels(poisoned_model, x) == pair[1])
            return region.id, round(float(hit.float().mean()), 4), region.bug_score
    return None, None, None


@torch.no_grad()
def simulated_labels(regions: Regions, reference, vae, classes, folder: Path) -> dict[int, int]:
    """The person: the clean reference classifier's majority vote on 128 fresh samples of each region, written to a
    labels file and read back through defuse's own labels-file reader."""
    rng = np.random.default_rng(SEED + 21)
    answers = {}
    for region in regions.regions:
        votes = predict_labels(reference, vae.decode(torch.from_numpy(region.sample(128, DISTILL.tau, rng))))
        majority = int(torch.bincount(votes, minlength=len(classes)).argmax())
        answers[region.id] = "not-a-bug" if majority == region.predicted_label else majority
    path = folder / "labels.yaml"
    path.write_text(yaml.safe_dump(answers))
    return {rid: int(a.label) for rid, a in file_labels(path, regions, classes).items() if a.is_bug}


def repair(case: str, case_data: ImageDataModule, model, reference, vae, validity, regions: Regions, failures,
           info: dict, classes) -> dict:
    start = time.perf_counter()
    source, planted = CASES[case][:2]
    group = info["test_subgroup"]
    test = case_data.split("test")
    x, y = test.float_images(), test.labels
    with tempfile.TemporaryDirectory() as tmp:
        bug_labels = simulated_labels(regions, reference, vae, classes, Path(tmp))
        if not bug_labels:
            return {"labelled_bug_regions": 0}
        train_regions = sample_regions(regions, bug_labels, vae, CORRECT.samples_per_region, DISTILL.tau, SEED + 11,
                                       validity, CORRECT.min_validity)
        val_regions = sample_regions(regions, bug_labels, vae, CORRECT.val_samples_per_region, DISTILL.tau, SEED + 12,
                                     validity, CORRECT.min_validity)
        val, train = case_data.split("val"), case_data.split("train")
        val_exclude = contradicting_labels(regions, bug_labels, latent_means(vae, val.float_images()).numpy(),
                                           val.labels.numpy(), validity)
        train_exclude = contradicting_labels(regions, bug_labels, latent_means(vae, train.float_images()).numpy(),
                                             train.labels.numpy(), validity)
        repaired, summary = correct(model, case_data, train_regions, val_regions, CORRECT, Path(tmp) / "correct",
                                    trainer=TRAINER, seed=SEED, val_exclude=val_exclude, train_exclude=train_exclude)
    before, after = predict_labels(model, x), predict_labels(repaired, x)
    outside = ~group
    per_class_drop = max(
        float((before[outside & (y == k)] == k).float().mean() - (after[outside & (y == k)] == k).float().mean())
        for k in range(len(classes))
    )
    again = identify(repaired, vae, x, y, validity, IDENTIFY, seed=SEED, trainer=TRAINER)
    in_pair = lambda t: (t.source_label == source) & (t.predicted_label == planted)  # noqa: E731
    pair_before, pair_after = int(in_pair(failures.table).sum()), int(in_pair(again.table).sum())
    # The walk finds up to failures_per_source failures per source: also count the sources that fail that way.
    sources_before = int(failures.table.loc[in_pair(failures.table), "source_index"].nunique())
    sources_after = int(again.table.loc[in_pair(again.table), "source_index"].nunique())
    return {
        "labelled_bug_regions": len(bug_labels),
        "planted_pair_regions_labelled_source": sum(
            1 for r in regions.regions if (r.source_label, r.predicted_label) == (source, planted)
            and bug_labels.get(r.id) == source),
        "chosen": summary.get("chosen"),
        "val_excluded_contradicting": summary.get("val_excluded_contradicting"),
        "val_poisoned": info["poisoned_val"],
        "train_excluded_contradicting": summary.get("train_excluded_contradicting"),
        "train_excluded_poisoned": int((train_exclude & info["poisoned_train_mask"]).sum()),
        "train_poisoned": info["poisoned_train"],
        "region_samples_trained": len(train_regions.labels),
        "subgroup_accuracy_before": round(float((before[group] == source).float().mean()), 4),
        "subgroup_accuracy_after": round(float((after[group] == source).float().mean()), 4),
        "clean_accuracy_outside_subgroup_before": round(float((before[outside] == y[outside]).float().mean()), 4),
        "clean_accuracy_outside_subgroup_after": round(float((after[outside] == y[outside]).float().mean()), 4),
        "largest_per_class_drop_outside_subgroup": round(per_class_drop, 4),
        "planted_pair_failures_before": pair_before,
        "planted_pair_failures_after": pair_after,
        "planted_pair_rediscovery_drop": round(1 - pair_after / pair_before, 4) if pair_before else None,
        "planted_pair_sources_before": sources_before,
        "planted_pair_sources_after": sources_after,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_case(case: str, data: ImageDataModule, vae, reference, classes,
             do_repair: bool = True) -> tuple[dict, Regions | None, object]:
    start = time.perf_counter()
    pl.seed_everything(SEED, verbose=False)
    info: dict = {}
    if case == "clean":
        model, case_data = reference, data
    else:
        case_data, info = poisoned(data, case)
        model, _ = train_classifier(case_data, CLASSIFIER, TRAINER, root="/tmp")
    test = case_data.split("test")
    x, y = test.float_images(), test.labels
    out: dict = {"clean_test_accuracy": round(float((predict_labels(model, x) == y).float().mean()), 4)}
    if case != "clean":
        source, planted = CASES[case][:2]
        group = info["test_subgroup"]
        recon = reconstruct(vae, x[group])
        train = case_data.split("train")
        poisoned_judge = ValidityModel.fit(latent_means(vae, train.float_images()).numpy(), train.labels.numpy(),
                                           len(classes), seed=SEED)
        held_out_judge = ValidityModel.fit(latent_means(vae, x).numpy(), y.numpy(), len(classes), seed=SEED)
        group_z = latent_means(vae, x[group]).numpy()
        out.update({
            "subgroup_validity_judge_fitted_on_poisoned_train": round(float(
                poisoned_judge.predict_proba(group_z)[:, source].mean()), 4),
            "subgroup_validity_judge_fitted_on_held_out": round(float(
                held_out_judge.predict_proba(group_z)[:, source].mean()), 4),
            "poisoned_train_labels": info["poisoned_train"],
            "test_subgroup_size": int(group.sum()),
            "subgroup_read_as_planted": round(float((predict_labels(model, x[group]) == planted).float().mean()), 4),
            "visibility": round(float((predict_labels(model, recon) == planted).float().mean()), 4),
        })
    # As in the pipeline: the validity judge is fitted on the held-out (clean) split, not the poisoned training labels.
    validity = ValidityModel.fit(latent_means(vae, x).numpy(), y.numpy(), len(classes), seed=SEED)
    t_identify = time.perf_counter()
    failures = identify(model, vae, x, y, validity, IDENTIFY, seed=SEED, trainer=TRAINER)
    t_distill = time.perf_counter()
    real = RealEvidence(latent_means(vae, x).numpy(), y.numpy(), predict_labels(model, x).numpy())
    regions = distill(failures, model, vae, validity, classes, DISTILL, seed=SEED, real=real)
    stats = failures.stats
    out.update({
        "sources": stats["sources"], "failures": stats["failures"], "queries": stats["queries"],
        "valid_failures_per_1000_queries": stats["valid_failures_per_1000_queries"],
        "regions": len(regions),
        "top_regions": [f"{r.pair} ({r.bug_score:.3f}, real {r.real_misread}/{r.real_neighbours})"
                        for r in regions.regions[:8]],
        "identify_seconds": round(t_distill - t_identify, 1),
        "distill_seconds": round(time.perf_counter() - t_distill, 1),
    })
    selection = select_sources(model, vae, x, y, IDENTIFY.max_sources, SEED)
    budget = min(stats["queries"], 20_000)  # rates per 1,000 queries: 20k samples pin them to ~±10%
    out["random_prior_yield"] = round(random_prior_yield(model, vae, validity, budget, IDENTIFY.validity_threshold, SEED), 3)
    out["random_prior_screened_yield"] = round(random_prior_yield(model, vae, validity, budget,
                                                                  IDENTIFY.validity_threshold, SEED, screened=True), 3)
    out["reference_search_yield"] = round(reference_yield(model, vae, validity, x, y, selection.index, budget,
                                                          IDENTIFY.validity_threshold, SEED), 3)
    ours = stats["valid_failures_per_1000_queries"]
    out["yield_vs_random"] = round(ours / max(out["random_prior_yield"], 1e-9), 2)
    out["yield_vs_reference"] = round(ours / max(out["reference_search_yield"], 1e-9), 2)
    out["yield_vs_random_screened"] = round(ours / max(out["random_prior_screened_yield"], 1e-9), 2)
    # Not near-duplicates only: how many sources the valid failures come from, and how many queries each cost.
    out["sources_with_valid_failure"] = int(failures.table.loc[failures.table["valid"], "source_index"].nunique())
    if case != "clean":
        rank, precision, score = planted_precision(regions, CASES[case][:2], model, reference, vae, DISTILL.tau)
        out.update({"planted_rank": rank, "planted_precision": precision, "planted_bug_score": score})
        if do_repair:
            out["repair"] = repair(case, case_data, model, reference, vae, validity, regions, failures, info, classes)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out, regions, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="clean,slant,thin", help="comma-separated subset of clean,slant,thin")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--no-repair", action="store_true", help="discovery only: skip label + correct + verify")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    pl.seed_everything(SEED, verbose=False)
    data = ImageDataModule(DATA, SEED)
    data.setup()
    classes = data.classes
    timings = {}
    t = time.perf_counter()
    reference, _ = train_classifier(data, CLASSIFIER, TRAINER, root="/tmp")
    timings["reference_classifier"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pl.seed_everything(SEED, verbose=False)
    vae, _ = train_vae(data, GENERATOR, TRAINER, root="/tmp")
    timings["vae"] = round(time.perf_counter() - t, 1)
    test = data.split("test")
    result: dict = {"seed": SEED, "generator": reconstruction_report(reference, vae, test.float_images(), test.labels),
                    "cases": {}}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if "clean" not in cases:
        cases = ["clean", *cases]  # the clean control's scores are needed to judge the planted cases
    clean_scores: list[float] = []
    for case in cases:
        out, regions, _ = run_case(case, data, vae, reference, classes, do_repair=not args.no_repair)
        if case == "clean":
            clean_scores = [r.bug_score for r in regions.regions]
            out["max_bug_score"] = max(clean_scores, default=0.0)
        else:
            score = out.get("planted_bug_score")
            out["beats_clean_control"] = bool(score is not None and score > max(clean_scores, default=0.0))
        result["cases"][case] = out
        print(f"[{case}] {json.dumps(out)}", file=sys.stderr)
    timings["total"] = round(time.perf_counter() - t0, 1)
    result["timings"] = timings
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
