"""Stage wiring: which stage writes what, from which config sections and artifacts, and when to skip it.

Each adapter here loads artifacts, calls its stage module's one public function and saves the artifact it
returns; every decision (fallbacks, sampling, exclusions, which split is read) lives in the stage module, where
the benchmarks call it too. A stage is skipped when the manifest says it finished with the same fingerprint
(config sections without presentation keys + seed + sha256 of its input artifacts) and its outputs are intact.
Re-running a stage changes its outputs' hashes, so every stage downstream re-runs too. The pipeline stops
after ``label`` while regions await a person's label: nothing is repaired unasked.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    AWAITING_LABELS,
    CHECK_AFTER,
    CHECK_BEFORE,
    CHECKS_DIR,
    CLASSIFIER_CKPT,
    CORRECT_DIR,
    DRIFT_TOLERANCE,
    FAILURES_TABLE,
    FAILURES_Z,
    GENERATOR_CKPT,
    LABEL_ISSUES,
    LABEL_REVIEW,
    LABEL_REVIEW_TODO,
    LABELS_FILE,
    REGIONS_DIR,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    REGIONS_JSON,
    REPAIRED_CKPT,
    UMAP_PNG,
    VALIDITY_MODEL,
    VERIFY_JSON,
)
from defuse import cache
from defuse.config import RunConfig, config_from_mapping, path_fields
from defuse.quiet import quiet_libraries
from defuse.rundir import RunDir, defuse_version, fingerprint, path_digest

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# The adapters import their stage modules when they run: knowing the pipeline's shape (the CLI's --help, the stage
# table) then costs no torch or Lightning import, which takes seconds.


def fit_classifier_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the classifier under test (or adopt the user's); write classifier.ckpt."""
    from defuse.fit import fit_classifier

    return fit_classifier(config, run)


def fit_generator_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the VAE on the images (or adopt generator.checkpoint); write generator.ckpt."""
    from defuse.fit import fit_generator

    return fit_generator(config, run)


def identify_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Fit the validity judge on the audit split and search around its images; write failures and judge."""
    from defuse.data import ImageDataModule
    from defuse.identify import discover
    from defuse.models.loading import load_classifier, load_generator

    data = ImageDataModule(config.data, config.seed)
    discovery = discover(load_classifier(run.path(CLASSIFIER_CKPT)).model, load_generator(run.path(GENERATOR_CKPT)),
                         data.split(config.identify.split), data.split(config.identify.validity_split),
                         config.identify, seed=config.seed, trainer=config.trainer)
    discovery.save(run)
    return discovery.metrics


