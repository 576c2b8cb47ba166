"""The CLI and the stage wiring, end to end on tiny digits models."""

import json
import logging
import os
import re
import select
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from defuse.cli import SUBCOMMANDS, main
from defuse.models import load_classifier, load_generator
from defuse.rundir import RunDir


def regions_of(run_dir):
    return json.loads((run_dir / "regions.json").read_text())["regions"]


def _args(tiny_overrides, run_dir, *extra):
    args = [f"--run-dir={run_dir}"]
    for item in tiny_overrides:
        args += ["--set", item]
    return [*args, *extra]


def test_unattended_run_stops_before_correct_and_resumes_with_labels(tmp_path, tiny_overrides, capsys, caplog):
    assert main(["run", *_args(tiny_overrides, tmp_path)]) == 0  # pytest's stdin is no terminal: nobody to ask
    captured = capsys.readouterr()
    out = captured.out
    assert "regions await a label; nothing was repaired" in out and f"defuse label --run-dir {tmp_path}" in out
    warned = [record for record in caplog.records if record.levelno >= logging.WARNING]
    shown = len(out.splitlines()) + len(captured.err.splitlines()) + len(warned)
    assert shown <= 25, f"{shown} lines: {out}{captured.err}{[r.getMessage() for r in warned]}"  # ~25 at most
    assert f"`defuse run --run-dir {tmp_path} --labels auto`" in caplog.text
    lines = out.splitlines()  # one line per stage, with its key figure; the detail only with --verbose
    assert lines[0].startswith("[1/10] fit-classifier: done (") and \
        lines[0].endswith("(images: train 943, val 135, audit 270, test 449)")
    assert re.search(r"^\[5/10\] check-before: done \(.*\)  EI rotation 0\.\d\d, rotation15 ", out, re.M)
    assert "invariance of before" not in out and "GPU available" not in out and "Tip:" not in out
    assert not (tmp_path / "repaired.ckpt").exists() and not (tmp_path / "verify.json").exists()
    assert (tmp_path / "labels.jsonl").read_text() == ""  # nobody answered, nothing answered for them
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    stages = manifest["stages"]
    assert set(stages) == {"fit-classifier", "fit-generator", "identify", "distill", "check-before", "label", "report"}
    assert {stage["status"] for stage in stages.values()} == {"done"}
    waiting = json.loads((tmp_path / "report" / "report.json").read_text())  # the report of what exists
    assert waiting["status"] == "awaiting labels" and waiting["clean_accuracy"]["after"] is None
    assert waiting["summary"]["regions_found"] == len(waiting["regions"]) == stages["label"]["metrics"]["pending"]
    assert set(waiting["ei"]) == {"rotation", "grayscale", "rotation15", "brightness", "scale", "translation"}
    assert "awaiting labels" in (tmp_path / "report" / "index.html").read_text()
    found = stages["identify"]["metrics"]
    assert found["images"] == 270  # the search started from the audit split, not the 449 test images
    assert found["sources"] == min(40, found["eligible"]) > 0
    assert found["images"] == found["eligible"] + found["excluded_misclassified"] + \
        found["excluded_reconstruction_misclassified"]
    table = pd.read_parquet(tmp_path / "failures.parquet")
    assert found["failures"] == len(table) > 0 and found["valid_failures"] == int(table["valid"].sum())
    regions = json.loads((tmp_path / "regions.json").read_text())
    assert regions["stats"]["failures"] == len(table)
    assert len(regions["regions"]) == stages["label"]["metrics"]["pending"] > 0
    for region in regions["regions"]:
        assert (tmp_path / region["grid"]).exists() and (tmp_path / region["params"]).exists()
    assert stages["fit-generator"]["metrics"]["reconstruction_split"] == "audit"
    assert found["reconstruction_accuracy"] * 270 >= found["eligible"]  # every source survives reconstruction
    assert stages["fit-classifier"]["metrics"]["test_accuracy"] > 0.3  # two epochs are far above chance (0.1)
    assert stages["fit-classifier"]["metrics"]["test_n"] == 449
    assert manifest["config"]["classifier"]["epochs"] == 2
    classifier_hash = RunDir(tmp_path).artifact_hash("classifier.ckpt")
    first = {k: v["finished"] for k, v in stages.items() if k not in ("label", "report")}

    assert main(["run", *_args(tiny_overrides, tmp_path)]) == 0  # again: every stage current, still waiting
    out = capsys.readouterr().out
    assert out.count("skipped (current)") == 5 and out.count("awaiting labels") == 3 + 1  # 3 stages, the summary
    again = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert {k: v.get("finished") for k, v in again.items() if k not in ("label", "report")} == first
    assert main(["run", *_args(tiny_overrides, tmp_path), "--verbose"]) == 0  # the detail, asked for
    out = capsys.readouterr().out
    assert "invariance of before (64 test images; checks/before.json)" in out  # the original's checks, unasked
    assert "variance rotation: matrix mean" in out and "valid_failures_per_1000_queries" in out

    labels = tmp_path / "answers.yaml"  # a person's answers: every region is a bug of its source class
    labels.write_text("".join(f"{r['id']}: {r['source_label']}\n" for r in regions["regions"]))
    assert main(["label", *_args(tiny_overrides, tmp_path), "--labels", str(labels)]) == 0
    from defuse.config import config_from_mapping
    from defuse.stages import review as reviewing

    todo = reviewing.label_issues_to_review(config_from_mapping(RunDir(tmp_path).manifest()["config"], []),
                                           RunDir(tmp_path))  # before any correct: nothing moved yet
    assert len(todo) and pd.api.types.is_integer_dtype(todo["position"])  # positions index images (pandas 3)
    assert main(["run", *_args(tiny_overrides, tmp_path), "--labels", str(labels)]) == 0
    stages = RunDir(tmp_path).manifest()["stages"]
    assert stages["correct"]["status"] == stages["verify"]["status"] == stages["check-after"]["status"] == "done"
    assert stages["correct"]["metrics"]["labelled_regions"] == len(regions["regions"])
    done = json.loads((tmp_path / "report" / "report.json").read_text())
    assert done["status"] == "complete" and done["summary"]["regions_labelled_bug"] == len(regions["regions"])
    assert [r["label_source"] for r in done["regions"]] == ["file"] * len(regions["regions"])
    before, after = (json.loads((tmp_path / "checks" / f"{name}.json").read_text()) for name in ("before", "after"))
    assert before["images"] == after["images"] == 64  # check.max_images of the 449 test images, the same ones
    assert before["ei"]["grayscale"]["applicable"] is False  # one-channel digits: not applicable, never a pass
    assert set(after["ei_change"]) == set(after["ei"]) and after["ei_change"]["grayscale"] is None
    assert set(after["variance_mean_change"]) == {"rotation", "brightness", "scale"}
    assert (tmp_path / "checks" / "after_rotation.png").exists() and (tmp_path / "checks" / "after_ei.npz").exists()
    assert RunDir(tmp_path).artifact_hash("classifier.ckpt") == classifier_hash  # the original is never touched
    verified = json.loads((tmp_path / "verify.json").read_text())
    assert verified["clean_accuracy"]["n"] == 449
    # the test split is searched only when there is a repair to compare with the original; else verify says why
    repaired = stages["correct"]["metrics"]["chosen"] is not None
    assert ("failures_by_pair" in verified) is repaired
    assert ("search" in verified) is not repaired
    assert verified["clean_accuracy"]["before"] == stages["fit-classifier"]["metrics"]["test_accuracy"]
    issues = pd.read_csv(tmp_path / "label_issues.csv")
    assert stages["correct"]["metrics"]["relabelled"] is False and not issues["relabelled"].any()
    assert stages["correct"]["metrics"]["label_issues"] == len(issues)

    # --relabel is the person's consent: correct re-runs with it (and verify after it), nothing before it.
    assert main(["run", *_args(tiny_overrides, tmp_path), "--labels", str(labels), "--relabel"]) == 0
    consented = RunDir(tmp_path).manifest()
    assert consented["config"]["correct"]["relabel"] is True
    assert consented["stages"]["correct"]["metrics"]["relabelled"] is True
    assert consented["stages"]["correct"]["finished"] != stages["correct"]["finished"]
    assert consented["stages"]["distill"]["finished"] == stages["distill"]["finished"]
    relabelled = pd.read_csv(tmp_path / "label_issues.csv")
    assert ((relabelled["kind"] == "contradicted") == relabelled["relabelled"]).all()  # doubted: never relabelled

    # A person's review: without a terminal `defuse review` says what to answer (or that nothing awaits); the answers,
    # through --reviewed-labels, decide their images' labels, and only correct and what follows it re-run.
    assert main(["review", f"--run-dir={tmp_path}"]) == 0
    said = capsys.readouterr().out
    assert "Nothing to review" in said or "label_review_todo.csv" in said
    from defuse.config import config_from_mapping
    from defuse.data import ImageDataModule

    data = ImageDataModule(config_from_mapping(consented["config"], []).data, 0)
    images, given = data.indices("train")[:2].tolist(), data.split("train").labels[:2].tolist()
    answers = tmp_path / "answers.csv"
    answers.write_text(f"image,label\n{images[0]},{(given[0] + 1) % 10}\n{images[1]},{given[1]}\n")
    assert main(["run", *_args(tiny_overrides, tmp_path), "--labels", str(labels), "--relabel",
                 "--reviewed-labels", str(answers)]) == 0
    reviewed_run = RunDir(tmp_path).manifest()
    assert reviewed_run["stages"]["correct"]["metrics"]["reviewed_relabelled"] == 1
    assert reviewed_run["stages"]["distill"]["finished"] == stages["distill"]["finished"]
    listed = pd.read_csv(tmp_path / "label_issues.csv").set_index("image")
    assert listed.loc[images[0], "reviewed"] and listed.loc[images[0], "person_label"] == (given[0] + 1) % 10
    assert listed.loc[images[0], "relabelled"]


