"""The report: what it shows, that it escapes user text, that it computes nothing, the CI gate, a real browser."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from defuse.cli import main
from defuse.config import ReportConfig
from defuse.rundir import RunDir
from defuse.stages.report.build import build_report, find_regressions, markdown_escape

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert('x')</script>"


def _copy(run: RunDir, tmp_path) -> RunDir:
    target = tmp_path / "run"
    shutil.copytree(run.root, target)
    return RunDir(target)


def test_the_report_shows_every_region_label_and_figure_of_the_run(finished):
    run, _ = finished
    report = json.loads(run.path("report/report.json").read_text())
    regions = json.loads(run.path("regions.json").read_text())
    verify = json.loads(run.path("verify.json").read_text())
    labels = yaml_labels = yaml.safe_load(run.path("answers.yaml").read_text())
    assert report["status"] == "complete"
    assert [r["id"] for r in report["regions"]] == [r["id"] for r in regions["regions"]]  # rank order
    assert report["clean_accuracy"] == verify["clean_accuracy"]
    for entry, region in zip(report["regions"], regions["regions"]):
        assert entry["pair"] == region["pair"] and entry["bug_score"] == region["bug_score"]
        # The margins were recorded, so every region has a doubt, and its bug score is the noisy-or of the two kinds
        # of evidence (real images misread, training labels fought over).
        assert region["label_doubt"] is not None and entry["label_doubt"] == region["label_doubt"]
        evidence = 1 - (1 - region["real_error_rate"]) * (1 - region["label_doubt"])
        assert region["bug_score"] == pytest.approx(
            region["error_rate"] * region["validity"] * region["confidence"] * evidence, abs=2e-4)
        assert entry["label"] == regions["classes"][int(yaml_labels[region["id"]])] and entry["label_source"] == "file"
        measured = next(r for r in verify["regions"] if r["id"] == region["id"])
        assert entry["accuracy_before"] == measured["accuracy_before"]
        assert entry["real_accuracy_after"] == measured["real_accuracy_after"]
        assert 0 < entry["real_test_images"] <= 20
    assert len(labels) == report["summary"]["regions_labelled"] == report["summary"]["regions_labelled_bug"]
    before, after = (json.loads(run.path(f"checks/{n}.json").read_text()) for n in ("before", "after"))
    assert report["ei"]["brightness"]["before"] == before["ei"]["brightness"]["ei"]["mean"]
    assert report["ei"]["brightness"]["after"] == after["ei"]["brightness"]["ei"]["mean"]
    assert report["ei"]["grayscale"] == {"applicable": False, "before": None, "after": None}
    assert report["variance"]["scale"]["mean_after"] == after["variance"]["scale"]["mean"]
    assert set(report["timings"]) == {"fit-classifier", "fit-generator", "identify", "distill", "check-before",
                                      "label", "correct", "verify", "check-after"}
    assert report["per_class_accuracy"]["3"]["change"] == round(
        verify["per_class_accuracy"]["3"]["after"] - verify["per_class_accuracy"]["3"]["before"], 4)
    html = run.path("report/index.html").read_text()
    assert html.count('class="region-card') == len(regions["regions"])
    assert html.count("<th>label doubt</th>") == len(regions["regions"])
    assert "| label doubt |" in run.path("report/report.md").read_text()
    # Self-contained: every image inline, nothing fetched from anywhere.
    assert re.search(r'(src|href)="(?!data:|#)', html) is None and "<script" not in html
    assert html.count('src="data:image/png;base64,') >= 2 * len(regions["regions"]) + 6  # grids, real, heat maps


def test_user_text_is_escaped_in_html_and_markdown(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    regions = json.loads(run.path("regions.json").read_text())
    regions["classes"][regions["regions"][0]["source_label"]] = EVIL
    regions["regions"][0]["pair"] = f"{EVIL} -> x"
    run.path("regions.json").write_text(json.dumps(regions))
    build_report(run).save(run.path("report"))
    html, md = run.path("report/index.html").read_text(), run.path("report/report.md").read_text()
    assert "<script" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "<script" not in md and "&lt;script>alert\\(" in md
    assert markdown_escape("a|b *c* <i>") == "a\\|b \\*c\\* &lt;i>"


def test_the_report_counts_a_persons_label_review_or_points_to_defuse_review(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    manifest = run.manifest()
    correct = manifest["stages"]["correct"]["metrics"]
    correct.update(label_issues=12, label_issues_of_labelling_bugs=7, reviewed_labels=0, reviewed_relabelled=0)
    run.write_manifest(manifest)
    build_report(run).save(run.path("report"))
    html = run.path("report/index.html").read_text()
    assert "Label issues listed: 12 (7 of labelling bugs: settle them with <code>defuse review</code>, a page of pictures at a time)" \
        in html
    correct.update(reviewed_labels=5, reviewed_relabelled=3)
    run.write_manifest(manifest)
    report = build_report(run)
    report.save(run.path("report"))
    assert report.data["repair"]["reviewed_labels"] == 5
    assert "Label issues listed: 12 (5 reviewed by a person, 3 relabelled on review)." in \
        run.path("report/index.html").read_text()
    assert json.loads(run.path("report/report.json").read_text())["repair"]["reviewed_relabelled"] == 3


def test_a_labelled_region_whose_samples_stay_misread_is_named_not_repaired(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    manifest = run.manifest()
    manifest["stages"]["correct"]["metrics"].update(
        chosen={"layers": "all", "lambda": 0.0, "epoch": 0}, chosen_on="real held-out bug images",
        guard={"guard_change": 0.001, "guard_change_ci95": [-0.001, 0.003], "largest_class_drop": 0.0})
    run.write_manifest(manifest)
    verify = json.loads(run.path("verify.json").read_text())
    labelled = [r for r in verify["regions"] if r.get("accuracy_after") is not None]
    assert len(labelled) >= 2
    labelled[0]["accuracy_after"] = 0.031  # the repair was admitted, yet the region's samples stay misread
    labelled[1]["accuracy_after"] = 0.85
    run.path("verify.json").write_text(json.dumps(verify))
    report = build_report(run)
    report.save(run.path("report"))
    by_id = {r["id"]: r for r in report.data["regions"]}
    missed, fixed = by_id[labelled[0]["id"]], by_id[labelled[1]["id"]]
    assert missed["repaired"] is False and "reads 3.1% of its fresh samples as" in missed["not_repaired_reason"]
    assert fixed["repaired"] is True and fixed["not_repaired_reason"] is None
    assert labelled[0]["id"] in report.data["summary"]["regions_not_repaired"]
    assert labelled[1]["id"] not in report.data["summary"]["regions_not_repaired"]
    assert report.data["summary"]["regions_repaired"] == sum(r["repaired"] is True for r in report.data["regions"])
    assert report.data["status_detail"].startswith("Partly repaired:")
    assert f"#{labelled[0]['id']} " in report.data["status_detail"]
    assert "<strong>Not repaired:</strong>" in run.path("report/index.html").read_text()
    assert "**not repaired**" in run.path("report/report.md").read_text()
    # Why: the fine-tunes that learnt the regions were refused by the guard, with the figures that refused them.
    chosen = {"layers": "all", "lambda": 0.0, "epoch": 0, "decoded_accuracy": 0.1, "admissible": True,
              "guard_change_ci95": [0.0, 0.0], "largest_class_drop": 0.0}
    learnt = [dict(chosen, epoch=i, decoded_accuracy=0.95, admissible=False, guard_change_ci95=[-0.02 - i / 100, 0.0],
                   largest_class_drop=0.065 - i / 100) for i in range(2)]
    manifest["stages"]["correct"]["metrics"]["candidates"] = [chosen, *learnt]
    run.write_manifest(manifest)
    labelled[1]["accuracy_after"] = 0.5
    run.path("verify.json").write_text(json.dumps(verify))
    none = build_report(run).data
    assert none["status_detail"].startswith("None of the ")
    assert "the 2 fine-tunes that learnt the labelled regions' decoded samples" in none["status_detail"]
    assert "at best a 95% lower bound of -2.00 points on held-out accuracy and a largest class drop of 5.5%" in \
        none["status_detail"]
    # Two regions missed for the same cause: the status names both and says the cause once.
    assert none["status_detail"].count("fine-tunes that learnt") == 1
    assert f"#{labelled[0]['id']} " in none["status_detail"] and f"#{labelled[1]['id']} " in none["status_detail"]
    assert "(50.0% of its fresh samples read as" in none["status_detail"]
    # Images a candidate moved under a mistaken label: the status says how to settle them.
    manifest["stages"]["correct"]["metrics"]["moved_for_review"] = 7
    run.write_manifest(manifest)
    assert f"7 images labelled as a labelled region's mistake are read as your label by a candidate repair: " \
           f"`defuse review --run-dir {run.root}`" in build_report(run).data["status_detail"]
    # A refused repair repairs no region, whatever the samples read.
    manifest["stages"]["correct"]["metrics"].update(chosen=None, reason="no candidate raised accuracy")
    run.write_manifest(manifest)
    refused = build_report(run).data
    assert refused["summary"]["regions_repaired"] == 0
    assert all(r["not_repaired_reason"].startswith("the repair was refused") for r in refused["regions"]
               if r["repaired"] is False)


def test_importing_and_rendering_the_report_never_imports_torch(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    code = ("import sys; from defuse.stages.report.build import build_report; from defuse.rundir import RunDir; "
            f"build_report(RunDir({str(run.root)!r})).save({str(run.root)!r} + '/report'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'lightning', "
            "'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert json.loads(run.path("report/report.json").read_text())["status"] == "complete"


def test_a_report_of_nothing_or_of_a_torn_artifact_says_what_to_run(finished, tmp_path, capsys):
    from defuse.cli import main

    assert main(["report", "--run-dir", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} holds no finished stage" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report").exists()
    run = _copy(finished[0], tmp_path)
    run.path("verify.json").write_text("{torn")
    assert main(["report", "--run-dir", str(run.root)]) == 2
    assert f"`defuse run --run-dir {run.root} --force verify`" in capsys.readouterr().err.replace("\n", "")


def _verify(change, ci, classes=None):
    return {"clean_accuracy": {"before": 0.9, "after": 0.9 + change, "change": change, "change_ci95": ci},
            "per_class_accuracy": classes or {}}


def test_regressions_follow_the_documented_bounds():
    config = ReportConfig(max_clean_drop=0.01, max_class_drop=0.05)
    assert find_regressions(_verify(-0.02, [-0.03, -0.01]), None, config)[0]["kind"] == "clean_accuracy"
    assert find_regressions(_verify(-0.02, [-0.04, 0.001]), None, config) == []  # the interval includes 0
    assert find_regressions(_verify(-0.005, [-0.008, -0.002]), None, config) == []  # within the bound
    classes = {"a": {"before": 1.0, "after": 0.94, "n": 50}, "b": {"before": 0.9, "after": 0.85, "n": 40}}
    found = find_regressions(_verify(0.0, [0.0, 0.0], classes), None, config)
    assert [f["what"] for f in found] == ["class a"]  # b fell exactly the bound: not beyond it
    assert "6.00 points" in found[0]["detail"]
    after = {"ei_change": {"grayscale": None, "scale": {"change": {"mean": -0.05, "low": -0.07, "high": -0.03},
                                                        "regression": True},
                           "rotation": {"change": {"mean": -0.02, "low": -0.05, "high": 0.01}, "regression": False}}}
    assert [f["what"] for f in find_regressions(None, after, config)] == ["EI under scale"]


def test_fail_on_regression_exits_3_with_the_reason_and_0_without_one(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    base = ["--run-dir", str(run.root)]
    assert main(["check", *base, "--model", "before", "--fail-on", "regression"]) == 0  # no EI change against itself
    assert "no regression" in capsys.readouterr().err
    payload = torch.load(run.path("classifier.ckpt"), weights_only=True)
    last = [k for k in payload["state_dict"] if k.endswith(".weight")][-1]
    payload["state_dict"][last] = torch.zeros_like(payload["state_dict"][last])  # logits = the bias: constant
    torch.save(payload, tmp_path / "broken.ckpt")
    assert main(["check", *base, "--model", str(tmp_path / "broken.ckpt"), "--fail-on", "regression"]) == 3
    err = capsys.readouterr().err
    assert "--fail-on regression: " in err and "Effective Invariance under brightness fell" in err
    payload["state_dict"] = {k: torch.zeros_like(v) for k, v in payload["state_dict"].items()}  # std 0: NaN out
    torch.save(payload, tmp_path / "nan.ckpt")
    assert main(["check", *base, "--model", str(tmp_path / "nan.ckpt"), "--fail-on", "regression"]) == 2
    assert "outputs are NaN or infinite on 64 of 64 images" in capsys.readouterr().err
    # Without the option the same check passes: the gate is opt-in, and a run does not remember it.
    assert main(["check", *base, "--model", str(tmp_path / "broken.ckpt")]) == 0


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_opens_in_a_real_browser_without_errors(finished, tmp_path):
    browser = _screenshot_module()
    missing = browser.browser_missing()
    if missing:
        pytest.skip(f"headless Chromium unavailable: {missing}")
    run, _ = finished
    shot = tmp_path / "report.png"
    page = browser.open_report(run.path("report/index.html"), shot)
    regions = json.loads(run.path("regions.json").read_text())["regions"]
    assert page["console_errors"] == []
    assert page["status"] == "complete" and page["title"] == "defuse report: digits"
    assert page["headline_rows"] >= 2 + 6 + 3  # clean accuracy, regions, EI per transform, variance per family
    assert page["region_cards"] == [str(r["id"]) for r in regions]
    assert page["images"] > 0 and page["broken_images"] == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_report_names_the_classes_the_generator_draws_worst_only_when_one_falls_short(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    manifest = run.manifest()
    identify = manifest["stages"]["identify"]["metrics"]
    assert set(identify["reconstruction_by_class"]) <= {str(k) for k in range(10)}  # written by the real stage
    identify["reconstruction_by_class"] = {"0": 0.99, "3": 0.97}
    run.write_manifest(manifest)
    assert build_report(run).data["discovery"]["least_drawn"] is None  # every class drawn well: nothing to say
    identify["reconstruction_by_class"] = {"0": 0.99, "3": 0.15, "5": 0.6}
    run.write_manifest(manifest)
    report = build_report(run)
    report.save(run.path("report"))
    classes = report.data["metadata"]["classes"]
    assert report.data["discovery"]["least_drawn"] == f"{classes[3]} 15%, {classes[5]} 60%, {classes[0]} 99%"
    assert f"least kept: {classes[3]} 15%" in run.path("report/index.html").read_text()
    assert f"least kept: {classes[3]} 15%" in run.path("report/report.md").read_text()
