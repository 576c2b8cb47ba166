"""scripts/bench_generators.py: the sample-quality distance it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_generators as bg


def test_the_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift_and_a_spread():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    assert bg.frechet(a, a) == pytest.approx(0.0, abs=1e-4)
    # Same covariance, means 0.5 apart in every one of 8 dimensions: the squared distance of the means, 8 * 0.25.
    assert bg.frechet(a, a + 0.5) == pytest.approx(2.0, abs=1e-3)
    # Same mean, twice the spread: trace(I + 4I - 2 * 2I) = 8 for unit Gaussians, up to sampling error.
    assert bg.frechet(a, 2 * a) == pytest.approx(8.0 * float(np.var(a)), rel=0.05)
    dead = a.copy()
    dead[:, 0] = 0.0  # a feature that never fires (a dead ReLU): still a finite, defined distance
    assert np.isfinite(bg.frechet(dead, a))
