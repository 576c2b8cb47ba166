"""Saving and loading classifiers and generators, with torch's weights-only loading only.

defuse's own checkpoints are plain dicts ``{"format", "hparams", "state_dict", ...}``
of tensors and primitives, which ``torch.load(weights_only=True)`` reads without
running any pickled code. A file that needs more (a pickled class, a lambda, a
``__reduce__`` payload) is refused. A user's classifier comes as a TorchScript
file, or as ``package.module:function`` plus a safetensors / state-dict file.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defuse.models.classifiers import build_classifier
from defuse.models.generators import ConvVAE
from defuse.rundir import atomic_torch_save, sha256_file

CLASSIFIER_FORMAT = "defuse.classifier/1"
GENERATOR_FORMAT = "defuse.generator/1"


def safe_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a file carrying pickled code is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Refusing to load {path}: it carries pickled Python objects that weights-only loading rejects "
            f"({reason}). defuse never unpickles code from a file. Re-save the weights as a plain state dict "
            f"(torch.save(model.state_dict(), path)) or as .safetensors."
        ) from None
    except Exception as err:  # torch raises many kinds on garbage input; all mean the same to the user
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}).") from None


@dataclass(frozen=True)
class LoadedClassifier:
    """A classifier ready for inference: ``model`` maps [0,1] images (N,C,H,W) to logits (N,K)."""

    model: nn.Module
    classes: tuple[str, ...]
    hparams: dict[str, Any]


# ----------------------------------------------------------------------------- classifiers


def save_classifier(path: str | Path, model: nn.Module, hparams: dict[str, Any]) -> None:
    """Save a classifier's weights with what rebuilds it: the hparams of a defuse-built one (``build_classifier``),
    or, for one a user brought (``hparams["brought"]``, set by :func:`load_classifier`), where its module comes
    from (the TorchScript file or the factory), whose weights these replace (a fine-tuned repair)."""
    brought = hparams.get("brought")
    if brought:
        source = dict(brought["source"])
        hashes = {key: sha256_file(Path(value)) for key, value in source.items()
                  if key in ("torchscript", "weights") and value and Path(value).is_file()}
        payload = {"format": CLASSIFIER_FORMAT, "kind": brought["kind"], "source": source, "sha256": hashes,
                   "hparams": _plain({k: v for k, v in hparams.items() if k != "brought"}),
                   "state_dict": model.state_dict()}
    else:
        payload = {"format": CLASSIFIER_FORMAT, "kind": "builtin", "hparams": _plain(hparams),
                   "state_dict": model.state_dict()}
    atomic_torch_save(Path(path), payload)


def save_classifier_pointer(path: str | Path, kind: str, source: dict[str, str], classes: tuple[str, ...]) -> None:
    """Record where a user's classifier lives (and the hashes of its files) instead of copying it."""
    hashes = {key: sha256_file(Path(value)) for key, value in source.items() if key in ("torchscript", "weights") and value}
    atomic_torch_save(
        Path(path),
        {"format": CLASSIFIER_FORMAT, "kind": kind, "source": source, "sha256": hashes,
         "hparams": {"classes": list(classes), "num_classes": len(classes)}},
    )


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Load any classifier checkpoint defuse wrote (built-in weights or a pointer to a user's model)."""
    payload = _expect_format(safe_load(path), CLASSIFIER_FORMAT, path)
    hparams = payload.get("hparams", {})
    classes = tuple(hparams.get("classes") or [str(i) for i in range(hparams.get("num_classes", 0))])
    kind = payload.get("kind", "builtin")
    if hparams.get("scoped_classes"):
        raise ValueError(f"{path} is a scoped repair, written by a defuse before 2026-12-07 (the original and the "
                         "fine-tuned weights together); this version repairs without the scope and cannot read it. "
                         "Re-run the repair: `defuse run --force correct` with its run directory.")
    if kind == "builtin":
        model = build_classifier(hparams["arch"], hparams["in_channels"], hparams["num_classes"], hparams["mean"],
                                 hparams["std"], hparams.get("width", 32))
        model.load_state_dict(payload["state_dict"])
    elif kind in ("torchscript", "factory"):
        source = payload["source"]

        def build() -> nn.Module:
            if kind == "torchscript":
                return load_torchscript(source["torchscript"])
            return load_factory(source["factory"], source.get("weights") or None)

        model = build()
        if "state_dict" in payload:  # a repair of the user's model: its fine-tuned weights
            model.load_state_dict(payload["state_dict"])
        # Where the module comes from travels with it, so a repair of it is saved the same way (save_classifier).
        hparams = {**hparams, "brought": {"kind": kind, "source": dict(source)}}
    else:
        raise ValueError(f"{path}: unknown classifier kind {kind!r}; it was written by a newer defuse?")
    return LoadedClassifier(model.eval(), classes, dict(hparams))


def load_torchscript(path: str | Path) -> nn.Module:
    """A TorchScript classifier (TorchScript archives hold TorchScript code, not pickled Python)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript classifier {path} does not exist.")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ValueError(f"{path} is not a TorchScript file ({str(err).splitlines()[0]}). "
                         f"Export one with torch.jit.script(model).save(path).") from None


def load_factory(factory: str, weights: str | Path | None) -> nn.Module:
    """Build ``package.module:function()`` (or ``path/to/file.py:function()``) and load a safetensors or state-dict
    file into it. The factory is the user's own code, run as it is; only the weights file is data."""
    module_name, _, attr = factory.rpartition(":")
    try:
        if module_name.endswith(".py"):
            builder = getattr(_module_from_file(Path(module_name)), attr)
        else:
            builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, FileNotFoundError) as err:
        raise ValueError(
            f"Cannot import classifier factory {factory!r} ({type(err).__name__}: {err}). Give it as "
            f"package.module:function importable from here (run from the folder that holds it, or add that folder "
            f"to PYTHONPATH), or as a file: path/to/file.py:function.") from None
    model = builder()
    if not isinstance(model, nn.Module):
        raise TypeError(f"Classifier factory {factory!r} must return an nn.Module, got {type(model).__name__} instead.")
    if weights:
        state = _load_state_dict(Path(weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{weights} does not fit the module built by {factory!r}: {str(err).splitlines()[0]}") from None
    return model


def _module_from_file(path: Path):
    """Import a Python file as a module (``classifier.factory: path/to/file.py:function``)."""
    import importlib.util
    import sys

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    name = f"defuse_user_factory_{sha256_file(path)[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as `import` does (dataclasses and pickling look it up)
    spec.loader.exec_module(module)
    return module


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"Weights file {path} does not exist.")
        return load_file(str(path))
    state = safe_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} must hold a state dict (parameter name -> tensor).")
    return state


