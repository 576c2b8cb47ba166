"""Stage wiring: which stage writes what, from which config sections and artifacts, and when to skip it.

A stage is skipped when the manifest says it finished with the same fingerprint
(config sections + seed + sha256 of its input artifacts) and its outputs are intact.
Re-running a stage changes its outputs' hashes, so every stage downstream re-runs too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import json
import logging
import shutil
import sys

from defuse.config import RunConfig
from defuse.data import ImageDataModule
from defuse.distill import (
    REGIONS_DIR,
    REGIONS_JSON,
    UMAP_PNG,
    RealEvidence,
    Regions,
    distill,
    region_grids,
    save_grid_png,
    save_umap,
)
from defuse.fit import CLASSIFIER_CKPT, GENERATOR_CKPT, fit_classifier, fit_generator
from defuse.correct import CORRECT_DIR, contradicting_labels, correct, sample_regions
from defuse.label import LABELS_FILE, LabelBook, label_stage
from defuse.models.loading import save_classifier
from defuse.identify import FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL, Failures, identify, latent_means
from defuse.models.inference import predict_labels
from defuse.models.loading import load_classifier, load_generator
from defuse.rundir import RunDir, fingerprint
from defuse.validity import ValidityModel


def identify_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Fit the validity model on a held-out split's latents, search the configured split, write the failures."""
    import pytorch_lightning as pl

    pl.seed_everything(config.seed, verbose=False)
    data = ImageDataModule(config.data, config.seed)
    classifier = load_classifier(run.path(CLASSIFIER_CKPT)).model
    generator = load_generator(run.path(GENERATOR_CKPT))
    judged = data.split(config.identify.validity_split)
    validity = ValidityModel.fit(latent_means(generator, judged.float_images()).numpy(), judged.labels.numpy(),
                                 data.num_classes, seed=config.seed)
    validity.save(run.path(VALIDITY_MODEL))
    searched = data.split(config.identify.split)
    failures = identify(classifier, generator, searched.float_images(), searched.labels, validity, config.identify,
                        seed=config.seed, trainer=config.trainer)
    failures.save(run)
    return {**failures.stats, "validity_model_train_accuracy": round(validity.train_accuracy, 4)}


def distill_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Group the failures into ranked regions; draw each region's sample grid and the UMAP map."""
    failures = Failures.load(run)
    loaded = load_classifier(run.path(CLASSIFIER_CKPT))
    generator = load_generator(run.path(GENERATOR_CKPT))
    validity = ValidityModel.load(run.path(VALIDITY_MODEL))
    classes = loaded.classes or tuple(str(i) for i in range(len(validity.intercept)))
    held_out = ImageDataModule(config.data, config.seed).split(config.identify.validity_split)
    images = held_out.float_images()
    real = RealEvidence(latent_means(generator, images).numpy(), held_out.labels.numpy(),
                        predict_labels(loaded.model, images).numpy())
    regions = distill(failures, loaded.model, generator, validity, classes, config.distill, seed=config.seed,
                      real=real)
    shutil.rmtree(run.path(REGIONS_DIR), ignore_errors=True)  # no stale region files from an earlier run
    run.path(REGIONS_DIR).mkdir(parents=True, exist_ok=True)
    regions.save(run, classes)
    for region_id, images in region_grids(regions, generator, config.distill.tau, config.seed).items():
        save_grid_png(run.path(f"{REGIONS_DIR}/region_{region_id:02d}.png"), images)
    run.path(UMAP_PNG).unlink(missing_ok=True)
    if config.distill.umap and len(failures) >= 10:
        save_umap(run.path(UMAP_PNG), failures, regions, config.seed)
    top = regions.regions[0] if regions.regions else None
    return {**regions.stats, "top_region": top.pair if top else None, "top_bug_score": top.bug_score if top else None}


LABELS_FOR = "labels.regions-sha256"  # which regions.json the answers in labels.jsonl belong to

log = logging.getLogger(__name__)


