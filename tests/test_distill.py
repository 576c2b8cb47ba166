import json
import re

import numpy as np
import pandas as pd
import pytest
from stubs import LineGenerator, QuadrantClassifier, quadrant_validity

from defuse.config import DistillConfig
from defuse.records import Failures, Region, Regions
from defuse.regions import region_grids, region_misreadings
from defuse.stages.distill.mixture import (
    LabelMargins,
    RealEvidence,
    distill,
    save_grid_png,
)

CLASSES = ("zero", "one", "two")
CONFIG = DistillConfig(max_components=4, min_failures=5, min_region_size=5, fresh_samples=200)


def make_failures(clusters, seed=0) -> Failures:
    """clusters: list of (centre, spread, n, source, predicted)."""
    rng = np.random.default_rng(seed)
    z, rows = [], []
    for centre, spread, n, source, predicted in clusters:
        z.append(rng.normal(centre, spread, size=(n, 2)))
        rows += [(source, predicted)] * n
    z = np.concatenate(z).astype(np.float32)
    pairs = np.array(rows)
    table = pd.DataFrame({
        "source_index": np.arange(len(z)), "source_label": pairs[:, 0], "predicted_label": pairs[:, 1],
        "confidence": 0.9, "source_confidence": 0.95, "radius": np.linalg.norm(z, axis=1),
        "validity": 0.5, "validity_label": 0, "valid": True, "mode": "shell",
    })
    return Failures(table, z, {})


def _distill(failures, config=CONFIG, seed=0, real=None, margins=None):
    return distill(failures, QuadrantClassifier(), LineGenerator(), quadrant_validity(), CLASSES, config, seed=seed,
                   real=real, margins=margins)


TWO_PAIRS = [((2.5, -1.0), 0.15, 40, 0, 1), ((-1.0, 2.5), 0.15, 40, 0, 2), ((2.5, 2.5), 0.1, 6, 2, 1)]


def test_regions_are_pure_in_their_pair_and_consistently_misclassified():
    regions = _distill(make_failures(TWO_PAIRS))
    assert len(regions) >= 3
    pairs = {(r.source_label, r.predicted_label) for r in regions.regions}
    assert pairs == {(0, 1), (0, 2), (2, 1)}
    for region in regions.regions:
        assert region.purity == 1.0
        assert region.error_rate > 0.9  # fresh samples are read as the predicted class
        assert region.pair == f"{CLASSES[region.source_label]} -> {CLASSES[region.predicted_label]}"
    assert [r.id for r in regions.regions] == list(range(1, len(regions) + 1))
    firsts, rest = regions.regions[:len(pairs)], regions.regions[len(pairs):]  # each pair's best, then the rest
    assert len({(r.source_label, r.predicted_label) for r in firsts}) == len(pairs)
    for part in (firsts, rest):
        assert [r.bug_score for r in part] == sorted((r.bug_score for r in part), reverse=True)


STRADDLING = [((2.5, -1.0), 0.15, 40, 0, 1), ((1.0, -4.0), 0.3, 40, 0, 1)]


def test_a_region_straddling_the_boundary_has_a_lower_error_rate_and_the_score_is_the_product():
    regions = _distill(make_failures(STRADDLING), DistillConfig(**{**CONFIG.__dict__, "refine_steps": 0}))
    by_centre = sorted(regions.regions, key=lambda r: r.mean[1])
    straddling, deep = by_centre[0], by_centre[-1]
    assert straddling.mean[1] < -3 and deep.mean[1] > -2
    assert deep.error_rate > 0.9 and 0.2 < straddling.error_rate < 0.8
    for r in regions.regions:
        assert r.real_neighbours == 0 and r.real_error_rate == pytest.approx(0.1)  # no real images: the prior
        assert r.bug_score == pytest.approx(r.error_rate * r.validity * r.confidence * r.real_error_rate, abs=2e-4)


def test_refinement_moves_a_straddling_region_onto_its_misread_side():
    raw = _distill(make_failures(STRADDLING), DistillConfig(**{**CONFIG.__dict__, "refine_steps": 0}))
    refined = _distill(make_failures(STRADDLING))  # default: 2 cross-entropy-method steps
    lowest = lambda regions: min(regions.regions, key=lambda r: r.mean[1])  # noqa: E731
    assert lowest(raw).error_rate < 0.6
    assert lowest(refined).error_rate > 0.85
    assert lowest(refined).mean[0] > 1.0  # its centre crossed the boundary z0 = 1 into the misread side


