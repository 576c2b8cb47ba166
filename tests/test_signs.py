"""The built-in traffic-sign source: deterministic per seed, an image a function of its own factor row, and each
nuisance factor changing only what it names."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defuse import signs
from defuse.config import load_config
from defuse.data import ImageDataModule

# A plain row to vary: no blur, no compression, no occlusion, so that a factor's effect can be read exactly.
PLAIN = {"rotation": 0.0, "yaw": 0.0, "scale": 0.7, "offset_x": 0.0, "offset_y": 0.0, "background": "sky",
         "occlusion": 0.0, "illumination": "day", "cast_red": 1.0, "cast_blue": 1.0, "defocus": 0.0, "motion": 0,
         "motion_angle": 0.0, "noise": 0.0, "jpeg": 0}


def _row(label: int, seed: int, **changes) -> pd.DataFrame:
    return pd.DataFrame([{"sign": label, "seed": seed, **PLAIN, **changes}])


def _layers(frame: pd.DataFrame, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    images, coverage = signs.render_layers(frame, size)
    return images.numpy().astype(np.int16), coverage.numpy()


rows = st.tuples(st.integers(0, len(signs.CLASSES) - 1), st.integers(0, 2**40))
quick = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_source_is_the_same_for_a_seed_and_differs_between_seeds():
    first, test = signs.sign_sets(12, 3, seed=5)
    again, _ = signs._sign_sets.__wrapped__(12, 3, 5, 32, signs.CLASSES, None)  # rendered anew, not the process's memo
    other, _ = signs.sign_sets(12, 3, seed=6)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (12 * len(signs.CLASSES), 3, 32, 32) and first.images.dtype == torch.uint8
    assert np.bincount(first.labels.numpy()).tolist() == [12] * len(signs.CLASSES)
    assert np.bincount(test.labels.numpy()).tolist() == [3] * len(signs.CLASSES)
    # The test split is drawn from a stream of its own: fresh signs, not copies of pool images.
    assert not set(test.factors["seed"]) & set(first.factors["seed"])


def test_an_image_depends_on_its_own_row_only_not_on_its_batch():
    factors = signs.draw_factors(np.arange(40) % len(signs.CLASSES), np.random.default_rng(1))
    whole = signs.render(factors, 32, batch_size=64)
    assert torch.equal(whole, signs.render(factors, 32, batch_size=7))
    assert torch.equal(whole[[3, 17]], signs.render(factors.iloc[[17, 3]], 32)[[1, 0]])


def test_every_size_renders_and_other_sizes_are_refused_with_the_fix():
    factors = signs.draw_factors(np.arange(3), np.random.default_rng(0))
    for size in signs.SIZES:
        assert signs.render(factors, size).shape == (3, 3, size, size)
    with pytest.raises(ValueError, match="32, 48, 64"):
        signs.render(factors, 28)
    with pytest.raises(ValueError, match="data.image_size=32"):
        load_config(None, ["data.source=signs", "data.image_size=28"])
    with pytest.raises(ValueError, match="lacks column.*jpeg"):
        signs.render(factors.drop(columns="jpeg"), 32)


@quick
@given(rows, st.sampled_from(["foliage", "wall"]))
def test_the_background_changes_only_what_lies_around_the_sign(row, background):
    label, seed = row
    sky, coverage = _layers(_row(label, seed))
    other, coverage_other = _layers(_row(label, seed, background=background))
    assert np.array_equal(coverage, coverage_other)
    inside = np.broadcast_to(coverage >= 0.999, sky.shape)
    outside = np.broadcast_to(coverage <= 0.001, sky.shape)
    assert np.array_equal(sky[inside], other[inside])
    assert np.abs(sky[outside] - other[outside]).mean() > 10


@quick
@given(rows, st.sampled_from(["rotation", "yaw", "scale", "offset_x", "offset_y"]), st.floats(0.3, 1.0))
def test_the_pose_moves_the_sign_and_leaves_the_background_where_the_sign_is_in_neither(row, factor, amount):
    label, seed = row
    change = {"rotation": 15 * amount, "yaw": 45 * amount, "scale": 0.55 + 0.35 * amount,
              "offset_x": 0.1 * amount, "offset_y": -0.1 * amount}[factor]
    still, coverage = _layers(_row(label, seed))
    moved, coverage_moved = _layers(_row(label, seed, **{factor: change}))
    assert np.abs(still - moved).max() > 60  # the sign moved (a round one's rotation shows in its digits only)
    empty = np.broadcast_to((coverage == 0) & (coverage_moved == 0), still.shape)
    assert np.array_equal(still[empty], moved[empty])


@quick
@given(rows, st.floats(0.1, 0.35))
def test_occlusion_covers_its_fraction_of_the_sign_and_nothing_else_changes_elsewhere(row, fraction):
    label, seed = row
    clear, coverage = _layers(_row(label, seed))
    hidden, coverage_hidden = _layers(_row(label, seed, occlusion=fraction))
    assert np.array_equal(coverage, coverage_hidden)  # the sign is where it was: something stands in front of it
    changed = (clear != hidden).any(axis=1)[:, None]
    # Of the sign's disc (the round signs fill it; the others fill most of it), about the named fraction is covered.
    disc = coverage >= 0.5
    share = changed[disc].mean()
    assert abs(share - fraction) < 0.15, (share, fraction)
    # What changed is one side of a straight edge: a half-plane, so its complement is too (no scattered pixels).
    assert changed.any() and not changed.all()


@quick
@given(rows, st.sampled_from(["dusk", "night", "glare"]), st.floats(0.85, 1.15), st.floats(0.85, 1.15))
def test_light_and_colour_cast_change_colours_not_the_sign_or_its_place(row, illumination, red, blue):
    label, seed = row
    day, coverage = _layers(_row(label, seed))
    lit, coverage_lit = _layers(_row(label, seed, illumination=illumination))
    assert np.array_equal(coverage, coverage_lit)
    brightness = lit.mean() - day.mean()
    assert (brightness > 5) if illumination == "glare" else (brightness < -20)
    # A colour cast is the white-balance gains on red and blue: green stays, red and blue scale (to rounding).
    cast, _ = _layers(_row(label, seed, cast_red=red, cast_blue=blue))
    assert np.array_equal(cast[:, 1], day[:, 1])
    for channel, gain in ((0, red), (2, blue)):
        unclipped = (day[:, channel] * gain < 254) & (day[:, channel] > 10)
        expected = day[:, channel][unclipped] * gain
        assert np.abs(cast[:, channel][unclipped] - expected).max() <= 1.5


@quick
@given(rows, st.sampled_from(["defocus", "motion"]))
def test_blur_smooths_the_image_and_keeps_its_brightness(row, factor):
    label, seed = row
    sharp, _ = _layers(_row(label, seed))
    blurred, _ = _layers(_row(label, seed, **({"defocus": 1.2} if factor == "defocus" else
                                              {"motion": 7, "motion_angle": 30.0})))

    def edges(image):
        return np.abs(np.diff(image.astype(float), axis=-1)).mean() + np.abs(np.diff(image.astype(float), axis=-2)).mean()

    assert edges(blurred) < 0.85 * edges(sharp)
    assert abs(blurred.mean() - sharp.mean()) < 3


@quick
@given(rows, st.floats(0.02, 0.05))
def test_sensor_noise_and_compression_perturb_pixels_without_moving_anything(row, noise):
    label, seed = row
    clean, coverage = _layers(_row(label, seed))
    noisy, coverage_noisy = _layers(_row(label, seed, noise=noise))
    assert np.array_equal(coverage, coverage_noisy)
    mid = (clean > 30) & (clean < 225)  # away from clipping
    difference = (noisy - clean)[mid] / 255.0
    assert abs(difference.mean()) < 0.01 and 0.6 * noise < difference.std() < 1.4 * noise
    # JPEG loses more at a lower quality (a 32 px sign's saturated red suffers from chroma subsampling).
    poor, good = (np.abs(_layers(_row(label, seed, jpeg=quality))[0] - clean).mean() for quality in (30, 90))
    assert 0 < good < poor < 40


def test_a_subset_of_classes_is_labelled_in_its_own_order_and_unknown_names_are_refused():
    pool, _ = signs.sign_sets(5, 1, classes=("stop", "30kmh"))
    assert pool.labels.tolist().count(0) == 5 and set(pool.labels.tolist()) == {0, 1}
    assert (pool.factors["sign"].to_numpy() == np.where(pool.labels.numpy() == 0, signs.CLASSES.index("stop"),
                                                        signs.CLASSES.index("30kmh"))).all()
    with pytest.raises(ValueError, match="at least 2 of 20kmh"):
        load_config(None, ["data.source=signs", 'data.signs.classes=["stop", "stop sign"]'])


def test_a_rare_combination_is_kept_at_its_share_in_the_pool_and_whole_in_the_test_split():
    rare = signs.Rare("50kmh", "illumination", ("night",), keep=0.1)
    pool, test = signs.sign_sets(200, 200, seed=3, classes=("30kmh", "50kmh", "stop"), rare=rare)
    full, full_test = signs.sign_sets(200, 200, seed=3, classes=("30kmh", "50kmh", "stop"))
    assert rare.matches(full.factors).sum() > 15  # about 15% of the 200 50 km/h signs are at night
    assert rare.matches(pool.factors).sum() <= 0.25 * rare.matches(full.factors).sum()
    assert len(full.labels) - len(pool.labels) == rare.matches(full.factors).sum() - rare.matches(pool.factors).sum()
    assert torch.equal(test.images, full_test.images)  # the test split shows the combination as often as ever
    # Nothing else moved: the other classes' images are the same images.
    others = (full.labels != 1).numpy()
    assert torch.equal(full.images[torch.from_numpy(others)], pool.images[(pool.labels != 1)])
    wide = signs.Rare("50kmh", "yaw", ("30", "45"))
    assert (full.factors["yaw"][wide.matches(full.factors)] >= 30).all()
    with pytest.raises(ValueError, match=r"rare.values` must be \[low, high\]"):
        load_config(None, ["data.source=signs", "data.signs.rare.sign=50kmh", "data.signs.rare.factor=yaw"])
    with pytest.raises(ValueError, match="not among `data.signs.classes`"):
        load_config(None, ["data.source=signs", "data.signs.rare.sign=50kmh", 'data.signs.classes=["stop", "yield"]'])


def test_the_signs_source_splits_like_any_other_with_its_own_test_split():
    config = load_config(None, ["data.source=signs", "data.image_size=32", "data.signs.images_per_class=20",
                                "data.signs.test_per_class=4"])
    module = ImageDataModule(config.data, seed=0)
    module.setup()
    sizes = module.sizes()
    assert sizes["test"] == 4 * len(signs.CLASSES)
    assert sizes["train"] + sizes["val"] + sizes["audit"] == 20 * len(signs.CLASSES)
    assert module.channels == 3 and module.classes == signs.CLASSES


def test_every_stage_runs_on_colour_signs_and_the_pictures_stay_in_colour(tmp_path):
    """A 3-channel run of every stage (the tiny models of the CI runs), a region labelled a bug so that correct
    fine-tunes; the drift check reads the colour parameters and the region grids are RGB pictures."""
    import json

    from PIL import Image

    from defuse.pipeline import run_pipeline
    from defuse.rundir import RunDir
    from conftest import TINY_OVERRIDES, label_every_region, with_overrides

    run = RunDir(tmp_path / "signs")
    config = load_config(None, [*TINY_OVERRIDES, "data.source=signs", "data.image_size=32",
                                "data.signs.images_per_class=60", "data.signs.test_per_class=10",
                                'data.signs.classes=["stop", "no_entry", "priority"]',
                                # colour needs a little more generator than the digits' tiny one to draw failures
                                "generator.epochs=6", "generator.width=16", "generator.latent_dim=8",
                                "generator.conditional=true",  # the class-conditional VAE, on colour
                                "identify.transport=10",  # and its class transport
                                "classifier.epochs=3"])
    run_pipeline(config, run)
    results = run_pipeline(with_overrides(config, f"label.mode={label_every_region(run)}"), run)
    from defuse.pipeline import CURRENT, DONE

    assert {r.name: r.status for r in results if r.status not in (DONE, CURRENT)} == {}
    assert {r.name: r.status for r in results}["correct"] == DONE
    # The conditional generator's class dimensions hold each failure's source class: the search never moved them.
    from defuse.records import Failures

    failures = Failures.load(run.path("failures.parquet"))
    assert len(failures) > 0 and failures.z.shape[1] == 8 + 3
    assert np.array_equal(failures.z[:, 8:].argmax(axis=1), failures.table["source_label"].to_numpy())
    assert np.abs(failures.z[:, 8:].max(axis=1) - 1).max() < 0.1
    # Transported sources' failures name the real audit image they came from (another class's).
    audit = ImageDataModule(config.data, config.seed).split("audit")
    moved = failures.table[failures.table["transported"]]
    assert run.manifest()["stages"]["identify"]["metrics"]["transported_sources"] == 3 * 10
    assert (failures.table["source_index"] < len(audit)).all()
    assert (audit.labels.numpy()[moved["source_index"]] != moved["source_label"]).all()
    drift = json.loads(run.path("checks/before_drift_tolerance.json").read_text())
    assert {"wb_red", "wb_blue", "saturation", "mosaic"} <= set(drift["parameters"])
    regions = json.loads(run.path("regions.json").read_text())["regions"]
    picture = np.asarray(Image.open(run.path(f"regions/region_{regions[0]['id']:02d}.png")).convert("RGB"), float)
    assert np.abs(picture[..., 0] - picture[..., 2]).mean() > 1  # not grey: red and blue differ
    # verify grades the same 3 x 10 rendered test signs that fit-classifier graded
    verified = json.loads(run.path("verify.json").read_text())["clean_accuracy"]
    assert verified["n"] == 30
    assert verified["before"] == run.manifest()["stages"]["fit-classifier"]["metrics"]["test_accuracy"]
