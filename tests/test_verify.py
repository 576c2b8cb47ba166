import numpy as np
import pandas as pd
import torch

from defuse.distill import Regions
from defuse.verify import bootstrap_accuracy, failures_in_region, verify
from stubs import LineClassifier, LineGenerator
from test_correct import _region


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n():
    rng = torch.Generator().manual_seed(0)
    small = torch.rand(100, generator=rng) < 0.9
    large = torch.rand(10_000, generator=rng) < 0.9
    a, b = bootstrap_accuracy(small, small), bootstrap_accuracy(large, large)
    assert a["before_ci95"][0] <= a["before"] <= a["before_ci95"][1]
    assert (b["before_ci95"][1] - b["before_ci95"][0]) < (a["before_ci95"][1] - a["before_ci95"][0]) / 5
    assert a["change"] == 0.0 and a["change_ci95"] == [0.0, 0.0]  # paired resamples: no change, no spread
    better = bootstrap_accuracy(small, torch.ones(100, dtype=torch.bool))
    assert better["change"] > 0 and better["change_ci95"][0] > 0


def test_failures_in_region_counts_only_its_pair_inside_its_ellipsoid():
    region = _region(1)  # mean (2, 1), cov 0.1 I, pair 0 -> 1
    z = np.array([[2.0, 1.0], [2.1, 1.0], [5.0, 5.0], [2.0, 1.0]], dtype=np.float32)
    table = pd.DataFrame({"source_label": [0, 0, 0, 3], "predicted_label": [1, 1, 1, 1]})
    assert failures_in_region(region, table, z, tau=1.0) == 2


def test_verify_measures_region_accuracy_on_fresh_samples():
    regions = Regions([_region(1), _region(2)], {})
    # the region sits at z0 = 2, where LineClassifier says 1; "repaired" says 0 everywhere
    always_zero = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        always_zero[1].weight.zero_()
        always_zero[1].bias.copy_(torch.tensor([1.0, 0.0]))
    images = LineGenerator().decode(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    labels = torch.tensor([0, 1])
    empty = (pd.DataFrame({"source_label": [], "predicted_label": []}), np.zeros((0, 2), np.float32))
    before = (pd.DataFrame({"source_label": [0], "predicted_label": [1]}), np.array([[2.0, 1.0]], np.float32))
    result = verify(LineClassifier(), always_zero, images, labels, ("zero", "one"), regions, {1: 0},
                    LineGenerator(), tau=1.0, samples_per_region=64, failures_before=before, failures_after=empty)
    region = result["regions"][0]
    assert region["accuracy_before"] < 0.1 and region["accuracy_after"] == 1.0
    assert result["regions"][1]["label"] is None and "accuracy_before" not in result["regions"][1]
    assert result["rediscovery"] == {"regions_before": 1, "regions_after": 0, "failures_before": 1, "failures_after": 0}
    assert result["clean_accuracy"]["before"] == 1.0 and result["clean_accuracy"]["after"] == 0.5
    assert result["per_class_accuracy"]["one"] == {"before": 1.0, "after": 0.0, "n": 1}
