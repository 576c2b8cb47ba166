"""The stage adapters and the pipeline's wiring: fingerprints, stopping for labels, and what reads the test split."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from defuse.artifacts import LABELS_FILE, REPAIRED_CKPT
from defuse.config import load_config
from defuse.label_issues import LABEL_ISSUE_COLUMNS
from defuse.models import load_classifier
from defuse.pipeline import (
    CURRENT,
    STAGES,
    run_pipeline,
    run_stage,
    stage_fingerprint,
    stage_named,
)
from defuse.records import LabelBook
from defuse.rundir import RunDir
from defuse.stages.correct import correct_stage

DISCOVERY_AND_REPAIR = ("classifier.ckpt", "generator.ckpt", "failures.parquet", "failures_z.npy", "validity.npz",
                        "regions.json", "repaired.ckpt")


from conftest import label_every_region  # noqa: E402
from conftest import with_overrides as _with  # noqa: E402


def test_every_stage_writes_what_it_declares_and_the_manifest_hashes_it(finished):
    run, _ = finished
    stages = run.manifest()["stages"]
    for stage in STAGES:
        record = stages[stage.name]
        assert record["status"] == "done", stage.name
        for name in record["outputs"]:
            assert run.path(name).exists(), (stage.name, name)
        declared = [o for o in stage.outputs if "*" not in o and o != "umap.png"]  # umap is off in the tiny run
        assert set(declared) <= set(record["outputs"]), stage.name


def test_each_region_shows_the_hardest_learnt_training_images_of_its_source_class_near_it(finished):
    """distill records, reads and draws the training images beside each region (Region.doubted_nearest) from the
    train split and fit-classifier's margins; the report carries them."""
    from defuse.data import ImageDataModule
    from defuse.models import load_classifier
    from defuse.models.inference import predict_labels
    from defuse.records import Regions

    run, config = finished
    regions = Regions.load(run.path("regions.json")).regions
    train = ImageDataModule(config.data, config.seed).split("train")
    aum = np.load(run.path("training_margins.npy")).mean(axis=0)
    model = load_classifier(run.path("classifier.ckpt")).model
    assert regions and all(region.doubted_nearest for region in regions)
    for region in regions:
        shown = torch.as_tensor(region.doubted_nearest)
        assert (train.labels[shown] == region.source_label).all()
        assert aum[region.doubted_nearest].tolist() == sorted(aum[region.doubted_nearest].tolist())
        assert region.doubted_nearest_read == predict_labels(model, train.subset(shown).float_images()).tolist()
        assert run.path(region.doubted_grid).read_bytes()[:4] == b"\x89PNG"
    report = json.loads(run.path("report/report.json").read_text())
    assert report["regions"][0]["doubted_grid"] == regions[0].doubted_grid


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_progress_bars_on_or_off_never_rerun_a_stage(finished, first, second):
    run, config = finished
    results = run_pipeline(_with(config, f"trainer.progress_bar={str(first).lower()}"), run)
    results += run_pipeline(_with(config, f"trainer.progress_bar={str(second).lower()}"), run)
    always = {s.name for s in STAGES if s.always}  # label (resumes a person's answers) and report (re-rendered)
    assert always == {"label", "report"}
    assert {r.name: r.status for r in results if r.name not in always} == {s.name: CURRENT for s in STAGES
                                                                           if s.name not in always}


def test_fingerprints_follow_what_changes_results(finished):
    run, config = finished
    stage = stage_named("fit-classifier")
    base = stage_fingerprint(stage, config, run)
    assert stage_fingerprint(stage, _with(config, "trainer.progress_bar=true"), run) == base
    assert stage_fingerprint(stage, _with(config, "trainer.progress_bar=false"), run) == base
    assert stage_fingerprint(stage, _with(config, "trainer.deterministic=false"), run) != base
    assert stage_fingerprint(stage, _with(config, "data.audit_size=0.3"), run) != base