def distill_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Group the failures into ranked regions, with real evidence from the audit split; draw their pictures."""
    from defuse.data import ImageDataModule
    from defuse.distill import RealEvidence, distill, save_pictures
    from defuse.identify import Discovery
    from defuse.models.inference import latent_means
    from defuse.models.loading import load_classifier, load_generator

    discovery = Discovery.load(run)
    loaded = load_classifier(run.path(CLASSIFIER_CKPT))
    generator = load_generator(run.path(GENERATOR_CKPT))
    data = ImageDataModule(config.data, config.seed)
    audit = data.split(config.identify.validity_split)
    real = RealEvidence.observe(loaded.model, generator, audit)
    # The searched split's latents, for each region's reach among real images (the same as real's when both are
    # the audit split, the default).
    sources = (real.z if config.identify.split == config.identify.validity_split else
               latent_means(generator, data.split(config.identify.split).float_images()).numpy())
    regions = distill(discovery.failures, loaded.model, generator, discovery.judge, loaded.classes or audit.classes,
                      config.distill, seed=config.seed, real=real, sources=sources)
    regions.save(run)
    save_pictures(run, regions, discovery.failures, generator, config.distill, config.seed, real=real,
                  classifier=loaded.model)
    return regions.metrics


def labelling_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """One label per region from a person (prompt), a labels file, or the conservative suggestions (auto)."""
    from defuse.distill import Regions, region_grids
    from defuse.label import label_stage
    from defuse.models.loading import load_classifier, load_generator

    regions = Regions.load(run)
    return label_stage(
        run, regions, regions.classes, config.label.mode, regions_sha256=run.artifact_hash(REGIONS_JSON),
        min_real_misread=config.label.auto_min_real_misread,
        previews=lambda: region_grids(regions, load_generator(run.path(GENERATOR_CKPT)), config.distill.tau,
                                      config.seed, load_classifier(run.path(CLASSIFIER_CKPT)).model),
    )


def correct_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Fine-tune the classifier on the regions labelled with a class; write repaired.ckpt and label_issues.csv."""
    from defuse.correct import read_reviewed_labels, repair
    from defuse.data import ImageDataModule
    from defuse.distill import Regions
    from defuse.label import LabelBook
    from defuse.models.loading import load_classifier, load_generator
    from defuse.validity import ValidityModel

    data = ImageDataModule(config.data, config.seed)
    reviewed = read_reviewed_labels(config.correct.reviewed_labels, data) if config.correct.reviewed_labels else None
    fixed = repair(load_classifier(run.path(CLASSIFIER_CKPT)), LabelBook(run.path(LABELS_FILE)).bug_labels(),
                   Regions.load(run), load_generator(run.path(GENERATOR_CKPT)),
                   ValidityModel.load(run.path(VALIDITY_MODEL)),
                   data, config.correct, tau=config.distill.tau,
                   workdir=run.path(CORRECT_DIR), seed=config.seed, trainer=config.trainer, reviewed=reviewed)
    fixed.save(run.path(REPAIRED_CKPT))
    fixed.save_label_issues(run.path(LABEL_ISSUES))
    return fixed.summary


def label_issues_to_review(config: RunConfig, run: RunDir) -> pd.DataFrame:
    """The label issues a person should review before correct (:func:`defuse.correct.issues_for_review`), less those
    ``correct.reviewed_labels`` answers already. Needs the regions labelled (the label stage's labels.jsonl)."""
    from defuse.correct import image_witness, issues_for_review, read_reviewed_labels
    from defuse.data import ImageDataModule
    from defuse.distill import Regions
    from defuse.label import LabelBook
    from defuse.models.loading import load_classifier, load_generator
    from defuse.validity import ValidityModel

    for name in (LABELS_FILE, REGIONS_JSON, GENERATOR_CKPT, VALIDITY_MODEL):
        if not run.path(name).exists():
            raise FileNotFoundError(f"{run.path(name)} is missing: label issues are found once the regions are "
                                    f"labelled. Run `defuse run` (and label the regions) first.")
    data = ImageDataModule(config.data, config.seed)
    reviewed = read_reviewed_labels(config.correct.reviewed_labels, data) if config.correct.reviewed_labels else None
    hparams = load_classifier(run.path(CLASSIFIER_CKPT)).hparams if run.path(CLASSIFIER_CKPT).exists() else {}
    # The same image judge the correct stage fits (same seed stream, deterministic), so review and repair agree.
    image_scores = image_witness(hparams, data, config.correct, config.seed, config.trainer, run.root)
    import pandas as pd

    todo = issues_for_review(Regions.load(run), LabelBook(run.path(LABELS_FILE)).bug_labels(),
                             load_generator(run.path(GENERATOR_CKPT)), ValidityModel.load(run.path(VALIDITY_MODEL)),
                             data, reviewed, image_scores)
    moved = moved_for_review(run, set(reviewed or ()) | set(todo["image"].tolist()))
    # An empty table has no dtypes to keep: concatenated, it would turn every column to object (pandas 3).
    return pd.concat([todo, moved], ignore_index=True) if len(moved) else todo


def moved_for_review(run: RunDir, answered: set[int]) -> pd.DataFrame:
    """The held-out images a finished correct stage found its candidates moving to a person's label under a mistaken
    label (kind "moved" in label_issues.csv, :func:`defuse.correct.moved_to_person`), less those in ``answered``:
    the person's answers re-grade the same candidates."""
    import pandas as pd

    from defuse.correct import LABEL_ISSUE_COLUMNS, MOVED

    path = run.path(LABEL_ISSUES)
    if not path.exists():
        return pd.DataFrame(columns=list(LABEL_ISSUE_COLUMNS))
    table = pd.read_csv(path, dtype={"given_class": str, "person_class": str, "split": str, "kind": str})
    return table[(table["kind"] == MOVED) & ~table["image"].isin(sorted(answered))].reset_index(drop=True)


