"""Invariance checks: Effective Invariance, ML4ML variance matrices, the transforms they apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from defuse import transforms as T
from defuse.invariance.ei import (
    compare_ei,
    effective_invariance,
    per_image_scores,
    summarize,
)

logits_pairs = st.integers(1, 40).flatmap(lambda n: st.integers(2, 10).flatmap(lambda k: st.tuples(
    arrays(np.float32, (n, k), elements=st.floats(-20, 20, width=32)),
    arrays(np.float32, (n, k), elements=st.floats(-20, 20, width=32)))))


@settings(max_examples=200, deadline=None)
@given(logits_pairs)
def test_ei_lies_in_0_1_and_is_0_wherever_the_predictions_disagree(pair):
    a, b = (torch.from_numpy(x).softmax(dim=1) for x in pair)
    ei = effective_invariance(a, b)
    assert ((ei >= 0) & (ei <= 1 + 1e-6)).all()
    disagree = a.argmax(dim=1) != b.argmax(dim=1)
    assert (ei[disagree] == 0).all()
    assert (ei[~disagree] > 0).all()  # agreeing predictions have positive confidence on both sides


@settings(max_examples=100, deadline=None)
@given(logits_pairs)
def test_the_identity_gives_the_max_softmax_confidence(pair):
    p = torch.from_numpy(pair[0]).softmax(dim=1)
    assert torch.allclose(effective_invariance(p, p), p.max(dim=1).values, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(logits_pairs)
def test_ei_equals_the_papers_formula_on_random_logits(pair):
    # Deng et al. 2022, eq. 1, written out image by image in numpy: sqrt(p^ * p^_t) when the argmaxes agree.
    x, xt = pair
    p = np.exp(x - x.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    pt = np.exp(xt - xt.max(1, keepdims=True)); pt /= pt.sum(1, keepdims=True)
    expected = [np.sqrt(p[i].max() * pt[i].max()) if p[i].argmax() == pt[i].argmax() else 0.0 for i in range(len(p))]
    a, b = torch.from_numpy(x).softmax(1), torch.from_numpy(xt).softmax(1)
    got = effective_invariance(a, b).numpy()
    # Where two classes tie to float precision, which one is the argmax is a rounding accident (torch and numpy may
    # differ): there EI is either 0 or sqrt(p^ * p^_t); everywhere else it is the paper's value.
    margin = lambda q: (q.topk(2, dim=1).values[:, 0] - q.topk(2, dim=1).values[:, 1]).numpy() if q.shape[1] > 1 \
        else np.ones(len(q))  # noqa: E731
    clear = (margin(a) > 1e-6) & (margin(b) > 1e-6)
    np.testing.assert_allclose(got[clear], np.asarray(expected)[clear], atol=1e-5)
    both = np.sqrt(p.max(1) * pt.max(1))
    assert np.all(np.isclose(got[~clear], 0.0, atol=1e-5) | np.isclose(got[~clear], both[~clear], atol=1e-5))


def test_ei_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both be \(N, K\), got \(3, 2\) and \(2, 2\) instead"):
        effective_invariance(torch.zeros(3, 2), torch.zeros(2, 2))


class Quadrant(nn.Module):
    """Reads which image quadrant holds the most ink (0 top-left, 1 top-right, 2 bottom-right, 3 bottom-left):
    every quarter turn changes its answer, a brightness change never does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        ink = torch.stack([x[..., :h, :w].sum((1, 2, 3)), x[..., :h, w:].sum((1, 2, 3)),
                           x[..., h:, w:].sum((1, 2, 3)), x[..., h:, :w].sum((1, 2, 3))], dim=1)
        return 10 * ink / ink.sum(dim=1, keepdim=True).clamp_min(1e-6)