def test_changing_the_classifier_reruns_it_and_everything_downstream_but_the_generator(tmp_path, tiny_overrides, capsys):
    assert main(["run", *_args(tiny_overrides, tmp_path)]) == 0
    before = RunDir(tmp_path).manifest()["stages"]
    assert main(["run", *_args(tiny_overrides, tmp_path, "--set", "classifier.lr=0.001")]) == 0
    after = RunDir(tmp_path).manifest()["stages"]
    assert after["fit-classifier"]["fingerprint"] != before["fit-classifier"]["fingerprint"]
    assert after["identify"]["fingerprint"] != before["identify"]["fingerprint"]
    # the generator reads images only: a new classifier leaves it current, trained once
    assert after["fit-generator"]["finished"] == before["fit-generator"]["finished"]


def test_force_reruns_a_current_stage(tmp_path, tiny_overrides, capsys, monkeypatch):
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path)]) == 0
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path)]) == 0
    assert "fit-classifier: skipped (current)" in capsys.readouterr().out
    trained = []
    import defuse.stages.fit_classifier.fit as fit

    monkeypatch.setattr(fit, "train_classifier", lambda *a, **k: trained.append(1) or _real_train(*a, **k))
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path), "--force"]) == 0
    assert "fit-classifier: done" in capsys.readouterr().out and trained == [1]  # trained again, not restored