def review_command(config: RunConfig, run: RunDir, out: Path | None = None, *, interactive: bool,
                   ask: Callable[[str], str] = input, say: Callable[[str], None] = print) -> dict[str, Any]:
    """``defuse review``: a person's answer on each label issue of a labelled region (:func:`label_issues_to_review`),
    appended to ``out`` (default <run-dir>/label_review.csv) as it is given (:func:`defuse.label.review_prompt`);
    answers already there are not asked again. Not interactive: the issues go to label_review_todo.csv, with an
    empty label column to fill in. Returns how many were listed and answered, and where they went."""
    from defuse.data import ImageDataModule
    from defuse.label import review_prompt

    out = Path(out) if out else run.path(LABEL_REVIEW)
    if out.exists() and not config.correct.reviewed_labels:  # answers given earlier are not asked again
        config = config_from_mapping(config.to_dict(), [f"correct.reviewed_labels={out}"])
    todo = label_issues_to_review(config, run)
    use = (f"Use the answers: `defuse run --run-dir {run.root} --reviewed-labels {out}` (each answer decides its "
           f"image's label; images you skip follow the rules).")
    if todo.empty:
        say(f"Nothing to review: no label issue of a labelled region awaits an answer (they are found once regions "
            f"are labelled with a class: `defuse label --run-dir {run.root}`). {use if out.exists() else ''}")
        return {"to_review": 0, "answered": 0}
    if not interactive:
        listing = run.path(LABEL_REVIEW_TODO)
        todo.assign(label="").to_csv(listing, index=False)
        say(f"{len(todo)} images to review are in {listing}: write each one's class (name or index) in its label "
            f"column (empty skips), then `defuse run --run-dir {run.root} --reviewed-labels {listing}`.")
        return {"to_review": len(todo), "answered": 0, "file": str(listing)}
    data = ImageDataModule(config.data, config.seed)
    items = [(int(row.image), f"{row.split}, labelled {row.given_class!r}; its region says {row.person_class!r}"
              f"{_witnesses(row)}",
              data.split(row.split).images[row.position : row.position + 1].float() / 255)
             for row in todo.itertuples(index=False)]
    answered = review_prompt(items, data.classes, out, ask=ask, out=say)
    say(use)
    return {"to_review": len(todo), "answered": answered, "file": str(out)}


def _witnesses(row) -> str:
    """What the judges give the region's label, as the review prompt shows it (the image judge where it judged)."""
    if row.judge_validity != row.judge_validity:  # NaN: a held-out image the repair moves (kind "moved")
        return f"; the repair would read it as {row.person_class!r}"
    said = f"; the judges give {row.person_class!r}: latent {row.judge_validity:.2f}"
    return said + (f", image {row.image_judge:.2f}" if row.image_judge == row.image_judge else "")  # NaN: none


def verify_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Before/after on the test split, on fresh region samples, and by the same search around the test images."""
    from defuse.data import ImageDataModule
    from defuse.distill import Regions
    from defuse.label import LabelBook
    from defuse.models.loading import load_classifier, load_generator
    from defuse.validity import ValidityModel
    from defuse.verify import verify

    before, after = (load_classifier(run.path(name)).model for name in (CLASSIFIER_CKPT, REPAIRED_CKPT))
    checked = verify(before, after, ImageDataModule(config.data, config.seed).split("test"), Regions.load(run),
                     LabelBook(run.path(LABELS_FILE)).bug_labels(), load_generator(run.path(GENERATOR_CKPT)),
                     ValidityModel.load(run.path(VALIDITY_MODEL)), tau=config.distill.tau, search=config.identify,
                     real_neighbours=config.distill.real_neighbours, seed=config.seed, trainer=config.trainer)
    checked.save(run.path(VERIFY_JSON))
    return checked.metrics


def check_before_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Effective Invariance and variance matrices of the original classifier on the test split; write checks/."""
    return _check(config, run, CLASSIFIER_CKPT, "before")


