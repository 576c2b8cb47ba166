"""The stage adapters and the pipeline's wiring: fingerprints, stopping for labels, and what reads the test split."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from defuse.config import config_from_mapping, load_config
from defuse.correct import LABEL_ISSUE_COLUMNS, REPAIRED_CKPT
from defuse.label import LABELS_FILE, LabelBook
from defuse.models import load_classifier
from defuse.pipeline import (
    AWAITING_LABELS,
    CURRENT,
    STAGES,
    correct_stage,
    run_pipeline,
    stage_fingerprint,
    stage_named,
)
from defuse.rundir import RunDir

DISCOVERY_AND_REPAIR = ("classifier.ckpt", "generator.ckpt", "failures.parquet", "failures_z.npy", "validity.npz",
                        "regions.json", "repaired.ckpt")


def _with(config, *overrides):
    return config_from_mapping(config.to_dict(), list(overrides))


def _label_every_region(run: RunDir) -> str:
    """A person's labels file: every region is a bug of its source class."""
    regions = json.loads(run.path("regions.json").read_text())["regions"]
    assert regions, "the tiny models produced no region"
    path = run.path("answers.yaml")
    path.write_text(yaml.safe_dump({r["id"]: r["source_label"] for r in regions}))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run through every stage, with a labels file; its config."""
    from conftest import TINY_OVERRIDES

    torch.set_num_threads(2)
    run = RunDir(tmp_path_factory.mktemp("run"))
    config = load_config(None, TINY_OVERRIDES)
    results = run_pipeline(config, run)
    assert [r.status for r in results][-3:] == [AWAITING_LABELS, AWAITING_LABELS, "done"]  # the report still runs
    config = _with(config, f"label.mode={_label_every_region(run)}")
    run_pipeline(config, run)
    return run, config


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
            labels = _label_every_region(run)
        run_pipeline(_with(config, f"label.mode={labels}"), run)
        runs[name] = run
    clean, sentinel = runs["clean"], runs["sentinel"]
    for artifact in DISCOVERY_AND_REPAIR:  # training, search, judge, regions, repair: blind to the test split
        assert clean.artifact_hash(artifact) == sentinel.artifact_hash(artifact), artifact
    assert json.loads(clean.path("labels.jsonl").read_text().splitlines()[0])["region"] == 1
    # ... while verify grades on it: the sentinel's noise is read, and shows
    graded = [json.loads(run.path("verify.json").read_text())["clean_accuracy"]["before"] for run in (clean, sentinel)]
    assert graded[0] > 0.3 and graded[1] < 0.2
