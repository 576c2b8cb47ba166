"""Named random streams: every random draw of a run derives from the config's one seed and a stream name.

``stream(seed, "correct.train_samples")`` always gives the same numbers for the same seed, and different
names give independent streams (numpy's ``SeedSequence`` with the name hashed into its spawn key). A stage
that needs randomness names its stream instead of adding an offset to the seed (``seed + 11``), so two
stages can never collide on one stream and adding a stream changes no other.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def seed_sequence(seed: int, name: str) -> np.random.SeedSequence:
    """The stream ``name`` of ``seed``: its spawn key is the name's sha256, stable across runs and platforms."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {seed!r} instead.")
    if not name:
        raise ValueError("`name` must name the stream, e.g. 'distill.refine', got an empty string instead.")
    digest = hashlib.sha256(name.encode()).digest()
    key = tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))
    return np.random.SeedSequence(int(seed), spawn_key=key)


def numpy_rng(seed: int, name: str) -> np.random.Generator:
    """A numpy Generator on stream ``name``."""
    return np.random.default_rng(seed_sequence(seed, name))


def int_seed(seed: int, name: str) -> int:
    """An int in [0, 2**32) on stream ``name``, for APIs that take an integer seed (scikit-learn, umap, torch)."""
    return int(seed_sequence(seed, name).generate_state(1, np.uint32)[0])


def torch_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator on stream ``name``."""
    import torch

    return torch.Generator(device=device).manual_seed(int_seed(seed, name))