def check_after_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """The same checks of the repaired classifier, paired image by image with check-before's; write checks/."""
    return _check(config, run, REPAIRED_CKPT, "after", reference="before")


def check_file(config: RunConfig, run: RunDir, path: str) -> dict[str, Any]:
    """The checks of any classifier file (``defuse check --model PATH``), paired with check-before's when it ran."""
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is not a file: `--model` takes before, after or a classifier checkpoint.")
    return _check(config, run, str(Path(path).resolve()), Path(path).stem, reference="before")


DRIFT_ACTIONS = ("synth", "forensics", "optimize")


def drift_command(config: RunConfig, run: RunDir, action: str, model: str) -> dict[str, Any]:
    """``defuse drift synth|forensics|optimize --model before|after|PATH``: physical drift of one classifier on the
    test images the checks read; writes checks/drift_<action>_<model name>.json."""
    from pathlib import Path

    from defuse.data import ImageDataModule
    from defuse.drift import run_drift
    from defuse.models.loading import load_classifier

    if action not in DRIFT_ACTIONS:
        raise ValueError(f"`defuse drift` takes one of {', '.join(DRIFT_ACTIONS)}; got {action!r} instead.")
    path = {"before": CLASSIFIER_CKPT, "after": REPAIRED_CKPT}.get(model, model)
    name = model if model in ("before", "after") else Path(model).stem
    if not run.path(path).is_file():
        raise FileNotFoundError(f"{run.path(path)} is missing: `--model` takes before (after fit-classifier), after "
                                f"(after correct) or a classifier checkpoint file.")
    return run_drift(action, load_classifier(run.path(path)).model, ImageDataModule(config.data, config.seed).split(
        "test"), config.check, run.path(CHECKS_DIR), name=name, seed=config.seed)


def _check(config: RunConfig, run: RunDir, model_path: str, name: str, reference: str | None = None) -> dict[str, Any]:
    from defuse.data import ImageDataModule
    from defuse.invariance.check import run_check
    from defuse.models.loading import load_classifier

    return run_check(load_classifier(run.path(model_path)).model, load_classifier(run.path(CLASSIFIER_CKPT)).model,
                     ImageDataModule(config.data, config.seed).split("test"), config.check, run.path(CHECKS_DIR),
                     name=name, reference=reference, seed=config.seed)