def test_real_images_misread_near_a_region_raise_its_score():
    clusters = [((2.5, -1.0), 0.15, 40, 0, 1), ((-1.0, 2.5), 0.15, 40, 0, 2)]
    without = {r.predicted_label: r for r in _distill(make_failures(clusters)).regions}
    rng = np.random.default_rng(1)
    # Real images of class 0 near the centre of each region, read as the region's mistake only in 0 -> 1;
    # and real images of class 1 right at the first centre, which are not its source class and must not count.
    z = np.concatenate([without[1].sample(12, 0.2, rng), without[2].sample(12, 0.2, rng),
                        without[1].sample(5, 0.01, rng)])
    labels = np.array([0] * 24 + [1] * 5)
    real = RealEvidence(z, labels, np.array([1] * 12 + [0] * 12 + [1] * 5))
    config = DistillConfig(**{**CONFIG.__dict__, "real_neighbours": 12})
    with_real = {r.predicted_label: r for r in _distill(make_failures(clusters), config, real=real).regions}
    misread, read_right = with_real[1], with_real[2]
    assert (misread.real_neighbours, misread.real_misread) == (12, 12)
    assert (read_right.real_neighbours, read_right.real_misread) == (12, 0)
    assert 0 < misread.real_distance < 1.0  # the validity model's standardised units
    assert misread.real_error_rate == pytest.approx(12.5 / 17, abs=1e-4)
    assert read_right.real_error_rate == pytest.approx(0.5 / 17, abs=1e-4)
    # Same fresh samples (same seed): the score moves by the real-evidence factor alone.
    for r in (misread, read_right):
        assert r.bug_score == pytest.approx(r.error_rate * r.validity * r.confidence * r.real_error_rate, abs=1e-4)
    assert misread.bug_score > without[1].bug_score and read_right.bug_score < without[2].bug_score


def test_training_labels_fought_over_near_a_region_raise_its_doubt_and_score_and_other_classes_do_not_count():
    clusters = [((2.5, -1.0), 0.15, 40, 0, 1), ((-1.0, 2.5), 0.15, 40, 0, 2)]
    without = {r.predicted_label: r for r in _distill(make_failures(clusters)).regions}
    assert all(r.label_aum is None and r.label_doubt is None for r in without.values())
    rng = np.random.default_rng(2)
    # Training images of classes 0 and 1 around the 0 -> 1 region learnt with a margin of 1 (a labelling error's
    # look), those of 0 and 2 around 0 -> 2 with 8, the classes' typical image; and class-2 images with margin -5 at
    # the 0 -> 1 centre, which are not of that region's two classes and must not count.
    far = rng.normal((-4.0, -4.0), 0.3, size=(40, 2))
    z = np.concatenate([without[1].sample(10, 0.2, rng), without[2].sample(10, 0.2, rng),
                        without[1].sample(5, 0.01, rng), far])
    labels = np.array([0] * 5 + [1] * 5 + [0] * 5 + [2] * 5 + [2] * 5 + [0, 1, 2, 2] * 10)
    aum = np.array([1.0] * 10 + [8.0] * 10 + [-5.0] * 5 + [8.0] * 40)
    margins = LabelMargins(z, labels, aum)
    config = DistillConfig(**{**CONFIG.__dict__, "real_neighbours": 10})
    doubted = {r.predicted_label: r for r in _distill(make_failures(clusters), config, margins=margins).regions}
    fought, learnt = doubted[1], doubted[2]
    assert fought.label_aum == pytest.approx(1.0)
    # The row a person sees: training images of the region's source class (0) only, the hardest-learnt first.
    assert len(fought.doubted_nearest) == 8 and all(labels[i] == 0 for i in fought.doubted_nearest)
    assert aum[fought.doubted_nearest].tolist() == sorted(aum[fought.doubted_nearest].tolist())
    assert fought.doubted_nearest_read == []  # no training images held (no pictures): nothing read
    assert fought.label_doubt == pytest.approx(1 - 1.0 / 8.0, abs=1e-4)  # against the median AUM of classes 0 and 1
    assert learnt.label_aum == pytest.approx(8.0) and learnt.label_doubt == 0.0
    # Same fresh samples (same seed): the score moves by the evidence factor alone, a noisy-or of the two kinds.
    for r in (fought, learnt):
        evidence = 1 - (1 - r.real_error_rate) * (1 - r.label_doubt)
        assert r.bug_score == pytest.approx(r.error_rate * r.validity * r.confidence * evidence, abs=1e-4)
    assert fought.bug_score > 4 * without[1].bug_score
    assert learnt.bug_score == pytest.approx(without[2].bug_score, abs=1e-4)


