"""``defuse.scan``: the pipeline of ``defuse run`` on a model and data a user already has in Python.

A Lightning user has a ``LightningModule`` (or any ``nn.Module``) and a ``LightningDataModule`` (or train, val and
test datasets of ``(image, label)``). :func:`scan` turns them into what a run directory holds, and runs the same
stages through :func:`defuse.pipeline.run_pipeline`:

- the data become ``<run_dir>/data.npz`` (the user's train and val images are the pool defuse carves train, val and
  audit from; the user's test split stays the test split, graded only), read by the ``npz`` source;
- the model becomes ``<run_dir>/classifier.pt``, a TorchScript trace of it (checked against the module on a
  batch), adopted as ``classifier.torchscript``: defuse never pickles a user's object, and a repair is saved as that
  file plus fine-tuned weights.

Both files are rewritten only when their content changes, so calling :func:`scan` again with the same model and data
resumes where the last call stopped (the stages' fingerprints follow the files' content), e.g. after labelling the
regions with ``defuse label --run-dir <run_dir>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defuse.config import RunConfig, config_from_mapping, load_config
from defuse.pipeline import StageResult, run_pipeline
from defuse.rundir import RunDir

DATA_FILE = "data.npz"
MODEL_FILE = "classifier.pt"
USER_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ScanResult:
    """What a scan found (and repaired, once its regions are labelled)."""

    run_dir: Path
    status: str  # the report's: "complete", or "awaiting labels" (nothing repaired yet)
    stages: tuple[StageResult, ...]
    regions: list[dict[str, Any]]  # the ranked misclassification regions, as regions.json lists them
    report: Path  # report/index.html
    summary: dict[str, Any]  # report.json's summary (regions found, labelled, repaired) and clean accuracy

    @property
    def awaiting_labels(self) -> bool:
        return self.status == "awaiting labels"


def scan(model: nn.Module, data: Any, run_dir: str | Path = "runs/scan", labels: str | Path = "later",
         config: str | Path | None = None, overrides: Sequence[str] = (), classes: Sequence[str] | None = None,
         ) -> ScanResult:
    """Find (and, with labels, repair) the bugs of ``model`` on ``data``, as ``defuse run`` does.

    Args:
        model: a classifier mapping float images in [0, 1], ``(N, C, H, W)``, to logits ``(N, K)``: a
            ``LightningModule`` or any ``nn.Module``; normalisation belongs inside it.
        data: a ``LightningDataModule`` (its ``train_dataloader``, ``val_dataloader`` and ``test_dataloader``
            datasets are read in order, once), or a mapping ``{"train": ..., "val": ..., "test": ...}`` of datasets
            of ``(image, label)`` (``val`` optional). Images as the model takes them: float in [0, 1].
        run_dir: where the artifacts go; a second call with the same inputs resumes.
        labels: ``"later"`` (default: nobody is asked now; the scan stops before any repair and the regions await
            labels), ``"prompt"`` (ask at the terminal), ``"auto"`` (the conservative suggestions, on request) or a
            labels file (region id -> class, ``not-a-bug`` or ``skip``).
        config: a YAML config (or the name of a shipped one) for everything else; default: the built-in one.
        overrides: ``key=value`` strings, as ``--set`` takes them, e.g. ``["generator.epochs=30"]``.
        classes: the class names, in label order (default: the data module's or dataset's ``classes``, else
            ``0..K-1``).
    """
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    splits = _datasets(data)
    arrays = {name: _to_uint8(dataset, name) for name, dataset in splits.items()}
    names = list(classes) if classes is not None else _class_names(data, splits)
    height, width = arrays["train"][0].shape[-2:]
    if height != width:
        raise ValueError(f"defuse works on square images; the data's are {height}x{width}. Resize them in the "
                         f"datasets' transforms (e.g. torchvision.transforms.v2.Resize(({height}, {height}))).")
    data_path = _write_data(run.path(DATA_FILE), arrays, names)
    example = torch.from_numpy(arrays["train"][0][:8]).float().div(255.0)
    model_path = _write_traced(run.path(MODEL_FILE), model, example)
    settings = [*overrides, "data.source=npz", f"data.root={data_path}", f"data.image_size={height}",
                f"classifier.torchscript={model_path}", f"label.mode={labels}"]
    run_config = load_config(config, settings)
    results = run_pipeline(run_config, run)
    return _result(run, results)


def scan_config(run_dir: str | Path) -> RunConfig:
    """The config a scan ran with (from its manifest), e.g. for ``defuse.stages.review.review_command``."""
    return config_from_mapping(RunDir(run_dir).manifest()["config"], [])


# ----------------------------------------------------------------------------- data


def _datasets(data: Any) -> dict[str, Dataset]:
    if isinstance(data, Mapping):
        unknown = set(data) - set(USER_SPLITS)
        if unknown or "train" not in data or "test" not in data:
            raise ValueError(f"`data` as a mapping takes datasets under train, test and (optionally) val; got keys "
                             f"{sorted(data)} instead.")
        return {name: data[name] for name in USER_SPLITS if data.get(name) is not None}
    loaders = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
    if not all(hasattr(data, method) for method in loaders.values()):
        raise TypeError(f"`data` must be a LightningDataModule or a mapping of datasets, got {type(data).__name__} "
                        f"instead.")
    if hasattr(data, "prepare_data"):
        data.prepare_data()
    if hasattr(data, "setup"):
        data.setup("fit")
        data.setup("test")
    out: dict[str, Dataset] = {}
    for name, method in loaders.items():
        try:
            loader = getattr(data, method)()
        except NotImplementedError:  # Lightning's default when a data module has no such split
            if name == "val":
                continue
            raise ValueError(f"The data module has no {method}: defuse needs a {name} split.") from None
        out[name] = loader.dataset if isinstance(loader, DataLoader) else loader
    return out


def _to_uint8(dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's images as uint8 (N, C, H, W) and labels (N,), read in order, in batches."""
    images, labels = [], []
    for batch in DataLoader(dataset, batch_size=512, shuffle=False):
        x, y = batch[0], batch[1]
        x = torch.as_tensor(x)
        if not torch.is_floating_point(x):
            raise ValueError(f"The {split} images are {x.dtype}; defuse needs float images in [0, 1] (e.g. "
                             f"torchvision.transforms.v2.ToDtype(torch.float32, scale=True)).")
        low, high = float(x.min()), float(x.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(f"The {split} images range over [{low:.3g}, {high:.3g}]; defuse needs them in [0, 1]. "
                             f"Move normalisation out of the dataset's transform and into the model (e.g. a first "
                             f"layer that subtracts the mean and divides by the std).")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        images.append(x.clamp(0, 1).mul(255).round().to(torch.uint8))
        labels.append(torch.as_tensor(y).long())
    return torch.cat(images).numpy(), torch.cat(labels).numpy()


def _class_names(data: Any, splits: Mapping[str, Dataset]) -> list[str] | None:
    for holder in (data, splits["train"], getattr(splits["train"], "dataset", None)):
        names = getattr(holder, "classes", None)
        if isinstance(names, Sequence) and not isinstance(names, str) and len(names) >= 2:
            return [str(name) for name in names]
    return None


def _write_data(path: Path, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
                classes: list[str] | None) -> Path:
    """data.npz: x, y (the user's train then val: the pool), x_test, y_test, classes; untouched if unchanged."""
    pool = [arrays[name] for name in ("train", "val") if name in arrays]
    content = {"x": np.concatenate([x for x, _ in pool]).transpose(0, 2, 3, 1),
               "y": np.concatenate([y for _, y in pool]),
               "x_test": arrays["test"][0].transpose(0, 2, 3, 1), "y_test": arrays["test"][1]}
    if classes is not None:
        content["classes"] = np.asarray(classes, dtype=str)
    if path.exists():
        with np.load(path, allow_pickle=False) as old:
            if set(old.files) == set(content) and all(np.array_equal(old[key], value)
                                                      for key, value in content.items()):
                return path
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **content)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- model