def report_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Render what the stages wrote as report/index.html, report.json and report.md (no model is run)."""
    from defuse.report import build_report

    report = build_report(run, config.report)
    report.save(run)
    return report.metrics


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunConfig, RunDir], dict[str, Any]]
    outputs: tuple[str, ...]  # file names, or glob patterns for a variable number of files
    sections: tuple[str, ...]  # config sections the stage reads
    inputs: tuple[str, ...] = ()  # artifacts of earlier stages it reads
    always: bool = False  # never skipped (labelling resumes where the person stopped)


DONE, CURRENT = "done", "skipped (current)"
RESTORED = "restored from the cache"  # a fitted model another run trained with the same inputs (defuse.cache)


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = DONE  # DONE, CURRENT (skipped) or AWAITING_LABELS (not run: regions await a person's labels)


STAGES: tuple[Stage, ...] = (
    Stage("fit-classifier", fit_classifier_stage, (CLASSIFIER_CKPT,), ("data", "classifier", "trainer")),
    Stage("fit-generator", fit_generator_stage, (GENERATOR_CKPT,), ("data", "generator", "trainer")),
    Stage("identify", identify_stage, (FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL), ("data", "identify"),
          (CLASSIFIER_CKPT, GENERATOR_CKPT)),
    Stage("distill", distill_stage, (REGIONS_JSON, f"{REGIONS_DIR}/*", UMAP_PNG), ("distill", "data", "identify"),
          (FAILURES_TABLE, FAILURES_Z, VALIDITY_MODEL, CLASSIFIER_CKPT, GENERATOR_CKPT)),
    Stage("check-before", check_before_stage, (CHECK_BEFORE, f"{CHECKS_DIR}/before_*"), ("data", "check"),
          (CLASSIFIER_CKPT,)),
    Stage("label", labelling_stage, (LABELS_FILE,), ("label",), (REGIONS_JSON,), always=True),
    Stage("correct", correct_stage, (REPAIRED_CKPT, LABEL_ISSUES), ("correct", "data", "distill", "trainer"),
          (LABELS_FILE, REGIONS_JSON, CLASSIFIER_CKPT, GENERATOR_CKPT, VALIDITY_MODEL)),
    Stage("verify", verify_stage, (VERIFY_JSON,), ("data", "identify", "distill", "trainer"),
          (REPAIRED_CKPT, CLASSIFIER_CKPT, GENERATOR_CKPT, LABELS_FILE, REGIONS_JSON, VALIDITY_MODEL)),
    Stage("check-after", check_after_stage, (CHECK_AFTER, f"{CHECKS_DIR}/after_*", DRIFT_TOLERANCE),
          ("data", "check"),
          (REPAIRED_CKPT, CHECK_BEFORE)),
    # Always re-rendered (a second or two): it reads whatever the stages before it left, including a run that
    # stopped for labels, whose report says so.
    Stage("report", report_stage, (REPORT_HTML, REPORT_JSON, REPORT_MD), ("report",), always=True),
)
# The pipeline of ../shared/DESIGN.md beyond what is built so far, in order.
NOT_BUILT_YET: tuple[str, ...] = ()


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    known = ", ".join(s.name for s in STAGES)
    raise ValueError(f"Unknown stage {name!r}; the stages are: {known}.")


def stage_fingerprint(stage: Stage, config: RunConfig, run: RunDir) -> str:
    """What a stage's outputs depend on: its config sections, the contents of the files they name, its inputs."""
    inputs = {name: run.artifact_hash(name) for name in stage.inputs}
    files = {f"{section}.{key}": path_digest(path) for section in stage.sections
             for key, path in path_fields(getattr(config, section)).items()}
    return fingerprint({"stage": stage.name, "config": config.section(*stage.sections), "inputs": inputs,
                        "files": files})


def _check_unchanged_inputs(stage: Stage, run: RunDir) -> None:
    """Refuse inputs that changed since the stage that wrote them finished (a truncated copy, an edit by hand):
    the fingerprint records what that stage wrote, so without this check the stage would read the changed file
    while calling itself current."""
    for name in stage.inputs:
        producer = next((s.name for s in STAGES if name in s.outputs), None)
        if producer and producer != stage.name and name in run.changed_outputs(producer):
            raise ValueError(f"{run.path(name)} is not what stage {producer} wrote (it was edited, truncated or "
                             f"replaced since), so {stage.name} cannot trust it. Make it again: `defuse {producer} "
                             f"--run-dir {run.root}` (or `defuse run`, which re-makes it and what follows).")