# ----------------------------------------------------------------------------- generators


def save_generator(path: str | Path, vae: nn.Module, hparams: dict[str, Any]) -> None:
    atomic_torch_save(Path(path), {"format": GENERATOR_FORMAT, "hparams": _plain(hparams), "state_dict": vae.state_dict()})


def load_generator(path: str | Path) -> nn.Module:
    """The generator a generator.ckpt holds: a ConvVAE, or (``kind: gan``) an InvertedGAN."""
    payload = _expect_format(safe_load(path), GENERATOR_FORMAT, path)
    h = payload["hparams"]
    if h.get("kind", "vae") == "gan":
        from defuse.models.gan import InvertedGAN

        generator = InvertedGAN(h["in_channels"], h["image_size"], h["latent_dim"], h["width"])
    else:
        generator = ConvVAE(h["in_channels"], h["image_size"], h["latent_dim"], h["width"], h.get("num_classes", 0))
    generator.load_state_dict(payload["state_dict"])
    return generator.eval()


def _expect_format(payload: Any, expected: str, path: str | Path) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != expected:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a {expected} checkpoint (found {found!r}).")
    return payload


def _plain(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as builtins only, so weights-only loading accepts them."""
    out: dict[str, Any] = {}
    for key, value in dict(hparams).items():
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out
