"""The runner: the stages in order, and when to skip one.

Each stage declares itself beside its adapter in :mod:`defuse.stages` (which files it writes, from which config
sections and artifacts); every decision (fallbacks, sampling, exclusions, which split is read) lives in the stage,
where the benchmarks call it too. A stage is skipped when the manifest says it finished with the same fingerprint
(config sections without presentation keys + seed + sha256 of its input artifacts) and its outputs are intact.
Re-running a stage changes its outputs' hashes, so every stage downstream re-runs too. The pipeline stops
after ``label`` while regions await a person's label: nothing is repaired unasked.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defuse import cache
from defuse.artifacts import AWAITING_LABELS
from defuse.config import RunConfig, path_fields
from defuse.quiet import quiet_libraries
from defuse.rundir import RunDir, defuse_version, fingerprint, path_digest
from defuse.stages import (
    Stage,
    check_after,
    check_before,
    correct,
    distill,
    fit_classifier,
    fit_generator,
    identify,
    label,
    report,
    verify,
)

log = logging.getLogger(__name__)


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
    fit_classifier.STAGE,
    fit_generator.STAGE,
    identify.STAGE,
    distill.STAGE,
    check_before.STAGE,
    label.STAGE,
    correct.STAGE,
    verify.STAGE,
    check_after.STAGE,
    report.STAGE,
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
    entry = cache.lookup(stage.name, digest, stage.outputs) if cached and not force else None
    with run.running(stage.name, config.to_dict(), config.seed, digest) as record:
        if entry is not None:
            record.metrics = cache.restore(entry, run)
        else:
            with quiet_libraries(enabled=not config.trainer.verbose), single_threaded_blas():
                record.metrics = stage.run(config, run)
        record.outputs = {name: "" for name in _expand(run, stage.outputs)}
    if cached and entry is None:
        cache.store(stage.name, digest, run, list(record.outputs), record.metrics)
    return StageResult(stage.name, False, time.perf_counter() - start, record.metrics,
                       RESTORED if entry is not None else DONE)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """NumPy's and SciPy's BLAS on one thread while a stage runs; torch keeps its threads.

    The stages alternate torch's batched work with small NumPy/SciPy linear algebra (16-dimensional Gaussians in
    distill's mixtures, validity judges, ellipsoid tests). Both BLAS and torch's OpenMP start a thread per core and
    spin while idle, so on a small machine each small solve waits for cores the other pool holds: a 16x16
    triangular solve measured 0.03 ms alone and 4-8 ms right after torch work in the same process (2 cores).
    Nothing these stages hand to NumPy is large enough to gain from a second BLAS thread. On an idle machine a run
    takes as long either way (bench_run, 2026-12-07); the gain is on a shared one (tests, a notebook, a second run)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


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