def run_stage(stage: Stage, config: RunConfig, run: RunDir, force: bool = False) -> StageResult:
    """Run one stage unless its outputs are current; record it in the manifest either way."""
    for name in stage.inputs:
        if not run.path(name).exists():
            producer = next((s.name for s in STAGES if name in s.outputs), "an earlier stage")
            raise FileNotFoundError(
                f"{run.path(name)} is missing: stage {stage.name!r} needs it. Run `defuse {producer}` first."
            )
    _check_unchanged_inputs(stage, run)
    changed = run.changed_outputs(stage.name)
    if changed and not force:
        log.warning("%s changed since stage %s wrote %s (edited, truncated or replaced): %s runs again.",
                    ", ".join(changed), stage.name, "it" if len(changed) == 1 else "them", stage.name)
    digest = stage_fingerprint(stage, config, run)
    if not force and not stage.always and run.is_current(stage.name, digest):
        made_by = run.stage(stage.name).get("defuse")
        if made_by and made_by != defuse_version():
            # Kept, not re-made: re-running a training stage can take hours, and most upgrades change nothing it
            # wrote. The user decides, knowing.
            log.warning("Stage %s's outputs in %s were made by defuse %s (this is %s); they are kept. To re-make "
                        "them with this version: `defuse run --run-dir %s --force %s`.", stage.name, run.root,
                        made_by, defuse_version(), run.root, stage.name)
        return StageResult(stage.name, True, 0.0, run.metrics(stage.name), CURRENT)
    start = time.perf_counter()
    cached = config.trainer.cache and stage.name in cache.CACHED_STAGES
    entry = cache.lookup(stage.name, digest) if cached and not force else None
    with run.running(stage.name, config.to_dict(), config.seed, digest) as record:
        if entry is not None:
            record.metrics = cache.restore(entry, run)
        else:
            with quiet_libraries(enabled=not config.trainer.verbose):
                record.metrics = stage.run(config, run)
        record.outputs = {name: "" for name in _expand(run, stage.outputs)}
    if cached and entry is None:
        cache.store(stage.name, digest, run, list(record.outputs), record.metrics)
    return StageResult(stage.name, False, time.perf_counter() - start, record.metrics,
                       RESTORED if entry is not None else DONE)


LABEL_MODES = ("prompt", "auto", "later")  # label.mode: these, or a labels file


def check_inputs(config: RunConfig) -> None:
    """Refuse, before any stage runs, a file the run will read that is not there: a typo in ``--labels`` or
    ``--reviewed-labels`` should cost a second, not the minutes of training before the stage that reads it."""
    mode = str(config.label.mode)
    if mode not in LABEL_MODES and not Path(mode).is_file():
        close = difflib.get_close_matches(mode, LABEL_MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"--labels {mode} (label.mode): there is no file {mode}.{hint} Give prompt, auto, "
                                f"later, or a JSON/YAML file mapping region ids to labels, e.g. {{1: 7, 2: not-a-bug}}.")
    reviewed = config.correct.reviewed_labels
    if reviewed and not Path(reviewed).is_file():
        raise FileNotFoundError(f"--reviewed-labels {reviewed} (correct.reviewed_labels): there is no such file. "
                                f"Write it with `defuse review`, or give a CSV with the columns image,label.")


def run_pipeline(config: RunConfig, run: RunDir, force: tuple[str, ...] = (),
                 on_stage: Callable[[int, Stage, StageResult | None], None] | None = None) -> list[StageResult]:
    """Run every built stage in order; ``force`` names stages to re-run even when current ("all" for every one).

    The run stops after ``label`` while any region awaits a label (nobody answered the prompt, no labels file,
    no ``--labels auto``): the repair needs a person's say-so. The stages after it are returned with the status
    "awaiting labels" and are not run, except ``report``, which shows what exists and says the run awaits labels;
    the same command resumes once the regions are labelled. ``force`` re-runs the named stages and every stage
    after the first of them ("re-run from there on": a downstream stage must see its inputs rebuilt even where a
    deterministic re-run left their bytes unchanged). ``on_stage(index, stage, result)`` is called before each
    stage (result None) and after it, for a progress display.
    """
    for name in force:
        if name != "all":
            stage_named(name)
    check_inputs(config)
    results: list[StageResult] = []
    awaiting = forcing = False
    for index, stage in enumerate(STAGES):
        forcing = forcing or stage.name in force or "all" in force
        if awaiting and stage.name != "report":
            results.append(StageResult(stage.name, True, 0.0, {}, AWAITING_LABELS))
        else:
            if on_stage:
                on_stage(index, stage, None)
            results.append(run_stage(stage, config, run, force=forcing))
            awaiting = awaiting or (stage.name == "label" and bool(results[-1].metrics.get("pending")))
        if on_stage:
            on_stage(index, stage, results[-1])
    return results


def _expand(run: RunDir, patterns: tuple[str, ...]) -> list[str]:
    """Output names with glob patterns resolved to the files that exist (an optional picture may be absent)."""
    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            names += sorted(str(p.relative_to(run.root)) for p in run.root.glob(pattern) if p.is_file())
        elif run.path(pattern).exists():
            names.append(pattern)
    return names