def test_correct_with_no_bug_labelled_keeps_the_original_weights(finished, tmp_path):
    run, config = finished
    copy = RunDir(tmp_path)
    for name in ("classifier.ckpt", "generator.ckpt", "validity.npz", "regions.json"):
        copy.path(name).write_bytes(run.path(name).read_bytes())
    (tmp_path / "regions").mkdir()
    for npz in run.path("regions").glob("*.npz"):
        (tmp_path / "regions" / npz.name).write_bytes(npz.read_bytes())
    book = LabelBook(copy.path(LABELS_FILE))
    for region in json.loads(run.path("regions.json").read_text())["regions"]:
        book.record(region["id"], "not-a-bug", "prompt")
    metrics = correct_stage(config, copy)
    assert metrics == {"labelled_regions": 0, "chosen": None, "reason": "no region labelled with a class",
                       "label_issues": 0}
    assert pd.read_csv(copy.path("label_issues.csv")).empty  # written, with its columns, even when empty
    assert list(pd.read_csv(copy.path("label_issues.csv")).columns) == list(LABEL_ISSUE_COLUMNS)
    before = load_classifier(copy.path("classifier.ckpt")).model.state_dict()
    after = load_classifier(copy.path(REPAIRED_CKPT)).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _digits_npz(path, poison_test: bool) -> None:
    """The digits as an npz whose last 449 images (the test split with data.shuffle=false) are, if ``poison_test``,
    replaced by noise with shuffled labels: a sentinel that changes any result computed from the test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    if poison_test:
        rng = np.random.default_rng(0)
        x[-449:] = rng.integers(0, 256, size=x[-449:].shape, dtype=np.uint8)
        y[-449:] = rng.permutation(y[-449:])
    np.savez(path, x=x, y=y)


def test_no_stage_but_verify_reads_the_test_split(tmp_path, tiny_overrides):
    runs = {}
    for name, poison in (("clean", False), ("sentinel", True)):
        _digits_npz(tmp_path / f"{name}.npz", poison)
        config = load_config(None, [*tiny_overrides, "data.source=npz", f"data.root={tmp_path / name}.npz",
                                    "data.shuffle=false", "data.test_size=449"])
        run = RunDir(tmp_path / name)
        run_pipeline(config, run)
        if name == "clean":
            labels = label_every_region(run)
        run_pipeline(_with(config, f"label.mode={labels}"), run)
        runs[name] = run
    clean, sentinel = runs["clean"], runs["sentinel"]
    for artifact in DISCOVERY_AND_REPAIR:  # training, search, judge, regions, repair: blind to the test split
        assert clean.artifact_hash(artifact) == sentinel.artifact_hash(artifact), artifact
    assert json.loads(clean.path("labels.jsonl").read_text().splitlines()[0])["region"] == 1
    # ... while verify grades on it: the sentinel's noise is read, and shows
    graded = [json.loads(run.path("verify.json").read_text())["clean_accuracy"]["before"] for run in (clean, sentinel)]
    assert graded[0] > 0.3 and graded[1] < 0.2


def _defuse(run_dir, overrides, *extra) -> list[str]:
    sets = [arg for override in overrides for arg in ("--set", override)]
    return [sys.executable, "-m", "defuse", "run", "--run-dir", str(run_dir), *sets, *extra]


def _comparable(report: dict) -> dict:
    """report.json without what legitimately differs between two runs of one seed: times and where they ran."""
    report = json.loads(json.dumps(report))
    del report["timings"]
    for key in ("run_dir", "created"):
        del report["metadata"][key]
    return report


# A real Ctrl-C (SIGINT to its own process) the moment the named stage starts, then `defuse run` as the user typed it:
# the interruption lands inside that stage every time, however fast the machine.
CTRL_C_IN = r"""
import dataclasses, os, signal, sys
from defuse import pipeline
from defuse.cli import main

stages = list(pipeline.STAGES)
at = [stage.name for stage in stages].index(sys.argv[1])
real = stages[at].run

def interrupted(config, run):
    os.kill(os.getpid(), signal.SIGINT)
    return real(config, run)

