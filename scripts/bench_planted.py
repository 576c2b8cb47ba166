"""Planted-bug benchmark: can defuse find, and repair, a bug we put into a classifier on purpose?

Every case runs the product: ``run_pipeline`` (what ``defuse run`` calls) on the shipped
``configs/mnist-test-split.yaml``, with the data swapped for an npz of the official MNIST test split
(../shared/data/MNIST/raw; first 8,000 images: train, val and audit; last 2,000: test) whose *training
and validation* labels of one subgroup are switched to another class. The few values that differ from
the shipped config are listed in the output under ``deviations``, each with its reason.

Cases: slant (the 25% most right-slanted 7s relabelled 1), thin (the 25% thinnest-stroke 6s relabelled 1),
clean (nothing poisoned; its classifier is also the clean reference that plays the person).

Who labels: in the planted cases a simulated person, a labels file written from the clean reference
classifier's majority vote on each region's fresh samples ("not-a-bug" where it agrees with the model under
test), never from the planted ground truth; in the clean control, ``--labels auto`` (the conservative
suggestions), as a user who asks for them would run it.

Measured, reading only the run directories' artifacts, and grading only on the test split (no stage read it):

* visibility: the share of the planted subgroup's test images whose VAE reconstruction the poisoned model
  reads as the planted class (the ceiling for any latent search);
* the rank of the first region with the planted pair, its precision (the share of its fresh samples the
  clean reference reads as the source class while the poisoned model reads the planted class), its bug score,
  and whether that beats every region of the clean control; what ``--labels auto`` would say of it;
* valid failures per 1,000 classifier queries, against random sampling from the prior and against the
  reference search (Beta(50, 50) shift of the mean, 10 samples per source) at equal budget, from the audit split;
* repair: accuracy on the planted subgroup of the test split before/after, clean accuracy outside it, the largest
  per-class drop outside it, and the planted pair's failures re-found by the same search around the test images
  (verify.json);
* clean control: regions auto-labelled a bug, and clean test accuracy before/after the repair they lead to.

The audit split's labels are left clean: it models a small, carefully labelled set, as a test set is.
``--poison-audit`` poisons it too (a user whose every label carries the bug) and reports what that costs.

Run: ``python scripts/bench_planted.py [--cases slant,thin] [--no-repair] [--poison-audit] [--keep DIR]
[--out FILE]``. Prints JSON.
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
from defuse.config import DataConfig, RunConfig, config_from_mapping, load_config
from defuse.data import ImageDataModule, ImageSet, load_source
from defuse.distill import Regions
from defuse.identify import Discovery, latent_means, make_evaluate, select_sources
from defuse.label import auto_labels
from defuse.models import inference_copy, load_classifier, load_generator
from defuse.models.inference import predict_labels, reconstruct
from defuse.pipeline import run_pipeline
from defuse.rundir import RunDir
from defuse.seeding import numpy_rng, torch_generator

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "mnist-test-split.yaml"
# Values that differ from the shipped config, each with its reason. The figures this benchmark's README rows replace
# were measured with them; moving the benchmark onto the shipped values is the next issue's job.
DEVIATIONS = {
    "classifier.width": (16, "the benchmark's classifiers since its first figures; keeps three trainings short"),
    "classifier.epochs": (6, "as above"),
    "classifier.lr": (0.003, "as above"),
    "generator.epochs": (12, "as above: one VAE per case"),
    "generator.lr": (0.003, "as above"),
    "identify.max_sources": (1000, "1,000 of the 1,600 audit images: the figures it replaces searched 1,000 sources"),
    "identify.budget": (128, "as above: 128 queries per source"),
    "identify.batch_sources": (128, "throughput only"),
    "identify.min_radius": (2.0, "first shell at 2 posterior scales, as the figures it replaces"),
    "distill.max_regions": (100, "the simulated person labels every region, not the top 30"),
    "distill.umap": (False, "no picture is read here"),
    "trainer.progress_bar": (False, "output is JSON"),
}
# Not a config value but the same kind of deviation: the planted cases adopt the clean case's generator.ckpt.
SHARED_GENERATOR = ("generator.checkpoint (planted cases)", "the clean case's generator.ckpt: the VAE reads images "
                    "only, and the cases share every image and the seed, so each would train these very weights "
                    "(checked: the same sha256 in all three cases when each trained its own)")
PRECISION_SAMPLES = 256
VOTE_SAMPLES = 128


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


def subgroup(images: ImageSet, case: str, threshold: float) -> torch.Tensor:
    source, _, feature, sign = CASES[case]
    return (images.labels == source) & (feature(images.float_images()) * sign >= threshold)


# ----------------------------------------------------------------------------- data and config


def case_config(npz: Path, generator: Path | None = None) -> RunConfig:
    overrides = ["data.source=npz", f"data.root={npz}", *(f"{k}={json.dumps(v)}" for k, (v, _) in DEVIATIONS.items())]
    if generator is not None:
        overrides.append(f"generator.checkpoint={generator}")
    return load_config(SHIPPED, overrides)


def write_case_data(folder: Path, case: str, poison_audit: bool) -> tuple[Path, dict]:
    """The MNIST test split as an npz, with the case's subgroup relabelled in train and val (and audit if asked).

    Which rows are train, val and audit is read from the product's own split of the clean file, so the poison
    lands exactly where the run will train and select."""
    pool = load_source(DataConfig(source="idx")).pool
    x, y = pool.images[:, 0].numpy(), pool.labels.numpy().copy()
    clean = folder / "clean.npz"
    if not clean.exists():
        np.savez(clean, x=x, y=y)
    if case == "clean":
        return clean, {}
    data = ImageDataModule(case_config(clean).data, case_config(clean).seed)
    poisoned_splits = ("train", "val", "audit") if poison_audit else ("train", "val")
    rows = torch.cat([data.indices(name) for name in ("train", "val")])
    source, planted, feature, sign = CASES[case]
    fitted = ImageSet(pool.images[rows], pool.labels[rows], pool.classes)  # the threshold: train and val only
    values = feature(fitted.float_images()[fitted.labels == source]) * sign
    threshold = float(torch.quantile(values, 0.75))
    poisoned: dict[str, int] = {}
    for name in poisoned_splits:
        index = data.indices(name)
        hit = subgroup(ImageSet(pool.images[index], pool.labels[index], pool.classes), case, threshold).numpy()
        y[index.numpy()[hit]] = planted
        poisoned[name] = int(hit.sum())
    path = folder / f"{case}.npz"
    np.savez(path, x=x, y=y)
    return path, {"threshold": round(threshold, 4), "poisoned_labels": poisoned}


# ----------------------------------------------------------------------------- the person


@torch.no_grad()
def simulated_person(run: RunDir, reference: torch.nn.Module, tau: float, seed: int) -> Path:
    """A labels file: each region is what the clean reference reads on most of its fresh samples ("not-a-bug" where
    that is the model's own mistake). Read by the pipeline through `--labels FILE`, as a person's file would be."""
    regions, generator = Regions.load(run), load_generator(run.path("generator.ckpt"))
    rng = numpy_rng(seed, "bench.person")
    answers = {}
    for region in regions.regions:
        votes = predict_labels(reference, generator.decode(torch.from_numpy(region.sample(VOTE_SAMPLES, tau, rng))))
        majority = int(torch.bincount(votes, minlength=len(regions.classes)).argmax())
        answers[region.id] = "not-a-bug" if majority == region.predicted_label else majority
    path = run.path("person.yaml")
    path.write_text(yaml.safe_dump(answers))
    return path


# ----------------------------------------------------------------------------- baselines


@torch.no_grad()
def random_prior_yield(classifier, generator, judge, queries: int, threshold: float, seed: int,
                       screened: bool = False) -> float:
    """Valid failures per 1,000 decoded prior samples: the judge is sure of a class the classifier denies.

    ``screened``: give random sampling the search's screening too: draw prior samples until ``queries`` of them
    have a class the judge is sure of, and query only those (the rest cost no classifier query)."""
    rng = torch_generator(seed, "bench.random_prior")
    kept = []
    while sum(len(z) for z in kept) < queries:
        z = torch.randn(queries, generator.latent_dim, generator=rng)
        if screened:
            z = z[torch.from_numpy(judge.scores(z).max(axis=1) >= threshold)]
        kept.append(z)
    z = torch.cat(kept)[:queries]
    logits = make_evaluate(generator, classifier)(z)
    probs = judge.scores(z)
    valid_fail = (logits.argmax(dim=1).numpy() != probs.argmax(axis=1)) & (probs.max(axis=1) >= threshold)
    return 1000 * float(valid_fail.sum()) / queries


@torch.no_grad()
def reference_yield(classifier, generator, judge, images, labels, queries: int, threshold: float, seed: int,
                    samples_per_source: int = 10) -> float:
    """The reference implementation's search: z = mu + Beta(50, 50) noise, 10 samples per source, repeated
    over the sources until ``queries`` are spent. A failure counts when our judge calls it valid."""
    mu = latent_means(generator, images)
    torch.manual_seed(int(numpy_rng(seed, "bench.reference_search").integers(2**31)))
    beta = torch.distributions.Beta(torch.tensor(50.0), torch.tensor(50.0))
    evaluate = make_evaluate(generator, classifier)
    spent, valid = 0, 0
    while spent < queries:
        z = (mu[:, None] + beta.sample((len(mu), samples_per_source, mu.shape[1]))).reshape(-1, mu.shape[1])
        source = labels.repeat_interleave(samples_per_source)
        take = min(len(z), queries - spent)
        z, source = z[:take], source[:take]
        pred = evaluate(z).argmax(dim=1)
        valid += int(((pred != source).numpy() & (judge.validity(z, source.numpy()) >= threshold)).sum())
        spent += take
    return 1000 * valid / queries


# ----------------------------------------------------------------------------- one case


@torch.no_grad()
def discovery_figures(run: RunDir, config: RunConfig, case: str, reference, group: torch.Tensor | None) -> dict:
    model = inference_copy(load_classifier(run.path("classifier.ckpt")).model)  # as the search queries it
    generator = load_generator(run.path("generator.ckpt"))
    discovery, regions = Discovery.load(run), Regions.load(run)
    data = ImageDataModule(config.data, config.seed)
    test, audit = data.split("test"), data.split("audit")
    stats = discovery.failures.stats
    out: dict = {
        "clean_test_accuracy": round(float((predict_labels(model, test.float_images()) == test.labels)
                                           .float().mean()), 4),
        "sources": stats["sources"], "failures": stats["failures"], "queries": stats["queries"],
        "valid_failures_per_1000_queries": stats["valid_failures_per_1000_queries"],
        "sources_with_valid_failure": int(discovery.failures.table.loc[discovery.failures.table["valid"],
                                                                       "source_index"].nunique()),
        "regions": len(regions),
        "top_regions": [f"{r.pair} ({r.bug_score:.3f}, real {r.real_misread}/{r.real_neighbours})"
                        for r in regions.regions[:8]],
        "max_bug_score": max((r.bug_score for r in regions.regions), default=0.0),
        "auto_would_label_bug": sum(a.is_bug for a in auto_labels(regions, regions.classes,
                                    min_real_misread=config.label.auto_min_real_misread).values()),
    }
    budget = min(stats["queries"], 20_000)  # rates per 1,000 queries: 20k samples pin them to about +-10%
    threshold = config.identify.validity_threshold
    judge = discovery.judge
    out["random_prior_yield"] = round(random_prior_yield(model, generator, judge, budget, threshold, config.seed), 3)
    out["random_prior_screened_yield"] = round(random_prior_yield(model, generator, judge, budget, threshold,
                                                                  config.seed, screened=True), 3)
    searched = select_sources(model, generator, audit.float_images(), audit.labels, config.identify.max_sources,
                              config.seed).index  # the sources the search started from
    out["reference_search_yield"] = round(reference_yield(model, generator, judge, audit.float_images()[searched],
                                                          audit.labels[searched], budget, threshold, config.seed), 3)
    ours = stats["valid_failures_per_1000_queries"]
    for name in ("random_prior", "random_prior_screened", "reference_search"):
        out[f"yield_vs_{name}"] = round(ours / max(out[f"{name}_yield"], 1e-9), 2)
    if case == "clean":
        return out
    source, planted = CASES[case][:2]
    x = test.float_images()[group]
    out.update({
        "test_subgroup_size": int(group.sum()),
        "subgroup_read_as_planted": round(float((predict_labels(model, x) == planted).float().mean()), 4),
        "visibility": round(float((predict_labels(model, reconstruct(generator, x)) == planted).float().mean()), 4),
        "planted_rank": None, "planted_precision": None, "planted_bug_score": None,
    })
    auto = auto_labels(regions, regions.classes, min_real_misread=config.label.auto_min_real_misread)
    for region in regions.regions:
        if (region.source_label, region.predicted_label) == (source, planted):
            z = torch.from_numpy(region.sample(PRECISION_SAMPLES, config.distill.tau,
                                               numpy_rng(config.seed, "bench.precision")))
            decoded = generator.decode(z)
            hit = (predict_labels(reference, decoded) == source) & (predict_labels(model, decoded) == planted)
            out.update({"planted_rank": region.id, "planted_precision": round(float(hit.float().mean()), 4),
                        "planted_bug_score": region.bug_score,
                        "planted_real_misread": f"{region.real_misread}/{region.real_neighbours}",
                        "planted_auto_label": auto[region.id].label})
            break
    return out


@torch.no_grad()
def repair_figures(run: RunDir, config: RunConfig, case: str, group: torch.Tensor | None) -> dict:
    stages = run.manifest()["stages"]
    verified = json.loads(run.path("verify.json").read_text())
    test = ImageDataModule(config.data, config.seed).split("test")
    x, y = test.float_images(), test.labels
    before = predict_labels(load_classifier(run.path("classifier.ckpt")).model, x)
    after = predict_labels(load_classifier(run.path("repaired.ckpt")).model, x)
    correct = stages["correct"]["metrics"]
    out = {
        "labelled_bug_regions": stages["label"]["metrics"]["bugs"],
        "chosen": correct.get("chosen"),
        "reason": correct.get("reason"),
        "train_excluded_contradicting": correct.get("train_excluded_contradicting"),
        "val_excluded_contradicting": correct.get("val_excluded_contradicting"),
        "clean_accuracy": {k: verified["clean_accuracy"][k] for k in ("before", "after", "change", "change_ci95")},
        "correct_seconds": stages["correct"]["seconds"], "verify_seconds": stages["verify"]["seconds"],
    }
    outside = torch.ones_like(y, dtype=torch.bool) if group is None else ~group
    drops = [float((before[outside & (y == k)] == k).float().mean() - (after[outside & (y == k)] == k).float().mean())
             for k in range(int(y.max()) + 1)]
    out.update({
        "clean_accuracy_outside_subgroup_before": round(float((before[outside] == y[outside]).float().mean()), 4),
        "clean_accuracy_outside_subgroup_after": round(float((after[outside] == y[outside]).float().mean()), 4),
        "largest_per_class_drop_outside_subgroup": round(max(drops), 4),
    })
    if case != "clean":
        source, planted = CASES[case][:2]
        pair = verified.get("failures_by_pair", {}).get(f"{source} -> {planted}", {})
        out.update({
            "subgroup_accuracy_before": round(float((before[group] == source).float().mean()), 4),
            "subgroup_accuracy_after": round(float((after[group] == source).float().mean()), 4),
            "planted_pair_failures_on_test_before": pair.get("failures_before", 0),
            "planted_pair_failures_on_test_after": pair.get("failures_after", 0),
            "planted_pair_sources_on_test_before": pair.get("sources_before", 0),
            "planted_pair_sources_on_test_after": pair.get("sources_after", 0),
        })
    return out


def run_case(case: str, folder: Path, reference, do_repair: bool, poison_audit: bool) -> tuple[dict, RunDir]:
    start = time.perf_counter()
    npz, info = write_case_data(folder, case, poison_audit)
    config = case_config(npz, None if case == "clean" else folder / "clean" / "generator.ckpt")
    run = RunDir(folder / case)
    run_pipeline(config, run)  # stops before correct: nobody has labelled yet
    stages = run.manifest()["stages"]
    out: dict = {**info, "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
                 "reconstruction_accuracy": stages["identify"]["metrics"]["reconstruction_accuracy"]}
    test = ImageDataModule(config.data, config.seed).split("test")
    group = subgroup(test, case, info["threshold"]) if case != "clean" else None
    if case == "clean":
        reference = load_classifier(run.path("classifier.ckpt")).model
    out.update(discovery_figures(run, config, case, reference, group))
    if do_repair:
        labels = "auto" if case == "clean" else str(simulated_person(run, reference, config.distill.tau, config.seed))
        labelled = config_from_mapping(config.to_dict(), [f"label.mode={labels}"])
        run_pipeline(labelled, run)
        out["repair"] = {"labels": "auto" if case == "clean" else "simulated person (clean reference's vote)",
                         **repair_figures(run, labelled, case, group)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="slant,thin", help="planted cases to run (the clean control always runs)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the run directories here (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--no-repair", action="store_true", help="discovery only: no labels, correct or verify")
    parser.add_argument("--poison-audit", action="store_true", help="poison the audit split's labels too")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cases = ["clean", *(c.strip() for c in args.cases.split(",") if c.strip() and c.strip() != "clean")]
    unknown = [c for c in cases if c != "clean" and c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    t0 = time.perf_counter()
    deviations = {k: {"value": v, "reason": r} for k, (v, r) in DEVIATIONS.items()}
    deviations[SHARED_GENERATOR[0]] = {"value": "clean/generator.ckpt", "reason": SHARED_GENERATOR[1]}
    result: dict = {"config": str(SHIPPED.name), "deviations": deviations,
                    "poison_audit": args.poison_audit, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        reference = None
        clean_max = 0.0
        for case in cases:
            out, run = run_case(case, folder, reference, not args.no_repair, args.poison_audit)
            if case == "clean":
                reference = load_classifier(run.path("classifier.ckpt")).model
                clean_max = out["max_bug_score"]
                result["splits"] = run.metrics("fit-classifier").get("split_sizes")
            else:
                score = out.get("planted_bug_score")
                out["beats_clean_control"] = bool(score is not None and score > clean_max)
            result["cases"][case] = out
            progress(case, out)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
