import json

import numpy as np
import pandas as pd
import torch
from stubs import LineClassifier, LineGenerator, line_images, line_validity
from test_correct import _region

from defuse.config import IdentifyConfig
from defuse.data import ImageSet
from defuse.records import Regions, Verification
from defuse.stages.verify.compare import compare, failures_in_region, verify
from defuse.stats import bootstrap_accuracy


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
    result = compare(LineClassifier(), always_zero, images, labels, ("zero", "one"), regions, {1: 0},
                     LineGenerator(), tau=1.0, samples_per_region=64, failures_before=before, failures_after=empty)
    region = result["regions"][0]
    assert region["accuracy_before"] < 0.1 and region["accuracy_after"] == 1.0
    assert result["regions"][1]["label"] is None and "accuracy_before" not in result["regions"][1]
    assert result["rediscovery"] == {"regions_before": 1, "regions_after": 0, "failures_before": 1, "failures_after": 0}
    assert result["clean_accuracy"]["before"] == 1.0 and result["clean_accuracy"]["after"] == 0.5
    assert result["per_class_accuracy"]["one"] == {"before": 1.0, "after": 0.0, "n": 1}


class _FloatImages(ImageSet):
    """The stub world's images are latent coordinates (negative too): handed out as they are, not as uint8 / 255."""

    def float_images(self) -> torch.Tensor:
        return self.images


def _always(label: int) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]) if label == 0 else torch.tensor([0.0, 1.0]))
    return model


def test_verify_searches_the_test_split_against_both_models(tmp_path):
    images, labels = line_images(30)  # all class 0, left of the line z0 = 1 where LineClassifier flips to 1
    test = _FloatImages(images, labels, ("zero", "one"))
    regions = Regions([_region(1)], {})
    search = IdentifyConfig(screen=False, budget=32, shells=4, directions=4, min_radius=0.5, max_radius=4.0)
    checked = verify(LineClassifier(), _always(0), test, regions, {1: 0}, LineGenerator(),
                     line_validity(), tau=1.0, search=search, samples_per_region=32)
    (pair,) = checked.result["failures_by_pair"]
    counts = checked.result["failures_by_pair"][pair]
    assert pair == "zero -> one" and counts["failures_before"] > 0 and counts["sources_before"] > 0
    assert counts["failures_after"] == counts["sources_after"] == 0
    assert checked.result["search_queries"]["before"] > 0 and checked.result["search_queries"]["after"] == 30 * 16
    assert checked.result["rediscovery"]["failures_after"] == 0  # the repaired model never says 1
    assert checked.result["clean_accuracy"]["n"] == 30
    checked.save(tmp_path / "verify.json")
    assert Verification.load(tmp_path / "verify.json").result == json.loads((tmp_path / "verify.json").read_text())
    assert checked.metrics["clean_accuracy_before"] == 1.0 and checked.metrics["rediscovery_failures_after"] == 0


def test_a_kept_original_is_not_searched_again(monkeypatch):
    """The guard kept the original (or nothing was labelled a bug): before and after are the same model, so the
    test split is not searched at all and verify.json says why; the rest of verify (accuracy, fresh region
    samples) is still measured."""
    import copy

    import defuse.stages.verify.compare as verify_module

    images, labels = line_images(30)
    test = _FloatImages(images, labels, ("zero", "one"))
    searches = []
    real_identify = verify_module.identify
    monkeypatch.setattr(verify_module, "identify", lambda *a, **k: searches.append(a[0]) or real_identify(*a, **k))
    search = IdentifyConfig(screen=False, budget=32, shells=4, directions=4, min_radius=0.5, max_radius=4.0)
    original = LineClassifier()
    checked = verify(original, copy.deepcopy(original), test, Regions([_region(1)], {}), {1: 0}, LineGenerator(),
                     line_validity(), tau=1.0, search=search, samples_per_region=32)
    assert searches == []
    assert "failures_by_pair" not in checked.result and "rediscovery" not in checked.result
    assert checked.result["search"].startswith("not run: the original weights were kept")
    (region,) = checked.result["regions"]
    assert region["accuracy_before"] == region["accuracy_after"] and "failures_before" not in region