def _real_train(*args, **kwargs):
    from defuse.models.training import train_classifier

    return train_classifier(*args, **kwargs)


def test_same_seed_same_models_and_metrics_other_seed_differs(tmp_path, tiny_overrides):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(["run", *_args(tiny_overrides, tmp_path / name), "--seed", str(seed)]) == 0
    runs = {n: RunDir(tmp_path / n) for n in "abc"}

    def metrics(run):
        return {k: v["metrics"] for k, v in run.manifest()["stages"].items() if k != "fit-classifier"} | {
            "clf": {k: v for k, v in run.metrics("fit-classifier").items() if k != "train_seconds"}}

    strip = lambda m: {k: {kk: vv for kk, vv in v.items() if kk != "train_seconds"} for k, v in m.items()}  # noqa: E731
    assert strip(metrics(runs["a"])) == strip(metrics(runs["b"]))
    sd = {n: load_classifier(r.path("classifier.ckpt")).model.state_dict() for n, r in runs.items()}
    assert all(torch.equal(sd["a"][k], sd["b"][k]) for k in sd["a"])
    assert not all(torch.equal(sd["a"][k], sd["c"][k]) for k in sd["a"])
    ga, gb = (load_generator(runs[n].path("generator.ckpt")).state_dict() for n in "ab")
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    for artifact in ("classifier.ckpt", "generator.ckpt", "failures.parquet", "failures_z.npy", "regions.json"):
        assert runs["a"].artifact_hash(artifact) == runs["b"].artifact_hash(artifact), artifact
    assert runs["a"].artifact_hash("failures_z.npy") != runs["c"].artifact_hash("failures_z.npy")


def test_a_stage_without_its_inputs_says_what_to_run(tmp_path, tiny_overrides, capsys):
    assert main(["fit-generator", *_args(tiny_overrides, tmp_path)]) == 0  # needs no classifier
    assert main(["identify", *_args(tiny_overrides, tmp_path)]) == 2
    out = capsys.readouterr().err
    assert "classifier.ckpt is missing" in out and "defuse fit-classifier" in out


