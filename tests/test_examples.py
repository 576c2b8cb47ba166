"""The two examples a Lightning user starts from, run on tiny settings: defuse.scan and DefuseCallback."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from defuse.models import safe_load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_settings() -> list[str]:
    return [arg for item in TINY_OVERRIDES for arg in ("--set", item)]


def test_the_callback_scans_the_trained_model_at_the_end_of_fit_and_logs_what_it_found(tmp_path, capsys):
    run_dir = tmp_path / "run"
    callback = example("train_with_defuse").main(["--epochs", "2", "--run-dir", str(run_dir), *tiny_settings()])
    result = callback.result
    assert result.awaiting_labels and not (run_dir / "repaired.ckpt").exists()  # nothing repaired in training
    assert result.regions and result.report == run_dir / "report" / "index.html" and result.report.exists()
    assert f"defuse label --run-dir {run_dir}" in capsys.readouterr().out
    logs = next((tmp_path / "run-logs").rglob("metrics.csv")).read_text()
    assert "defuse/regions" in logs.splitlines()[0]
    assert f"defuse/report: {result.report}" in next((tmp_path / "run-logs").rglob("hparams.yaml")).read_text()
    sizes = json.loads((run_dir / "manifest.json").read_text())["stages"]["fit-classifier"]["metrics"]["split_sizes"]
    assert sizes["test"] == 1797 - 1257 - 179 and sum(sizes.values()) == 1797  # the data module's own test split


def test_scan_stops_for_labels_then_resumes_with_them_and_repairs_the_users_model(tmp_path):
    scan_my_model = example("scan_my_model")
    run_dir = tmp_path / "run"
    first = scan_my_model.main(["--run-dir", str(run_dir), "--epochs", "10", *tiny_settings()])
    assert first.awaiting_labels and first.regions
    written = {name: (run_dir / name).stat().st_mtime_ns for name in ("data.npz", "classifier.pt")}

    labels = tmp_path / "labels.yaml"  # a person's answers: every region is a bug of its source class
    labels.write_text("".join(f"{r['id']}: {r['source_label']}\n" for r in first.regions))
    second = scan_my_model.main(["--run-dir", str(run_dir), "--epochs", "10", "--labels", str(labels),
                                 *tiny_settings()])
    assert second.status == "complete" and second.summary["regions_labelled_bug"] == len(first.regions)
    status = {stage.name: stage.status for stage in second.stages}
    assert {status[name] for name in ("fit-classifier", "fit-generator", "identify", "distill")} == \
        {"skipped (current)"}  # the same model and data: resumed, not redone
    assert {name: (run_dir / name).stat().st_mtime_ns for name in written} == written
    assert safe_load(run_dir / "repaired.ckpt")["kind"] == "torchscript"
    verified = json.loads((run_dir / "verify.json").read_text())["clean_accuracy"]  # what the result reports
    assert (second.summary["clean_accuracy"]["before"], second.summary["clean_accuracy"]["after"]) == \
        (verified["before"], verified["after"])


def test_scan_refuses_normalised_images_and_says_where_normalisation_belongs(tmp_path):
    import torch
    from torch.utils.data import TensorDataset

    import defuse

    images = torch.randn(20, 1, 28, 28)  # standardised, as many transforms leave them
    data = {"train": TensorDataset(images, torch.arange(20) % 2), "test": TensorDataset(images, torch.arange(20) % 2)}
    with pytest.raises(ValueError, match="defuse needs them in \\[0, 1\\].*into the model"):
        defuse.scan(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 2)), data, run_dir=tmp_path)
