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

from defuse.config import RunConfig
from defuse.fit import CLASSIFIER_CKPT, GENERATOR_CKPT, fit_classifier, fit_generator
from defuse.rundir import RunDir, fingerprint


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunConfig, RunDir], dict[str, Any]]
    outputs: tuple[str, ...]
    sections: tuple[str, ...]  # config sections the stage reads
    inputs: tuple[str, ...] = ()  # artifacts of earlier stages it reads


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool
    seconds: float
    metrics: dict[str, Any]


STAGES: tuple[Stage, ...] = (
    Stage("fit-classifier", fit_classifier, (CLASSIFIER_CKPT,), ("data", "classifier", "trainer")),
    Stage("fit-generator", fit_generator, (GENERATOR_CKPT,), ("data", "generator", "trainer"), (CLASSIFIER_CKPT,)),
)
# The pipeline of ../shared/DESIGN.md beyond what is built so far, in order.
NOT_BUILT_YET: tuple[str, ...] = ("identify", "distill", "label", "correct", "verify", "check", "report")


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
    if not force and run.is_current(stage.name, digest):
        return StageResult(stage.name, True, 0.0, run.metrics(stage.name))
    start = time.perf_counter()
    with run.running(stage.name, config.to_dict(), config.seed, digest) as record:
        record.metrics = stage.run(config, run)
        record.outputs = {name: "" for name in stage.outputs}
    return StageResult(stage.name, False, time.perf_counter() - start, record.metrics)


def run_pipeline(config: RunConfig, run: RunDir, force: tuple[str, ...] = ()) -> list[StageResult]:
    """Run every built stage in order; ``force`` names stages to re-run even when current ("all" for every one)."""
    for name in force:
        if name != "all":
            stage_named(name)
    return [run_stage(s, config, run, force=s.name in force or "all" in force) for s in STAGES]