def _write_traced(path: Path, model: nn.Module, example: torch.Tensor) -> Path:
    """The model as TorchScript (traced on ``example``, checked against the module); untouched if unchanged."""
    import pytorch_lightning as pl

    training = model.training
    parameter = next(model.parameters(), None)
    x = example.to(parameter.device) if parameter is not None else example
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x)
        if not isinstance(expected, torch.Tensor) or expected.dim() != 2:
            shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else ""
            raise ValueError(f"The model must return logits (N, K) for images (N, C, H, W); it returned "
                             f"{type(expected).__name__}{shape} for {tuple(example.shape)}.")
        try:
            with torch.no_grad():
                # A LightningModule traces itself (its Trainer-bound properties stay out of the trace).
                traced = (model.to_torchscript(method="trace", example_inputs=x)
                          if isinstance(model, pl.LightningModule) else torch.jit.trace(model, x, check_trace=False))
        except Exception as err:  # tracing fails in many ways; all mean the same to the user
            raise ValueError(f"defuse could not trace the model with torch.jit.trace ({type(err).__name__}: {err}). "
                             f"Export it yourself (torch.jit.script) and use classifier.torchscript, or give a "
                             f"factory: classifier.factory=path/to/file.py:build.") from None
    finally:
        model.train(training)
    traced = traced.cpu().eval()
    with torch.no_grad():
        if not torch.allclose(traced(example), expected.cpu(), atol=1e-5, rtol=1e-4):
            raise ValueError("The traced model does not reproduce the model's logits (data-dependent control flow "
                             "in forward?). Export it with torch.jit.script and use classifier.torchscript.")
    if path.exists():
        from defuse.models.loading import load_torchscript

        old = load_torchscript(path).state_dict()
        new = traced.state_dict()
        if old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new):
            with torch.no_grad():
                if torch.equal(load_torchscript(path)(example), traced(example)):
                    return path
    tmp = path.with_name(path.name + ".tmp")
    traced.save(str(tmp))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- result


def _result(run: RunDir, results: list[StageResult]) -> ScanResult:
    import json

    from defuse.artifacts import REGIONS_JSON, REPORT_HTML, REPORT_JSON

    report = json.loads(run.path(REPORT_JSON).read_text())
    regions = json.loads(run.path(REGIONS_JSON).read_text())["regions"] if run.path(REGIONS_JSON).exists() else []
    return ScanResult(run_dir=run.root, status=report["status"], stages=tuple(results), regions=regions,
                      report=run.path(REPORT_HTML),
                      summary={**report["summary"], "clean_accuracy": report.get("clean_accuracy")})