def test_a_generator_is_adopted_from_another_run_and_a_mismatched_one_refused(tmp_path, tiny_overrides, capsys):
    assert main(["fit-generator", *_args(tiny_overrides, tmp_path / "a")]) == 0
    trained = tmp_path / "a" / "generator.ckpt"
    adopt = ["--set", f"generator.checkpoint={trained}"]
    assert main(["fit-generator", *_args(tiny_overrides, tmp_path / "b"), *adopt]) == 0
    assert (tmp_path / "b" / "generator.ckpt").read_bytes() == trained.read_bytes()
    metrics = RunDir(tmp_path / "b").metrics("fit-generator")
    assert metrics["adopted"] == str(trained) and metrics["reconstruction_mse"] == \
        RunDir(tmp_path / "a").metrics("fit-generator")["reconstruction_mse"]
    assert main(["fit-generator", *_args(tiny_overrides, tmp_path / "c"), *adopt, "--set", "data.image_size=32"]) == 2
    assert (f"`generator.checkpoint` {trained} draws 1-channel 28px images, but the data has 1 channel(s) at 32px."
            in capsys.readouterr().err)
    assert main(["fit-generator", *_args(tiny_overrides, tmp_path / "d"), "--set",
                 f"generator.checkpoint={tmp_path / 'none.ckpt'}"]) == 2
    assert f"`generator.checkpoint` {tmp_path / 'none.ckpt'} does not exist." in capsys.readouterr().err


def test_editing_the_data_file_reruns_what_read_it(tmp_path, tiny_overrides, capsys):
    """The config names the file; the fingerprint follows what is in it (relabelling in place, say)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8), np.arange(300) % 3
    np.savez(tmp_path / "data.npz", x=x, y=y)
    args = [*_args(tiny_overrides, tmp_path / "run"), "--set", "data.source=npz", "--set",
            f"data.root={tmp_path / 'data.npz'}"]
    assert main(["fit-classifier", *args]) == 0
    assert main(["fit-classifier", *args]) == 0
    assert "skipped (current)" in capsys.readouterr().out
    np.savez(tmp_path / "data.npz", x=x, y=(y + 1) % 3)  # same name, new labels
    assert main(["fit-classifier", *args]) == 0
    assert "skipped (current)" not in capsys.readouterr().out


def test_bad_config_exits_2_with_the_message(tmp_path, capsys):
    assert main(["run", "--run-dir", str(tmp_path), "--set", "data.sorce=x"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"Unknown config key 'data.sorce' in the defaults or the overrides \(data.sorce=x[^)]*\)\. "
                     r"Did you mean 'data.source'\?", err), err
    assert not (tmp_path / "manifest.json").exists()


def test_unknown_force_stage_is_refused(tmp_path, capsys):
    assert main(["run", "--run-dir", str(tmp_path), "--force", "fit-everything"]) == 2
    expected = ("Unknown stage 'fit-everything'; the stages are: fit-classifier, fit-generator, identify, distill, "
                "check-before, label, correct, verify, check-after, report.")
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], *([name] for name in SUBCOMMANDS)])
def test_help_exits_0_for_the_top_level_and_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: defuse {command[0] if command else ''}".rstrip())
    if command in ([], ["verify"], ["check"]):  # texts whose "%" crashed argparse's formatting
        assert "95% bootstrap intervals" in out


def test_help_lists_config_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-generator", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "generator.latent_dim" in out and "generator.beta" in out and "--set KEY=VALUE" in out


def test_user_torchscript_classifier_is_adopted_not_trained(tmp_path, tiny_overrides):
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    torch.jit.script(model).save(str(tmp_path / "user.pt"))
    run_dir = tmp_path / "run"
    assert main(["fit-classifier", *_args(tiny_overrides, run_dir), "--set", f"classifier.torchscript={tmp_path / 'user.pt'}"]) == 0
    loaded = load_classifier(run_dir / "classifier.ckpt")
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(loaded.model(x), model(x))
    assert RunDir(run_dir).metrics("fit-classifier")["test_accuracy"] < 0.5  # an untrained model stays untrained
    # The training margins (the labels' doubt around each region) come from defuse's own small CNN, trained only
    # to record them: one row per epoch, one column per training image; none with the probe off.
    margins = np.load(run_dir / "training_margins.npy")
    train_images = RunDir(run_dir).metrics("fit-classifier")["split_sizes"]["train"]
    assert margins.shape == (2, train_images) and (margins[-1] > 0).mean() > 0.5  # classifier.epochs=2; learnt
    off = tmp_path / "off"
    assert main(["fit-classifier", *_args(tiny_overrides, off), "--set", f"classifier.torchscript={tmp_path / 'user.pt'}",
                 "--set", "classifier.margins_probe=false"]) == 0
    assert np.load(off / "training_margins.npy").shape == (0, train_images)


USER_MODEL = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(128, 10))
"""


