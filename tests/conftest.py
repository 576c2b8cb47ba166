"""Shared fixtures: tiny configs and tiny image sets, so every test runs in seconds on CPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import settings

from defuse.config import config_from_mapping, load_config
from defuse.data import default_mnist_raw
from defuse.rundir import RunDir

# Every test trains what it trains: a cache of fitted models (defuse.cache) shared between tests would make "the
# same seed gives the same model" true by construction and hide a stage's training from the test of it. The
# cache's own test turns it on in a folder of its own; child processes inherit this.
os.environ["DEFUSE_CACHE"] = "off"

# Property tests draw the same examples on every run: a CI result must not depend on which random examples a run
# happened to try (a failure found once is kept as a test of its own, not left to chance).
settings.register_profile("defuse", derandomize=True, database=None)
settings.load_profile("defuse")

# Digits with tiny models: enough to exercise every code path, fast enough for CI.
TINY_OVERRIDES = [
    "classifier.epochs=2", "generator.epochs=1", "generator.width=8", "generator.latent_dim=4",
    "trainer.progress_bar=false", "data.batch_size=64",
    "identify.max_sources=40", "identify.budget=32", "identify.shells=4", "identify.refine_steps=2",
    "identify.screen=false",  # a 1-epoch VAE's posterior is too wide for the judge: screened, nothing is queried
    "distill.umap=false", "distill.fresh_samples=32",
    "correct.epochs=1", "correct.lambdas=[1.0]", "correct.samples_per_region=16", "correct.val_samples_per_region=8",
    "check.max_images=64",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Digits with tiny models: enough to exercise every code path, fast enough for CI."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_config(tiny_overrides):
    return load_config(None, tiny_overrides)


@pytest.fixture
def mnist_raw():
    folder = default_mnist_raw()
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX test files not found in {folder}")
    return folder


def write_idx(path, array: np.ndarray) -> None:
    """Write an uint8 array in the MNIST IDX format (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_npz(path, n=30, k=3, size=8, channels=None, seed=0) -> None:
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    np.savez(path, x=rng.integers(0, 256, size=shape, dtype=np.uint8), y=np.arange(n) % k)


def make_folder(root, classes=("cat", "dog"), per_class=4, size=(10, 10), mode="L") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


def with_overrides(config, *overrides):
    return config_from_mapping(config.to_dict(), list(overrides))


def label_every_region(run: RunDir) -> str:
    """A person's labels file: every region is a bug of its source class."""
    import json

    import yaml

    regions = json.loads(run.path("regions.json").read_text())["regions"]
    assert regions, "the tiny models produced no region"
    path = run.path("answers.yaml")
    path.write_text(yaml.safe_dump({r["id"]: r["source_label"] for r in regions}))
    return str(path)


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """One tiny run through every stage, with a labels file; its config (shared: tests must not change it)."""
    from defuse.pipeline import AWAITING_LABELS, run_pipeline

    torch.set_num_threads(2)
    run = RunDir(tmp_path_factory.mktemp("run"))
    config = load_config(None, TINY_OVERRIDES)
    results = run_pipeline(config, run)
    assert [r.status for r in results][-3:] == [AWAITING_LABELS, AWAITING_LABELS, "done"]  # the report still runs
    config = with_overrides(config, f"label.mode={label_every_region(run)}")
    run_pipeline(config, run)
    return run, config