def test_the_training_images_shown_beside_a_region_are_the_hardest_learnt_of_its_source_class_near_it():
    """Where every split carries one labelling error, the training images around its region that the model learnt
    late are the mislabelled ones, while the nearest are as often genuine: the row shows the lowest-AUM of the pool
    nearest the centre, of the region's source class only, hardest first."""
    rng = np.random.default_rng(3)
    centre = np.array([2.5, -1.0])
    nearest = centre + rng.normal(0, 0.02, size=(10, 2))  # genuine images, learnt easily
    around = centre + rng.normal(0, 0.4, size=(10, 2))  # a little farther: mislabelled ones, learnt late
    beyond = centre + 40 + rng.normal(0, 0.1, size=(5, 2))  # learnt latest of all, but far outside the pool
    other = centre + rng.normal(0, 0.01, size=(5, 2))  # another class's images at the centre: never shown
    z = np.concatenate([nearest, around, beyond, other])
    labels = np.array([0] * 25 + [1] * 5)
    aum = np.concatenate([np.full(10, 8.0), rng.permutation(np.linspace(-2.0, 1.0, 10)), np.full(5, -20.0),
                          np.full(5, -9.0)])
    margins = LabelMargins(z, labels, aum)
    shown = margins.hardest_near(centre, 0, quadrant_validity(), shown=4, pool=20)
    assert shown.tolist() == (10 + np.argsort(aum[10:20])[:4]).tolist()
    assert (aum[shown] == np.sort(aum[10:20])[:4]).all()  # hardest first


def test_training_margins_without_epochs_or_for_another_split_are_not_used(caplog):
    class Images:
        labels = __import__("torch").zeros(3, dtype=__import__("torch").long)

        def __len__(self):
            return 3

    assert LabelMargins.observe(LineGenerator(), Images(), np.zeros((0, 3), dtype=np.float32)) is None
    assert LabelMargins.observe(LineGenerator(), Images(), np.zeros((2, 5), dtype=np.float32)) is None
    assert "holds 5 training images' margins but the train split has 3" in caplog.text
    # Classes the classifier never fitted (median AUM <= 0) give no doubt rather than a meaningless ratio.
    margins = LabelMargins(np.zeros((4, 2)), np.array([0, 0, 1, 1]), np.array([-1.0, -2.0, -1.0, 0.0]))
    assert margins.around(np.zeros(2), (0, 1), quadrant_validity(), 2) is None


def test_overlapping_pairs_lower_purity():
    clusters = [((2.5, -1.0), 0.3, 40, 0, 1), ((2.5, -1.0), 0.3, 40, 2, 1)]
    regions = _distill(make_failures(clusters))
    assert all(r.purity < 0.7 for r in regions.regions)


def test_fewer_failures_than_components_gives_fewer_regions():
    regions = _distill(make_failures([((2.5, -1.0), 0.2, 7, 0, 1)]),
                       DistillConfig(max_components=6, min_failures=5, min_region_size=5))
    assert len(regions) == 1 and regions.regions[0].n_failures == 7


def test_small_pairs_get_no_region():
    regions = _distill(make_failures([((2.5, -1.0), 0.2, 4, 0, 1)]))
    assert len(regions) == 0 and regions.stats["pairs_too_small"] == 1


def test_no_failures_gives_an_empty_valid_regions_json(tmp_path):
    empty = Failures(make_failures(TWO_PAIRS).table.iloc[:0], np.zeros((0, 2), np.float32), {})
    regions = _distill(empty)
    assert len(regions) == 0
    regions.save(tmp_path / "regions.json", CLASSES)
    data = json.loads((tmp_path / "regions.json").read_text())
    assert data["regions"] == [] and data["stats"]["failures"] == 0


def test_nan_latents_are_refused():
    failures = make_failures(TWO_PAIRS)
    failures.z[3, 1] = np.inf
    with pytest.raises(ValueError, match=re.escape("failures_z.npy holds NaN or infinite latents")):
        _distill(failures)


def test_distill_is_deterministic_for_a_seed():
    a, b = _distill(make_failures(TWO_PAIRS), seed=5), _distill(make_failures(TWO_PAIRS), seed=5)
    assert [r.summary() for r in a.regions] == [r.summary() for r in b.regions]
    assert [r.mean for r in a.regions] == [r.mean for r in b.regions]