@pytest.mark.parametrize("kind", ["torchscript", "factory"])
def test_a_classifier_you_bring_is_searched_repaired_and_saved_as_what_it_is(tmp_path, tiny_overrides, kind):
    """TorchScript (which refuses `requires_grad_`) and a factory given as a file: every stage runs, and the repair
    is saved as the user's module plus fine-tuned weights, batch-norm statistics as trained."""
    from safetensors.torch import save_file

    from defuse.models import safe_load
    from defuse.models.loading import load_factory

    (tmp_path / "user_model.py").write_text(USER_MODEL)
    original = load_factory(f"{tmp_path / 'user_model.py'}:build", None)
    from defuse.config import load_config
    from defuse.data import ImageDataModule

    train = ImageDataModule(load_config(None, tiny_overrides).data, 0).split("train")  # the user trained it
    images, targets = train.float_images(), train.labels
    optimiser = torch.optim.Adam(original.parameters(), lr=0.01)
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(original(images), targets).backward()
        optimiser.step()
    original.eval()
    if kind == "torchscript":
        torch.jit.script(original).save(str(tmp_path / "user.pt"))
        brought = ["--set", f"classifier.torchscript={tmp_path / 'user.pt'}"]
    else:
        save_file(original.state_dict(), str(tmp_path / "user.safetensors"))
        brought = ["--set", f"classifier.factory={tmp_path / 'user_model.py'}:build",
                   "--set", f"classifier.weights={tmp_path / 'user.safetensors'}"]
    run_dir = tmp_path / "run"
    assert main(["run", *_args(tiny_overrides, run_dir), *brought]) == 0  # stops for labels
    regions = regions_of(run_dir)
    assert regions, "an untrained model has failures around the images it happens to read right"
    assert main(["run", *_args(tiny_overrides, run_dir), *brought, "--labels", "auto"]) == 0  # to the report
    assert json.loads((run_dir / "report" / "report.json").read_text())["status"] != "awaiting labels"
    labels = tmp_path / "answers.yaml"
    labels.write_text("".join(f"{r['id']}: {r['source_label']}\n" for r in regions))
    # Every decoded sample counts, so the tiny run's weak judge leaves the fine-tune something to train on, and
    # the guard lets a candidate through: what is tested here is that the user's module trains and saves.
    assert main(["run", *_args(tiny_overrides, run_dir), *brought, "--labels", str(labels),
                 "--set", "correct.min_validity=0", "--set", "correct.max_clean_drop=0.9",
                 "--set", "correct.max_class_drop=1"]) == 0  # and a guard that lets a candidate through
    stages = RunDir(run_dir).manifest()["stages"]
    assert stages["correct"]["metrics"]["region_samples_trained"] > 0  # the user's module was fine-tuned
    assert {stages[name]["status"] for name in ("correct", "verify", "check-after", "report")} == {"done"}
    payload = safe_load(run_dir / "repaired.ckpt")
    assert payload["kind"] == kind and "state_dict" in payload
    repaired = load_classifier(run_dir / "repaired.ckpt").model
    x = torch.rand(8, 1, 28, 28)
    assert stages["correct"]["metrics"]["chosen"]["layers"] == "all"  # TorchScript has no head to train alone
    assert not torch.equal(repaired(x), original(x))  # the fine-tuned weights, rebuilt on the user's module
    kept = dict(repaired.named_buffers())["1.running_mean"]
    assert torch.equal(kept, original[1].running_mean)  # batch-norm statistics as the user trained them


def test_a_factory_without_weights_is_adopted_with_a_warning_that_names_the_key(tmp_path, tiny_overrides, caplog):
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path), "--set",
                 "classifier.factory=test_loading:tiny_factory"]) == 0
    assert "'test_loading:tiny_factory' was given no classifier.weights" in caplog.text
    assert "set classifier.weights" in caplog.text


def test_labels_file_through_the_cli_and_new_regions_move_old_answers_aside(tmp_path, tiny_overrides, capsys):
    assert main(["run", *_args(tiny_overrides, tmp_path)]) == 0
    regions = regions_of(tmp_path)
    if not regions:
        pytest.skip("the tiny models produced no region to label")
    labels = tmp_path / "answers.yaml"
    labels.write_text(f"{regions[0]['id']}: not-a-bug\n")
    assert main(["label", *_args(tiny_overrides, tmp_path), "--labels", str(labels)]) == 0
    answers = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert answers[-1]["label"] == "not-a-bug" and answers[-1]["source"] == "file"
    labels.write_text("999: 3\n")
    assert main(["label", *_args(tiny_overrides, tmp_path), "--labels", str(labels)]) == 2
    assert "999" in capsys.readouterr().err
    assert main(["run", *_args(tiny_overrides, tmp_path), "--force", "distill", "--set", "distill.tau=0.5"]) == 0
    assert list(tmp_path.glob("labels.before-*.jsonl"))  # answers for the old regions were kept, aside