def labelling_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """One label per region from a person (prompt), a labels file, or the suggestions (auto).

    Answers are keyed by region id, and ids are reassigned when distill runs again: answers given for
    an earlier regions.json are moved aside (never deleted) before labelling the new regions.
    """
    regions = Regions.load(run)
    classes = tuple(json.loads(run.path(REGIONS_JSON).read_text())["classes"])
    regions_hash = run.artifact_hash(REGIONS_JSON)
    labels, owner = run.path(LABELS_FILE), run.path(LABELS_FOR)
    if labels.exists() and (not owner.exists() or owner.read_text().strip() != regions_hash):
        aside = labels.with_name(f"labels.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        labels.rename(aside)
        log.warning("regions.json changed since %s was written: its answers were moved to %s.", labels, aside)
    owner.write_text(regions_hash + "\n")
    mode = None if config.label.mode == "prompt" else config.label.mode
    previews = None
    if mode is None and sys.stdin.isatty():  # decoding previews is only worth it when a person looks
        previews = region_grids(regions, load_generator(run.path(GENERATOR_CKPT)), config.distill.tau, config.seed)
    return label_stage(run, regions, classes, mode, previews=previews)


REPAIRED_CKPT = "repaired.ckpt"


def correct_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Fine-tune the classifier on fresh samples of the regions labelled with a class; write repaired.ckpt."""
    loaded = load_classifier(run.path(CLASSIFIER_CKPT))
    if "arch" not in loaded.hparams:
        raise ValueError("Correcting a classifier you brought (TorchScript or factory) is not supported yet: "
                         "defuse can only fine-tune the classifiers it trains.")
    answers = LabelBook(run.path(LABELS_FILE)).answers()
    bug_labels = {region: int(answer.label) for region, answer in answers.items() if answer.is_bug}
    if not bug_labels:  # nothing to learn: the repaired model is the original, and the report says why
        log.warning("No region is labelled with a class (all are not-a-bug, skipped or unanswered): "
                    "repaired.ckpt keeps the original weights.")
        save_classifier(run.path(REPAIRED_CKPT), loaded.model, loaded.hparams)
        return {"labelled_regions": 0, "chosen": None, "reason": "no region labelled with a class"}
    regions = Regions.load(run)
    generator = load_generator(run.path(GENERATOR_CKPT))
    data = ImageDataModule(config.data, config.seed)
    tau = config.distill.tau
    validity = ValidityModel.load(run.path(VALIDITY_MODEL))
    train_regions = sample_regions(regions, bug_labels, generator, config.correct.samples_per_region, tau,
                                   config.seed + 11, validity, config.correct.min_validity)
    val_regions = sample_regions(regions, bug_labels, generator, config.correct.val_samples_per_region, tau,
                                 config.seed + 12, validity, config.correct.min_validity)
    if len(train_regions.labels) == 0 or len(val_regions.labels) == 0:
        log.warning("The validity judge gives none of the labelled regions' fresh samples their label with at least "
                    "correct.min_validity=%s: nothing to train on, so repaired.ckpt keeps the original weights. "
                    "Check the labels, or lower correct.min_validity (0 trains on every sample).",
                    config.correct.min_validity)
        save_classifier(run.path(REPAIRED_CKPT), loaded.model, loaded.hparams)
        return {"labelled_regions": len(bug_labels), "chosen": None,
                "reason": "no region sample passes correct.min_validity"}
    workdir = run.path(CORRECT_DIR)
    key = fingerprint({"correct": config.section("correct", "data", "trainer"), "labels": bug_labels,
                       "classifier": run.artifact_hash(CLASSIFIER_CKPT), "regions": run.artifact_hash(REGIONS_JSON),
                       "validity": run.artifact_hash(VALIDITY_MODEL)})
    if (workdir / "KEY").exists() and (workdir / "KEY").read_text().strip() != key:
        shutil.rmtree(workdir)  # checkpoints of another configuration: resuming from them would be wrong
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "KEY").write_text(key + "\n")
    val, train = data.split("val"), data.split("train")
    val_exclude = contradicting_labels(regions, bug_labels, latent_means(generator, val.float_images()).numpy(),
                                       val.labels.numpy(), validity)
    train_exclude = contradicting_labels(regions, bug_labels, latent_means(generator, train.float_images()).numpy(),
                                         train.labels.numpy(), validity)
    repaired, summary = correct(loaded.model, data, train_regions, val_regions, config.correct, workdir,
                                trainer=config.trainer, seed=config.seed, val_exclude=val_exclude,
                                train_exclude=train_exclude)
    save_classifier(run.path(REPAIRED_CKPT), repaired, loaded.hparams)
    return {"labelled_regions": len(bug_labels), **summary}


VERIFY_JSON = "verify.json"


def verify_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Before/after on the test split, on fresh region samples, and by re-running the same search on the repair."""
    from defuse.rundir import atomic_write_json
    from defuse.verify import verify

    before = load_classifier(run.path(CLASSIFIER_CKPT))
    after = load_classifier(run.path(REPAIRED_CKPT)).model
    generator = load_generator(run.path(GENERATOR_CKPT))
    regions = Regions.load(run)
    answers = LabelBook(run.path(LABELS_FILE)).answers()
    bug_labels = {region: int(answer.label) for region, answer in answers.items() if answer.is_bug}
    data = ImageDataModule(config.data, config.seed)
    test, searched = data.split("test"), data.split(config.identify.split)
    failures = Failures.load(run)
    validity = ValidityModel.load(run.path(VALIDITY_MODEL))
    again = identify(after, generator, searched.float_images(), searched.labels, validity, config.identify,
                     seed=config.seed, trainer=config.trainer)
    result = verify(
        before.model, after, test.float_images(), test.labels, data.classes, regions, bug_labels, generator,
        tau=config.distill.tau, failures_before=(failures.table, failures.z), failures_after=(again.table, again.z),
        seed=config.seed,
    )
    atomic_write_json(run.path(VERIFY_JSON), result)
    clean = result["clean_accuracy"]
    return {"clean_accuracy_before": clean["before"], "clean_accuracy_after": clean["after"],
            "clean_change_ci95": clean["change_ci95"], **{f"rediscovery_{k}": v for k, v in
                                                          result.get("rediscovery", {}).items()}}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunConfig, RunDir], dict[str, Any]]
    outputs: tuple[str, ...]  # file names, or glob patterns for a variable number of files
    sections: tuple[str, ...]  # config sections the stage reads
    inputs: tuple[str, ...] = ()  # artifacts of earlier stages it reads
    always: bool = False  # never skipped (labelling resumes where the person stopped)


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool
    seconds: float
    metrics: dict[str, Any]