def test_region_sampling_follows_mean_and_scaled_covariance():
    region = Region(id=1, source_label=0, predicted_label=1, pair="0 -> 1", n_failures=10, weight=1.0, purity=1.0,
                    error_rate=1.0, flip_rate=1.0, validity=1.0, confidence=1.0, suggested_label=0,
                    median_radius=1.0, pair_median_radius=1.0, source_confidence=1.0, coverage=1.0, bug_score=1.0,
                    mean=[1.0, -2.0], cov=[[1.0, 0.5], [0.5, 2.0]])
    z = region.sample(40_000, tau=0.5, generator=np.random.default_rng(0))
    assert z.shape == (40_000, 2)
    np.testing.assert_allclose(z.mean(axis=0), [1.0, -2.0], atol=0.02)
    np.testing.assert_allclose(np.cov(z, rowvar=False), [[0.5, 0.25], [0.25, 1.0]], atol=0.03)


def _region_at(mean) -> Region:
    return Region(id=1, source_label=0, predicted_label=1, pair="0 -> 1", n_failures=10, weight=1.0, purity=1.0,
                  error_rate=0.5, flip_rate=0.5, validity=1.0, confidence=1.0, suggested_label=0, median_radius=1.0,
                  pair_median_radius=1.0, source_confidence=1.0, coverage=1.0, bug_score=1.0, mean=list(mean),
                  cov=[[1.0, 0.0], [0.0, 1.0]])