def test_a_programming_error_surfaces_with_its_traceback(tmp_path, monkeypatch):
    """A ValueError is the user's (exit 2, one line); a TypeError is ours and must not be dressed up as theirs."""
    import defuse.cli

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(defuse.cli, "run_pipeline", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["run", "--run-dir", str(tmp_path)])


def test_help_and_the_stage_table_load_without_torch():
    """`defuse --help` answers at once: the CLI, the config and the stage table import no torch or Lightning."""
    import subprocess
    import sys

    code = ("import sys, defuse, defuse.cli, defuse.pipeline; defuse.cli.build_parser().format_help(); "
            "heavy = sorted(m for m in ('torch', 'pytorch_lightning', 'sklearn') if m in sys.modules); print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_run_in_a_terminal_shows_one_progress_bar_across_stages_and_a_summary(tmp_path, tiny_overrides):
    """In a real pseudo-terminal: rich's stage bar with Lightning's bars inside a stage, and the final summary."""
    sets = [arg for override in tiny_overrides if "progress_bar" not in override for arg in ("--set", override)]
    master, slave = os.openpty()
    process = subprocess.Popen([sys.executable, "-m", "defuse", "run", "--run-dir", str(tmp_path), "--labels", "auto",
                                *sets], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                               start_new_session=True, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the process has gone and the terminal is closed
                    break
                if not chunk:
                    break
                seen += chunk
        assert process.wait(timeout=30) == 0, seen.decode(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", seen.decode(errors="replace"))
    assert "defuse run" in text and "10/10" in text  # the stage bar reached the last stage
    assert "Epoch 0/1" in text  # Lightning's own bar, inside fit-classifier
    assert f"report: {tmp_path}/report/index.html" in text.replace("\r", "").replace("\n", "")


def test_review_asks_a_page_at_a_time_writes_each_answer_at_once_and_resumes(tmp_path, monkeypatch):
    from defuse.config import load_config
    from defuse.data import ImageDataModule
    from defuse.label_issues import read_reviewed_labels
    from defuse.stages import review as reviewing

    config = load_config(None, [])  # the embedded digits
    data = ImageDataModule(config.data, config.seed)
    images = data.indices("train").numpy()[:3]
    # Two issues labelled 7 whose region says 2 (one page), one labelled 1 whose region says 4 (another page).
    todo = pd.DataFrame({"split": "train", "position": [0, 1, 2], "image": images, "kind": "neighbour",
                         "given_label": [7, 7, 1], "given_class": ["7", "7", "1"], "person_label": [2, 2, 4],
                         "person_class": ["2", "2", "4"], "judge_validity": 0.81, "image_judge": [0.974, np.nan, 0.5]})
    asked_with = []

    def to_review(config, run):  # the label issues of the labelled regions, less those already answered
        asked_with.append(config.correct.reviewed_labels)
        done = read_reviewed_labels(config.correct.reviewed_labels, data) if config.correct.reviewed_labels else {}
        return todo[~todo["image"].isin(list(done))]

    monkeypatch.setattr(reviewing, "label_issues_to_review", to_review)
    run, said = RunDir(tmp_path), []
    # Page 1: not an answer (asked again), then image 2 is a 2 and image 1 keeps its label; page 2: stop.
    answers, prompts = iter(["seven?", "2", "q"]), []

    def ask(prompt):
        prompts.append(prompt)
        return next(answers)

    done = reviewing.review_command(config, run, interactive=True, ask=ask, say=said.append)
    review = tmp_path / "label_review.csv"
    assert done == {"to_review": 3, "answered": 2, "file": str(review)}
    # Written at once, page by page, before the person stopped: the number named is the person's label, the other
    # keeps its given label (an answer too: the label stands).
    assert review.read_text() == f"image,label\n{images[0]},7\n{images[1]},2\n"
    assert any("'seven?' is not an answer" in line for line in said) and len(prompts) == 3
    assert prompts[0] == ("[page 1/2] 2 images labelled '7'; their region says '2'. Which are '2'? "
                          "(all / none: they are '7' / numbers / o / Enter / q) ")
    assert prompts[2].startswith("[page 2/2] 1 images labelled '1'; their region says '4'.")
    assert f"--reviewed-labels {review}" in said[-1]
    # Again: the answered images are not asked about. One by one (o), each image with what the two witnesses give
    # the region's label (the image judge's only where it judged), any class as the answer.
    answers, prompts = iter(["o", "3"]), []
    reviewing.review_command(config, run, interactive=True, ask=ask, say=said.append)
    assert asked_with == [None, str(review)]
    assert prompts[1] == (f"[1/1] image {images[2]} (train, labelled '1'; its region says '4'; the judges give '4': "
                          f"latent 0.81, image 0.50). What is it? ")
    assert read_reviewed_labels(review, data) == {int(images[0]): 7, int(images[1]): 2, int(images[2]): 3}
    # "all" and "none" answer a whole page.
    review.unlink()
    answers = iter(["all", "none"])
    assert reviewing.review_command(config, run, interactive=True, ask=ask, say=said.append)["answered"] == 3
    assert read_reviewed_labels(review, data) == {int(images[0]): 2, int(images[1]): 2, int(images[2]): 1}
    # Without a terminal: the list to fill in, with an empty label column, and what to do with it.
    review.unlink()
    assert reviewing.review_command(config, run, interactive=False, say=said.append)["to_review"] == 3
    listing = pd.read_csv(tmp_path / "label_review_todo.csv", keep_default_na=False)
    assert listing["image"].tolist() == images.tolist() and (listing["label"] == "").all()
    assert "--reviewed-labels" in said[-1] and "label_review_todo.csv" in said[-1]


def test_review_lists_the_held_out_images_the_repair_moved_under_a_mistaken_label_until_answered(tmp_path):
    from defuse.label_issues import LABEL_ISSUE_COLUMNS
    from defuse.stages import review as reviewing

    run = RunDir(tmp_path)
    assert reviewing.moved_for_review(run, set()).empty  # no correct stage yet: nothing it moved
    rows = pd.DataFrame([{**dict.fromkeys(LABEL_ISSUE_COLUMNS), "split": "val", "position": p, "image": i, "kind": k,
                          "given_class": "8", "person_class": "3", "judge_validity": np.nan}
                         for p, i, k in ((0, 50, "moved"), (1, 51, "moved"), (2, 52, "neighbour"))])
    rows.to_csv(run.path("label_issues.csv"), index=False)
    todo = reviewing.moved_for_review(run, {51})  # 51 answered: asked once, never again; 52 is not the repair's
    assert todo["image"].tolist() == [50]
    assert reviewing._witnesses(next(todo.itertuples(index=False))) == "; the repair would read it as '3'"


def test_outputs_an_earlier_defuse_made_are_kept_and_the_warning_says_how_to_remake_them(tmp_path, tiny_overrides,
                                                                                          caplog, monkeypatch):
    import defuse
    import defuse.version

    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path)]) == 0
    record = RunDir(tmp_path).stage("fit-classifier")
    assert record["defuse"] == defuse.__version__
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path)]) == 0  # same version: current, no word
    assert "were made by defuse" not in caplog.text
    monkeypatch.setattr(defuse.version, "__version__", "99.0")
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path)]) == 0
    assert RunDir(tmp_path).stage("fit-classifier")["finished"] == record["finished"]  # kept, not re-made
    assert (f"fit-classifier's outputs in {tmp_path} were made by defuse {record['defuse']} (this is 99.0)"
            in caplog.text and "--force fit-classifier" in caplog.text)