STAGES: tuple[Stage, ...] = (
    Stage("fit-classifier", fit_classifier, (CLASSIFIER_CKPT,), ("data", "classifier", "trainer")),
    Stage("fit-generator", fit_generator, (GENERATOR_CKPT,), ("data", "generator", "trainer"), (CLASSIFIER_CKPT,)),
    Stage("identify", identify_stage, (FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL), ("data", "identify"),
          (CLASSIFIER_CKPT, GENERATOR_CKPT)),
    Stage("distill", distill_stage, (REGIONS_JSON, f"{REGIONS_DIR}/*", UMAP_PNG), ("distill", "data", "identify"),
          (FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL, CLASSIFIER_CKPT, GENERATOR_CKPT)),
    Stage("label", labelling_stage, (LABELS_FILE,), ("label",), (REGIONS_JSON,), always=True),
    Stage("correct", correct_stage, (REPAIRED_CKPT,), ("correct", "data", "trainer"),
          (LABELS_FILE, REGIONS_JSON, CLASSIFIER_CKPT, GENERATOR_CKPT, VALIDITY_MODEL)),
    Stage("verify", verify_stage, (VERIFY_JSON,), ("data", "identify", "distill"),
          (REPAIRED_CKPT, CLASSIFIER_CKPT, GENERATOR_CKPT, LABELS_FILE, REGIONS_JSON, FAILURES_TABLE, VALIDITY_MODEL)),
)
# The pipeline of ../shared/DESIGN.md beyond what is built so far, in order.
NOT_BUILT_YET: tuple[str, ...] = ("check", "report")


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    known = ", ".join(s.name for s in STAGES)
    raise ValueError(f"Unknown stage {name!r}; the stages are: {known}.")


def stage_fingerprint(stage: Stage, config: RunConfig, run: RunDir) -> str:
    inputs = {name: run.artifact_hash(name) for name in stage.inputs}
    return fingerprint({"stage": stage.name, "config": config.section(*stage.sections), "inputs": inputs})


def run_stage(stage: Stage, config: RunConfig, run: RunDir, force: bool = False) -> StageResult:
    """Run one stage unless its outputs are current; record it in the manifest either way."""
    for name in stage.inputs:
        if not run.path(name).exists():
            producer = next((s.name for s in STAGES if name in s.outputs), "an earlier stage")
            raise FileNotFoundError(
                f"{run.path(name)} is missing: stage {stage.name!r} needs it. Run `defuse {producer}` first."
            )
    digest = stage_fingerprint(stage, config, run)
    if not force and not stage.always and run.is_current(stage.name, digest):
        return StageResult(stage.name, True, 0.0, run.metrics(stage.name))
    start = time.perf_counter()
    with run.running(stage.name, config.to_dict(), config.seed, digest) as record:
        record.metrics = stage.run(config, run)
        record.outputs = {name: "" for name in _expand(run, stage.outputs)}
    return StageResult(stage.name, False, time.perf_counter() - start, record.metrics)


def run_pipeline(config: RunConfig, run: RunDir, force: tuple[str, ...] = ()) -> list[StageResult]:
    """Run every built stage in order; ``force`` names stages to re-run even when current ("all" for every one)."""
    for name in force:
        if name != "all":
            stage_named(name)
    return [run_stage(s, config, run, force=s.name in force or "all" in force) for s in STAGES]


def _expand(run: RunDir, patterns: tuple[str, ...]) -> list[str]:
    """Output names with glob patterns resolved to the files that exist (an optional picture may be absent)."""
    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            names += sorted(str(p.relative_to(run.root)) for p in run.root.glob(pattern) if p.is_file())
        elif run.path(pattern).exists():
            names.append(pattern)
    return names