def test_the_failure_map_shows_every_region_in_its_legend_each_in_its_own_colour(tmp_path):
    """30 regions (distill's default max_regions): none is dropped past the 20th, and no two share a colour."""
    from dataclasses import replace

    from defuse.stages.distill.mixture import region_colours, save_umap

    pairs = [(s, p) for s in range(6) for p in range(6) if s != p][:30]
    failures = make_failures([((3.0 * i, 3.0 * (i % 5)), 0.2, 8, s, p) for i, (s, p) in enumerate(pairs)])
    regions = Regions([replace(_region_at((3.0 * i, 3.0 * (i % 5))), id=i + 1, source_label=s, predicted_label=p,
                               pair=f"{s} -> {p}") for i, (s, p) in enumerate(pairs)], {})
    legend = save_umap(tmp_path / "umap.png", failures, regions, seed=0)
    assert legend[1:] == [f"#{i + 1} {s} -> {p}" for i, (s, p) in enumerate(pairs)]  # after "failure, no region"
    assert len(set(region_colours(30))) == 30
    assert (tmp_path / "umap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_region_shows_its_misreadings_first():
    """Half the draws of a region centred on the 0 | 1 boundary are read as 1: shown, all 16 are; unfiltered, not."""
    region, classifier = _region_at((1.0, -1.0)), QuadrantClassifier()
    shown = region_misreadings(region, 16, 1.0, np.random.default_rng(0), LineGenerator(), classifier)
    assert shown.shape == (16, 1, 2, 2) and bool((classifier(shown).argmax(1) == 1).all())
    plain = region_misreadings(region, 16, 1.0, np.random.default_rng(0), LineGenerator())
    assert 0 < int((classifier(plain).argmax(1) == 1).sum()) < 16
    # Misreadings rarer than the grid (P(z0 > 1) = 7% here): the few come first, the rest fill the grid.
    rare = region_misreadings(_region_at((-0.5, -1.0)), 16, 1.0, np.random.default_rng(0), LineGenerator(), classifier)
    read = (classifier(rare).argmax(1) == 1).int()
    assert len(rare) == 16 and 0 < int(read.sum()) < 16 and bool((read[:-1] >= read[1:]).all())


def test_regions_round_trip_with_grids(tmp_path):
    regions = _distill(make_failures(TWO_PAIRS))
    regions.save(tmp_path / "regions.json", CLASSES)
    again = Regions.load(tmp_path / "regions.json")
    assert [r.summary() for r in again.regions] == [r.summary() for r in regions.regions]
    grids = region_grids(regions, LineGenerator(), tau=1.0, seed=0)
    assert set(grids) == {r.id for r in regions.regions} and grids[1].shape == (16, 1, 2, 2)
    save_grid_png(tmp_path / "regions" / "region_01.png", grids[1].clamp(0, 1))
    assert (tmp_path / "regions" / "region_01.png").read_bytes()[:4] == b"\x89PNG"


def test_a_regions_reach_is_the_median_distance_of_its_failures_sources_and_travels_in_regions_json(tmp_path):
    failures = make_failures(TWO_PAIRS)
    # Every failure's source sits 3 units (along the first latent axis) from the failure itself.
    sources = failures.z + np.array([3.0, 0.0], dtype=np.float32)
    regions = distill(failures, QuadrantClassifier(), LineGenerator(), quadrant_validity(), CLASSES, CONFIG,
                      sources=sources)
    scale = quadrant_validity().scale
    for region in regions.regions:
        members = sources[(failures.table["source_label"] == region.source_label).to_numpy()
                          & (failures.table["predicted_label"] == region.predicted_label).to_numpy()]
        expected = np.median(np.linalg.norm((members - np.asarray(region.mean)) / scale, axis=1))
        assert region.source_radius == pytest.approx(expected, rel=0.25)  # the member failures, not all the pair's
        assert region.source_radius > 3 / scale.max() * 0.5
    assert all(r.source_radius == 0.0 for r in _distill(failures).regions)  # no sources given: no reach
    regions.save(tmp_path / "regions.json")
    assert [r.source_radius for r in Regions.load(tmp_path / "regions.json").regions] == [r.source_radius for r in regions.regions]


def test_refinement_weights_as_small_as_a_tiny_models_validities_neither_warn_nor_turn_a_region_to_nan():
    """Validities of 1e-200 once made the effective-sample-size check 0 / 0 (a RuntimeWarning, then a refit on
    whatever it said); a NaN validity made the region's mean NaN. Now the first refits (the size is scale-free) and
    the second keeps its Gaussian."""
    import warnings

    import torch

    from defuse.config import DistillConfig
    from defuse.stages.distill.mixture import _refine

    class Validity:
        def __init__(self, value: float) -> None:
            self.value = value

        def scores(self, z):
            return np.full((len(z), 2), self.value)

    evaluate = lambda z: torch.tensor([[0.0, 5.0]]).repeat(len(z), 1)  # everything read as class 1
    config = DistillConfig(refine_steps=1, fresh_samples=64)
    for value, moves in ((1e-200, True), (float("nan"), False)):
        start = {"mean": np.array([3.0, 3.0]), "cov": np.eye(2) * 0.01, "source": 0, "predicted": 1}
        candidate = {**start}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _refine([candidate], evaluate, Validity(value), config, np.random.default_rng(0))
        assert np.isfinite(candidate["mean"]).all() and np.isfinite(candidate["cov"]).all()
        assert (candidate["cov"] is not start["cov"]) == moves


def test_each_pairs_best_region_is_shown_before_any_pairs_second():
    from defuse.stages.distill.mixture import pairs_first

    ranked = [{"source": s, "predicted": p, "bug_score": b} for s, p, b in
              [(9, 7, 0.054), (9, 7, 0.049), (9, 7, 0.048), (7, 2, 0.045), (5, 0, 0.043), (7, 2, 0.040)]]
    order = [(c["source"], c["predicted"], c["bug_score"]) for c in pairs_first(ranked)]
    assert order == [(9, 7, 0.054), (7, 2, 0.045), (5, 0, 0.043), (9, 7, 0.049), (9, 7, 0.048), (7, 2, 0.040)]
    # the same regions under distill: ids follow the order, and "score" keeps bug-score order alone
    clusters = [((2.5, -1.0), 0.15, 40, 0, 1), ((3.5, -2.5), 0.15, 40, 0, 1), ((-1.0, 2.5), 0.15, 40, 0, 2)]
    by_score = _distill(make_failures(clusters), DistillConfig(**{**CONFIG.__dict__, "order": "score"}))
    shown = _distill(make_failures(clusters))
    assert sorted(r.bug_score for r in by_score.regions) == sorted(r.bug_score for r in shown.regions)
    assert [r.id for r in shown.regions] == list(range(1, len(shown) + 1))
    pairs = [(r.source_label, r.predicted_label) for r in shown.regions]
    firsts = [pairs.index(p) for p in set(pairs)]
    assert sorted(firsts) == list(range(len(set(pairs))))  # every pair's first region before any repeat
    best = [max(r.bug_score for r in shown.regions if (r.source_label, r.predicted_label) == p) for p in pairs[:2]]
    assert [r.bug_score for r in shown.regions[:2]] == best