def test_a_mistyped_labels_mode_or_a_missing_review_file_stops_before_the_first_stage(tmp_path, tiny_overrides, capsys):
    """Both are read only after minutes of training; a typo in either must cost a second instead."""
    run_dir = tmp_path / "run"
    assert main(["run", *_args(tiny_overrides, run_dir, "--labels", "autoo")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--labels autoo (label.mode): there is no file autoo. Did you mean 'auto'?" in err
    assert not (run_dir / "classifier.ckpt").exists()  # nothing was trained
    missing = tmp_path / "reviewed.csv"
    assert main(["run", *_args(tiny_overrides, run_dir, "--labels", "auto", "--reviewed-labels", str(missing))]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--reviewed-labels {missing} (correct.reviewed_labels): there is no such file." in err
    assert not (run_dir / "classifier.ckpt").exists()


def test_a_data_set_too_small_to_grade_stops_at_the_first_stage_and_says_what_is_short(tmp_path, tiny_overrides,
                                                                                        capsys):
    from conftest import make_npz

    make_npz(tmp_path / "tiny.npz", n=12, k=2, size=28)
    run_dir = tmp_path / "run"
    assert main(["run", *_args(tiny_overrides, run_dir, "--set", "data.source=npz", "--set",
                                f"data.root={tmp_path / 'tiny.npz'}")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "tiny.npz: 12 images, too few of class '0' 6, '1' 6. defuse needs at least 10 labelled images" in err
    assert not (run_dir / "classifier.ckpt").exists()


def test_warnings_go_to_the_stderr_of_the_moment_so_the_stage_bar_prints_them_above_itself(monkeypatch):
    """rich's live bar replaces sys.stderr with a proxy that prints above the bar; a handler that kept the stderr of
    start-up would write over the bar instead."""
    import io

    from defuse.cli import StderrAtEmit

    handler = StderrAtEmit()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    handler.emit(logging.LogRecord("defuse", logging.WARNING, __file__, 1, "the classifier is weak", None, None))
    assert swapped.getvalue() == "WARNING: the classifier is weak\n"


def test_verbose_tables_written_to_a_file_keep_each_row_on_one_line(finished, tmp_path, capsys, monkeypatch):
    """rich lays out a non-terminal at 80 columns; a log file should get each stage's figures on one line."""
    import shutil

    monkeypatch.delenv("COLUMNS", raising=False)
    run, _ = finished
    copy = shutil.copytree(run.root, tmp_path / "run")
    assert main(["report", "--run-dir", str(copy), "--verbose"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("│ report"))
    assert "regions=" in row and "regressions=" in row and len(row) > 80


def test_a_second_run_directory_adopts_the_models_the_first_trained_and_says_so(tmp_path, tiny_overrides, capsys,
                                                                                  monkeypatch):
    """The same data and settings in a new run directory: the classifier and the VAE come from the cache, the same
    bytes training writes; other settings, --no-cache, --force or DEFUSE_CACHE=off train."""
    monkeypatch.setenv("DEFUSE_CACHE", str(tmp_path / "cache"))
    for stage in ("fit-classifier", "fit-generator"):
        assert main([stage, *_args(tiny_overrides, tmp_path / "first")]) == 0
    assert "restored" not in capsys.readouterr().out
    for stage in ("fit-classifier", "fit-generator"):
        assert main([stage, *_args(tiny_overrides, tmp_path / "second")]) == 0
    out = capsys.readouterr().out
    assert "fit-classifier: restored from the cache (" in out and "fit-generator: restored from the cache (" in out
    for name in ("classifier.ckpt", "training_margins.npy", "generator.ckpt"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
    second = RunDir(tmp_path / "second")
    assert second.stage("fit-classifier")["status"] == "done" and second.is_current(
        "fit-classifier", second.stage("fit-classifier")["fingerprint"])  # resumes like a trained stage
    assert second.metrics("fit-classifier")["restored_from"].startswith(str(tmp_path / "cache"))
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path / "third", "--no-cache")]) == 0
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path / "fourth", "--seed", "1")]) == 0
    assert capsys.readouterr().out.count("fit-classifier: done (") == 2  # not asked to, and another seed
    monkeypatch.setenv("DEFUSE_CACHE", "off")
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path / "fifth")]) == 0
    assert "fit-classifier: done (" in capsys.readouterr().out
    assert not list((tmp_path / "cache").rglob(".partial-*"))  # entries are written whole
    # An entry an older defuse kept, without an output the stage writes today, is not adopted: the stage trains.
    monkeypatch.setenv("DEFUSE_CACHE", str(tmp_path / "cache"))
    for record in (tmp_path / "cache").rglob("fit-classifier/*/record.json"):
        kept = json.loads(record.read_text())
        record.write_text(json.dumps({**kept, "outputs": ["classifier.ckpt"]}))
    assert main(["fit-classifier", *_args(tiny_overrides, tmp_path / "sixth")]) == 0
    assert "fit-classifier: done (" in capsys.readouterr().out
    assert (tmp_path / "sixth" / "training_margins.npy").exists()


def test_review_pages_group_what_a_person_can_answer_together_sixteen_to_a_page():
    from defuse.stages.review import PAGE, review_pages_of

    rows = [{"image": i, "given_label": 1, "person_label": 7, "kind": "neighbour"} for i in range(PAGE + 3)]
    rows += [{"image": 100 + i, "given_label": 1, "person_label": 7, "kind": "moved"} for i in range(2)]
    rows += [{"image": 200, "given_label": 9, "person_label": 4, "kind": "doubted"}]
    pages = review_pages_of(pd.DataFrame(rows).sample(frac=1.0, random_state=0))  # listed in any order
    assert sorted(len(page) for page in pages) == [1, 2, 3, PAGE]
    for page in pages:  # one given label, one person's label, and the repair's moves apart from the rest
        assert page["given_label"].nunique() == page["person_label"].nunique() == 1
        assert page["kind"].eq("moved").all() or not page["kind"].eq("moved").any()
    assert sum(len(page) for page in pages) == len(rows)