def _blobs(n: int = 16, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One bright 2x2 blob per image, in quadrant i % 4."""
    images = torch.zeros(n, 1, size, size)
    corners = [(1, 1), (1, 5), (5, 5), (5, 1)]
    for i in range(n):
        r, c = corners[i % 4]
        images[i, 0, r : r + 2, c : c + 2] = 0.6
    return images, torch.arange(n) % 4


def test_quarter_turns_break_a_quadrant_reader_and_brightness_does_not():
    images, labels = _blobs()
    model = Quadrant()
    rotation = per_image_scores(model, images, "rotation", labels)
    assert (rotation.ei == 0).all() and (rotation.agree == 0).all() and (rotation.correct == 0).all()
    brightness = per_image_scores(model, images, "brightness", labels)
    assert (brightness.agree == 1).all() and (brightness.correct == 1).all() and (brightness.ei > 0.5).all()
    summary = summarize(brightness, "brightness", np.random.default_rng(0), labels.numpy())
    assert summary.agreement.mean == summary.agreement.low == summary.agreement.high == 1.0
    assert sorted(summary.per_class) == [0, 1, 2, 3] and summary.per_class[2]["accuracy"].mean == 1.0


def test_grayscale_does_not_apply_to_one_channel_images_and_says_so():
    images, labels = _blobs()
    assert per_image_scores(Quadrant(), images, "grayscale", labels) is None
    summary = summarize(None, "grayscale", np.random.default_rng(0))
    assert summary.applicable is False and summary.ei is None


def test_a_significant_ei_drop_is_a_regression_and_a_small_one_is_not():
    rng = np.random.default_rng(0)
    ei = rng.uniform(0.5, 1.0, 500)
    assert compare_ei(ei, ei - 0.05, "scale", rng).regression
    assert not compare_ei(ei, ei - 0.005, "scale", rng).regression  # significant, but within the 0.01 allowed
    assert not compare_ei(ei, ei, "scale", rng).regression
    assert compare_ei(None, ei, "grayscale", rng) is None
    with pytest.raises(ValueError, match="must score the same images, got 500 and 3 instead"):
        compare_ei(ei, ei[:3], "scale", rng)


def test_transforms_keep_shape_and_range_and_the_identity_values_change_nothing():
    images = torch.rand(5, 1, 28, 28)
    for family, grid in T.GRIDS.items():
        assert torch.equal(T.GRID_TRANSFORMS[family](images, float(grid[T.IDENTITY_INDEX])), images)
        for value in grid[[0, -1]]:
            out = T.GRID_TRANSFORMS[family](images, float(value))
            assert out.shape == images.shape and not torch.equal(out, images)
    assert torch.allclose(T.brighten(images, 1.3), (images * 1.3).clamp(max=1.0))  # multiplied, then clipped
    shrunk = T.rescale(torch.ones(1, 1, 28, 28), 0.7)  # a full white square shrinks to the middle
    assert (shrunk[..., :3, :] == 0).all() and (shrunk[..., 14, 14] == 1).all()
    assert torch.equal(T.rotate90(T.rotate90(images, 1), 3), images)
    shifted = T.translate(images, 3, 0)
    assert torch.equal(shifted[..., 3:], images[..., :-3]) and (shifted[..., :3] == 0).all()


# ----------------------------------------------------------------------------- ML4ML variance matrices

from defuse.invariance.variance import (  # noqa: E402
    FEATURES,
    family_variance,
    matrix_features,
    variance_matrix,
)


@settings(max_examples=100, deadline=None)
@given(st.tuples(st.integers(2, 31), st.integers(1, 60)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.floats(0, 1))))
def test_variance_matrices_are_symmetric_with_a_zero_diagonal_and_values_in_0_1(table):
    matrix = variance_matrix(table)
    assert np.array_equal(matrix, matrix.T) and (np.diagonal(matrix) == 0).all()
    assert (matrix >= 0).all() and (matrix <= 1 + 1e-12).all()
    # the extreme: every confidence 0 at one value and 1 at another is a distance of exactly 1
    extreme = variance_matrix(np.vstack([np.zeros(table.shape[1]), np.ones(table.shape[1])]))
    assert extreme[0, 1] == pytest.approx(1.0)
    i, j = 0, len(table) - 1  # the formula, cell by cell
    assert matrix[i, j] == pytest.approx(np.linalg.norm(table[i] - table[j]) / np.sqrt(table.shape[1]), abs=1e-6)


def test_a_matrix_that_grows_away_from_its_diagonal_has_positive_gradients_and_no_asymmetry():
    i, j = np.indices((31, 31))
    growing = matrix_features(np.abs(i - j) * 0.01)
    assert set(growing) == set(FEATURES)
    assert growing["h_mean"] == pytest.approx(0.01) and growing["v_mean"] == pytest.approx(0.01)
    assert growing["d_mean"] == pytest.approx(0.02) and growing["asymmetry"] == pytest.approx(0.0, abs=1e-12)
    assert growing["discontinuity"] == pytest.approx(0.0, abs=1e-12) and growing["share_above"] > 0
    # Only positive transform values hurt (t > 0: rows and columns 16..30): the matrix is lopsided.
    lopsided = np.maximum.outer(np.maximum(i[:, 0] - 15, 0), np.maximum(j[0] - 15, 0)) * 0.02
    np.fill_diagonal(lopsided, 0.0)
    assert matrix_features(lopsided)["asymmetry"] > 0.5
    # One stripe (a transform value unlike its neighbours): discontinuous.
    striped = np.abs(i - j) * 0.01
    striped[7, :] += 0.2
    striped[:, 7] += 0.2
    np.fill_diagonal(striped, 0.0)
    assert matrix_features(striped)["discontinuity"] > matrix_features(np.abs(i - j) * 0.01)["discontinuity"] + 1


class InkMeter(nn.Module):
    """Class 0 with a confidence that grows with the image's ink: brightness changes it, the class never."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ink = x.flatten(1).sum(dim=1)
        return torch.stack([ink, torch.zeros_like(ink), torch.zeros_like(ink)], dim=1)


def test_an_invariant_model_has_a_zero_matrix_and_an_ink_meter_a_growing_brightness_matrix():
    images, labels = _blobs(16, size=16)
    constant = nn.Sequential(nn.Flatten(), nn.Linear(256, 4))
    nn.init.zeros_(constant[1].weight)
    nn.init.zeros_(constant[1].bias)  # every image read as class 0 at confidence 1/4, whatever the transform
    zeros = torch.zeros(16, dtype=torch.long)
    flat = family_variance(constant, images, zeros, "rotation", np.random.default_rng(0))
    assert (flat.correct == 0).all() and flat.counts == {"correct": 16, "incorrect": 0}
    meter = family_variance(InkMeter(), images, labels, "brightness", np.random.default_rng(0), per_class=True)
    assert meter.counts == {"correct": 4, "incorrect": 12}  # class 0 is right for the images of quadrant 0
    assert meter.correct[0, -1] == meter.correct.max() > 0.05  # darkest against brightest: the largest change
    assert meter.features["h_mean"] > 0 and sorted(meter.per_class) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- augmentation and a trained model


def test_random_augmentation_is_per_image_reproducible_and_the_identity_at_zero():
    images = torch.rand(6, 1, 12, 12)
    assert torch.equal(T.random_augment(images, torch.Generator().manual_seed(0)), images)
    one = T.random_augment(images, torch.Generator().manual_seed(1), rotation=30, scale=0.2, brightness=0.3)
    two = T.random_augment(images, torch.Generator().manual_seed(1), rotation=30, scale=0.2, brightness=0.3)
    assert torch.equal(one, two) and not torch.equal(one, images)
    brighter = T.random_augment(images, torch.Generator().manual_seed(3), brightness=0.3)
    ratio = (brighter / images).flatten(1)  # one factor per image, in [0.7, 1.3], where nothing was clipped
    unclipped = brighter.flatten(1) < 1
    for row, keep in zip(ratio, unclipped):
        assert row[keep].max() - row[keep].min() < 1e-5 and 0.7 <= float(row[keep][0]) <= 1.3
    # per image: the same image six times comes out six different ways
    same = T.random_augment(images[:1].expand(6, -1, -1, -1), torch.Generator().manual_seed(2), rotation=30)
    assert len({tuple(x.flatten().tolist()) for x in same}) == 6


def test_training_with_rotations_makes_a_classifier_more_rotation_invariant(tiny_config):
    # The check of the checks: the same recipe with and without +-15-degree training rotations.
    from dataclasses import replace

    from defuse.data import ImageDataModule
    from defuse.models.training import train_classifier

    data = ImageDataModule(tiny_config.data, tiny_config.seed)
    test = data.split("test")
    figures = {}
    for rotation in (0.0, 15.0):
        config = replace(tiny_config.classifier, epochs=8, width=8, augment_rotation=rotation)
        torch.manual_seed(0)
        model, hparams = train_classifier(data, config, tiny_config.trainer, seed=0)
        assert hparams["augment_rotation"] == rotation
        matrix = family_variance(model, test.float_images(), test.labels, "rotation", np.random.default_rng(0))
        ei = per_image_scores(model, test.float_images(), "rotation15").ei.mean()
        figures[rotation] = (matrix.features["mean"], ei)
    assert figures[15.0][0] < figures[0.0][0], figures  # a darker rotation matrix
    assert figures[15.0][1] > figures[0.0][1], figures  # a higher small-angle rotation EI


# ----------------------------------------------------------------------------- the check stage


def test_a_check_saves_its_figures_and_a_same_weights_check_is_a_zero_change_copy(tmp_path):
    import json

    from defuse.config import CheckConfig
    from defuse.data import ImageSet
    from defuse.invariance.check import check_invariance, copy_unchanged, load_per_image
    from defuse.models.inference import same_weights

    images, labels = _blobs(12, size=16)
    test = ImageSet((images * 255).to(torch.uint8), labels, ("a", "b", "c", "d"))
    config = CheckConfig(ei_transforms=["rotation", "grayscale", "brightness"], families=["rotation"], max_images=8)
    before = check_invariance(Quadrant(), test, config, name="before", seed=3)
    assert len(before.positions) == 8 and before.ei["rotation"].ei.mean == 0.0  # every quarter turn changes it
    before.save(tmp_path)
    saved = json.loads((tmp_path / "before.json").read_text())
    assert saved["ei"]["grayscale"]["applicable"] is False
    rotation = saved["variance"]["rotation"]
    from defuse.invariance.assessor import verdict as assess

    expected = assess("rotation", rotation["features"])  # the shipped assessor on the features written
    assert rotation["probability_invariant"] == expected.probability
    assert rotation["verdict"] == ("invariant" if expected.probability >= 0.5 else "variant")
    assert np.load(tmp_path / "before_rotation_correct.npy").shape == (31, 31)
    positions, per_image = load_per_image(tmp_path, "before")
    assert np.array_equal(positions, before.positions) and set(per_image) == {"rotation", "brightness"}
    # the same images, paired: an identical model changes nothing
    again = check_invariance(Quadrant(), test, config, name="after", seed=3, reference=(positions, per_image))
    assert again.ei_change["brightness"].change.mean == 0.0 and not again.ei_change["brightness"].regression
    with pytest.raises(ValueError, match="read other test images"):
        check_invariance(Quadrant(), test, config, name="after", seed=4, reference=(positions, per_image))
    assert same_weights(InkMeter(), InkMeter()) and not same_weights(nn.Linear(2, 2), nn.Linear(2, 2))
    copied = copy_unchanged(tmp_path, "before", "after")
    assert copied["ei"] == saved["ei"] and copied["ei_change"]["rotation"]["change"]["mean"] == 0.0
    assert copied["variance"]["rotation"]["matrices"]["correct"] == "after_rotation_correct.npy"
    assert (tmp_path / "after_rotation_correct.npy").read_bytes() == (tmp_path / "before_rotation_correct.npy").read_bytes()


# ----------------------------------------------------------------------------- the assessor


def test_the_invariance_label_is_the_largest_accuracy_drop_over_the_grid():
    from defuse.invariance.assessor import invariance_label

    grid = np.full(31, 0.98)
    assert invariance_label(grid, 15) == 1
    grid[0] = 0.95  # exactly 3 points: still invariant
    assert invariance_label(grid, 15) == 1
    grid[30] = 0.94
    assert invariance_label(grid, 15) == 0


def test_the_assessor_learns_a_separable_zoo_and_refuses_a_zoo_of_one_verdict():
    from defuse.invariance.assessor import Assessor

    rng = np.random.default_rng(0)
    features = np.full((40, len(FEATURES)), 0.5)
    features[:, 0] = rng.random(40)
    labels = (features[:, 0] < 0.5).astype(int)  # invariant when the matrix mean is small, whatever the rest
    assessor = Assessor(trees=50).fit(features, labels)
    probability = assessor.predict_proba(np.array([[0.05] + [0.5] * (len(FEATURES) - 1),
                                                   [0.95] + [0.5] * (len(FEATURES) - 1)]))
    assert probability[0] > 0.8 > 0.2 > probability[1]
    with pytest.raises(ValueError, match=r"must hold both verdicts .* got only \[1\] instead"):
        Assessor().fit(features, np.ones(40, dtype=int))


def test_the_shipped_zoo_gives_every_family_a_verdict_with_a_probability():
    from defuse.invariance.assessor import load_zoo, verdict

    zoo = load_zoo()
    if zoo is None:
        pytest.skip("no zoo table in this installation (scripts/build_zoo.py builds it)")
    assert len(zoo) >= 60
    for family in ("rotation", "brightness", "scale"):
        row = zoo.iloc[0]
        answer = verdict(family, {name: float(row[f"{family}.{name}"]) for name in FEATURES})
        assert answer is not None and 0.0 <= answer.probability <= 1.0 and "zoo models" in answer.trained_on