stages[at] = dataclasses.replace(stages[at], run=interrupted)
pipeline.STAGES = tuple(stages)
sys.exit(main(sys.argv[2:]))
"""


def test_an_interrupted_run_resumes_where_it_stopped_and_reports_what_an_uninterrupted_run_does(tmp_path,
                                                                                                tiny_overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The uninterrupted run: it stops for labels, a person answers in a file, the same command finishes.
    whole = RunDir(tmp_path / "whole")
    subprocess.run(_defuse(whole.root, tiny_overrides), check=True, capture_output=True, env=env)
    labels = label_every_region(whole)
    subprocess.run(_defuse(whole.root, tiny_overrides, "--labels", labels), check=True, capture_output=True, env=env)
    expected = json.loads(whole.path("report/report.json").read_text())
    assert expected["status"] == "complete"

    # The same command in another directory, with Ctrl-C while a middle stage runs.
    broken = RunDir(tmp_path / "broken")
    interrupted = "distill"
    command = _defuse(broken.root, tiny_overrides, "--labels", labels)
    process = subprocess.run([sys.executable, "-c", CTRL_C_IN, interrupted, *command[3:]], capture_output=True,
                             text=True, env=env, timeout=600)
    assert process.returncode == 130, process.stderr
    assert "interrupted: finished stages are kept" in process.stderr
    stages = broken.manifest()["stages"]
    assert stages[interrupted]["status"] == "interrupted"
    finished_first = [s.name for s in STAGES[: [s.name for s in STAGES].index(interrupted)]]
    assert all(stages[name]["status"] == "done" for name in finished_first)
    assert not broken.path("report").exists()

    resumed = subprocess.run(_defuse(broken.root, tiny_overrides, "--labels", labels), check=True,
                             capture_output=True, text=True, env=env)
    for name in finished_first:  # not redone (label and report always run: they cost nothing)
        expected_status = "done" if name == "label" else "skipped (current)"
        assert f"] {name}: {expected_status} (" in resumed.stdout, (name, resumed.stdout)
    assert f"] {interrupted}: done (" in resumed.stdout
    assert _comparable(json.loads(broken.path("report/report.json").read_text())) == _comparable(expected)


def test_a_truncated_checkpoint_is_never_current_and_its_rerun_says_why(finished, tmp_path, caplog):
    """A copy cut short (a full disk, an interrupted rsync) must not pass for the stage's output: a stage reading
    it stops and says how to re-make it, and the stage that wrote it runs again with a warning that names it."""
    import logging
    import shutil

    run, config = finished
    copy = RunDir(shutil.copytree(run.root, tmp_path / "run"))
    checkpoint = copy.path("classifier.ckpt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"classifier.ckpt is not what stage fit-classifier wrote .* `defuse "
                                         r"fit-classifier --run-dir"):
        run_stage(stage_named("verify"), config, copy)
    with caplog.at_level(logging.WARNING, logger="defuse.pipeline"):
        result = run_stage(stage_named("fit-classifier"), config, copy)
    assert result.status != CURRENT and len(checkpoint.read_bytes()) > 1000
    assert "classifier.ckpt changed since stage fit-classifier wrote it (edited, truncated or replaced): " \
           "fit-classifier runs again." in caplog.text


def test_the_stage_order_others_read_without_loading_the_stages_is_the_pipelines():
    from defuse.artifacts import STAGE_NAMES

    assert tuple(stage.name for stage in STAGES) == STAGE_NAMES


def test_a_stage_runs_with_one_blas_thread_and_the_callers_threads_come_back(tmp_path):
    """Small NumPy/SciPy solves between torch's batches wait on spinning threads when both pools take every core:
    a stage runs with BLAS on one thread, and the caller's setting is restored after it (and after a failure)."""
    from threadpoolctl import threadpool_info

    from defuse.stages import Stage

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    seen: list[set[int]] = []

    def body(config, run):
        seen.append(blas_threads())
        raise RuntimeError("stops here")

    before = blas_threads()
    config = load_config(None)
    with pytest.raises(RuntimeError, match="stops here"):
        run_stage(Stage("probe", body, (), ()), config, RunDir(tmp_path))
    assert seen == [{1}] and blas_threads() == before
