"""The acquisition model and drift forensics: identity, gradients, bounds, and the tolerance search's consistency."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defuse.drift.acquisition import (
    BY_NAME,
    IDENTITY,
    PARAMETERS,
    SensorNoise,
    acquire,
    check_setting,
    parameters_for,
)
from defuse.drift.forensics import BISECTION, GRID, drift_forensics, tolerance_along


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_parameters_reproduce_the_input(channels):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, channels, 16, 16, generator=generator)
    x[0], x[1] = 0.0, 1.0  # black and white images: the pow() floors must not show
    noise = SensorNoise.draw(x.shape, generator)
    assert (acquire(x, {}) - x).abs().max() < 1e-6
    applicable = {p.name: p.identity for p in parameters_for(channels)}
    assert (acquire(x, applicable, noise) - x).abs().max() < 1e-6
    as_tensors = {name: torch.full((6,), value) for name, value in applicable.items()}
    assert (acquire(x, as_tensors, noise) - x).abs().max() < 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_autograd_matches_finite_differences_for_every_parameter(channels):
    generator = torch.Generator().manual_seed(1)
    x = (0.05 + 0.9 * torch.rand(4, channels, 12, 12, generator=generator)).double()
    noise = SensorNoise.draw(x.shape, generator)
    noise = SensorNoise(0.1 * noise.shot.double(), 0.1 * noise.read.double())  # small: no pixel near the clip
    weights = torch.randn(x.shape, generator=generator).double()
    checked = []
    for p in parameters_for(channels):
        # A point away from the identity (where blur's derivative is 0 to first order) and away from the bounds.
        point = p.identity + 0.2 * ((p.high if p.high > p.identity else p.low) - p.identity)

        def loss(value):
            return (acquire(x, {p.name: value}, noise) * weights).sum()

        t = torch.full((4,), point, dtype=torch.float64, requires_grad=True)
        h = 1e-6
        numeric = torch.stack([(loss(t.detach() + h * e) - loss(t.detach() - h * e)) / (2 * h)
                               for e in torch.eye(4, dtype=torch.float64)])
        output = loss(t)
        if not p.differentiable:  # resolution: an integer output size, piecewise constant; both derivatives are 0
            assert not output.requires_grad and torch.equal(numeric, torch.zeros(4, dtype=torch.float64)), p.name
            checked.append(p.name)
            continue
        (analytic,) = torch.autograd.grad(output, t)
        error = ((analytic - numeric).abs().max() / numeric.abs().max().clamp_min(1e-12)).item()
        assert error < 1e-3, (p.name, analytic, numeric)
        checked.append(p.name)
    assert checked == [p.name for p in parameters_for(channels)] and len(checked) >= 8


def test_settings_outside_the_physical_bounds_or_the_channels_are_refused():
    with pytest.raises(ValueError, match=re.escape("Drift parameter `blur_sigma` must be in [0.0, 3.0] (pixels "
                                                   "(Gaussian PSF)), got 5 instead.")):
        check_setting({"blur_sigma": 5}, 1)
    with pytest.raises(ValueError, match="acts on colour images only; these have 1 channel"):
        check_setting({"wb_red": 1.2}, 1)
    with pytest.raises(ValueError, match="Unknown drift parameter 'iso'"):
        check_setting({"iso": 800}, 1)
    check_setting({"wb_red": 1.2, "exposure_ev": -1}, 3)
    assert all(p.low <= p.identity <= p.high for p in PARAMETERS)


def test_each_parameter_changes_images_the_physical_way():
    x = torch.linspace(0.05, 0.95, 16 * 16).view(1, 1, 16, 16)
    noise = SensorNoise.draw(x.shape, torch.Generator().manual_seed(0))
    assert (acquire(x, {"exposure_ev": -1.0}) < x).all()  # half the light: darker everywhere
    assert (acquire(x, {"exposure_ev": 1.0}) >= x).all()
    blurred = acquire(x.repeat(1, 1, 1, 1) * (torch.arange(16) % 2).view(1, 1, 1, 16), {"blur_sigma": 1.5})
    assert blurred.std() < (x * (torch.arange(16) % 2).view(1, 1, 1, 16)).std()  # a striped image loses contrast
    assert acquire(x, {"read_noise": 0.1}, noise).sub(x).abs().mean() > 0.01
    low = acquire(x, {"resolution": 0.5})
    assert low.shape == x.shape and not torch.equal(low, x)
    gray = acquire(torch.rand(2, 3, 8, 8), {"saturation": 0.0})
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)


class _Curve:
    """A stand-in evaluator: accuracy is a fixed (possibly non-monotone) function of how far along the path."""

    def __init__(self, values):
        self.values = values

    def accuracy(self, setting):
        t = (setting["exposure_ev"] - IDENTITY["exposure_ev"]) / 3.0
        index = min(int(t * (len(self.values) - 1) + 1e-9), len(self.values) - 1)
        return self.values[index]

    def accuracy_unless_below(self, setting, floor):
        return self.accuracy(setting)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.5, 1.0), min_size=2, max_size=200), st.floats(0.0, 0.2), st.floats(0.0, 0.2))
def test_widening_the_allowed_drop_never_narrows_a_tolerance(values, a, b):
    curve = _Curve(values)
    narrow, wide = min(a, b), max(a, b)
    t_narrow, accuracy_narrow = tolerance_along(curve, {"exposure_ev": 3.0}, 1.0, narrow)
    t_wide, _ = tolerance_along(curve, {"exposure_ev": 3.0}, 1.0, wide)
    assert t_narrow <= t_wide  # the property: a wider allowed drop reaches at least as far
    # ... and what it reports holds: the accuracy at the tolerance is the curve's there, within the allowed drop
    assert 1.0 - accuracy_narrow <= narrow
    if t_narrow > 0:
        at = IDENTITY["exposure_ev"] + t_narrow * (3.0 - IDENTITY["exposure_ev"])
        assert accuracy_narrow == curve.accuracy({"exposure_ev": at})


def test_tolerance_stops_before_the_first_refused_point_within_a_bisection_step():
    values = [1.0] * 50 + [0.9] * 50  # the drop jumps to 10 points half way
    t, accuracy = tolerance_along(_Curve(values), {"exposure_ev": 3.0}, 1.0, 0.01)
    boundary = 50 / 99  # the stub's first point at 0.9
    assert accuracy == 1.0 and boundary - 1 / (GRID * 2**BISECTION) <= t < boundary


def test_forensics_of_a_trained_classifier_is_deterministic_and_within_bounds(finished):
    from defuse.data import ImageDataModule
    from defuse.models import load_classifier
    from defuse.models.inference import predict_labels

    run, config = finished
    model = load_classifier(run.path("classifier.ckpt")).model
    test = ImageDataModule(config.data, config.seed).split("test")
    x, y = test.float_images()[:120], test.labels[:120]
    names = ("exposure_ev", "blur_sigma", "read_noise", "resolution")
    first = drift_forensics(model, x, y, seed=0, parameters=names)
    assert first == drift_forensics(model, x, y, seed=0, parameters=names)  # one noise draw, one answer
    assert first["clean_accuracy"] == round(float((predict_labels(model, x) == y).float().mean()), 4)
    assert set(first["parameters"]) == set(names)
    for name, entry in first["parameters"].items():
        p = BY_NAME[name]
        for side in ("low", "high"):
            value = entry[f"tolerance_{side}"]
            if value is None:
                assert (p.low if side == "low" else p.high) == p.identity
            else:
                assert min(p.identity, getattr(p, side)) <= value <= max(p.identity, getattr(p, side))
                assert first["clean_accuracy"] - entry[f"accuracy_at_tolerance_{side}"] <= 0.01 + 1e-9
    assert first["parameters"]["resolution"]["sensitivity"] is None  # piecewise constant: searched, not derived
    assert first["parameters"]["blur_sigma"]["sensitivity"] == 0.0  # blur acts at second order at sigma 0
    assert first["evaluations"] <= 1 + (len(names) + 2) * (GRID + BISECTION)


def test_a_search_point_stops_reading_images_once_refused_and_is_exact_where_allowed(finished):
    """The early stop changes how many images a refused point reads, never a decision or an allowed accuracy."""
    from defuse.drift.forensics import EARLY_CHUNK, DriftEvaluator

    model, x, y = _trained(finished, n=3 * EARLY_CHUNK + 10)
    evaluator = DriftEvaluator.build(model, x, y, seed=0)
    read = []
    evaluator.model.register_forward_hook(lambda module, inputs, output: read.append(len(inputs[0])))
    clean = evaluator.accuracy({})
    for setting in ({"exposure_ev": -0.3}, {"exposure_ev": -3.0}, {"blur_sigma": 3.0}, {"read_noise": 0.3}):
        exact = evaluator.accuracy(setting)
        for floor in (clean - 0.01, clean - 0.2, 0.0):
            read.clear()
            early = evaluator.accuracy_unless_below(setting, floor)
            assert (early < floor) == (exact < floor)  # the same decision
            if exact >= floor:
                assert early == exact and sum(read) == len(x)  # every image read, the same number
    read.clear()
    assert evaluator.accuracy_unless_below({"exposure_ev": -3.0}, 1.0) < 1.0
    assert sum(read) == EARLY_CHUNK  # the first misread image already ruled out an accuracy of 1


def test_the_evaluator_holds_the_least_sure_images_first_so_refused_points_stop_sooner(finished):
    """Ordered by the model's margin, each image with the noise draw it has in the caller's order: the same
    accuracies under noise, and a refused point meets its misread images sooner than in the caller's order."""
    from defuse.drift.acquisition import SensorNoise
    from defuse.drift.forensics import EARLY_CHUNK, DriftEvaluator
    from defuse.seeding import int_seed

    model, x, y = _trained(finished, n=3 * EARLY_CHUNK + 10)
    held = DriftEvaluator.build(model, x, y, seed=0)
    draw = SensorNoise.draw(x.shape, torch.Generator().manual_seed(int_seed(0, "drift.noise")))
    as_given = DriftEvaluator(held.model, x.float(), y, draw)
    margins = held._margins()
    assert bool((margins[1:] >= margins[:-1]).all())  # least sure first
    assert torch.equal(held.labels.sort().values, y.sort().values)
    clean = held.accuracy({})
    for setting in ({"read_noise": 0.3, "shot_noise": 0.05}, {"exposure_ev": -3.0}):
        assert held.accuracy(setting) == as_given.accuracy(setting)  # each image kept its own noise draw
    # Refused points that misread a few images (a handful too many), where the order decides when the search knows.
    candidates = [{name: value} for name, values in (("exposure_ev", (-1.0, -1.5, -2.0, -2.5)),
                                                     ("blur_sigma", (0.8, 1.0, 1.2, 1.5)),
                                                     ("read_noise", (0.1, 0.15, 0.2, 0.3))) for value in values]
    refused = [setting for setting in candidates if 0.01 < clean - as_given.accuracy(setting) <= 0.1]
    assert len(refused) >= 2
    for evaluator in (held, as_given):
        evaluator.images_read = 0
        assert all(evaluator.accuracy_unless_below(setting, clean - 0.01) < clean - 0.01 for setting in refused)
    assert held.images_read < as_given.images_read


def _trained(finished, n=120):
    from defuse.data import ImageDataModule
    from defuse.models import load_classifier

    run, config = finished
    test = ImageDataModule(config.data, config.seed).split("test")
    return load_classifier(run.path("classifier.ckpt")).model, test.float_images()[:n], test.labels[:n]


def test_synthesis_matches_post_hoc_corruptions_by_ssim_and_reports_the_ratio(finished):
    from defuse.drift.synthesis import PAIRS, PRESETS, drift_synthesis

    model, x, y = _trained(finished)
    result = drift_synthesis(model, x, y, seed=0)
    assert set(result["presets"]) == {name for name, s in PRESETS.items()
                                      if not any(BY_NAME[k].rgb_only for k in s)}  # gray digits: no colour presets
    identity_row = next(r for r in result["grids"]["exposure_ev"] if r["value"] == 0.0)
    assert identity_row["accuracy"] == result["clean"]["accuracy"] and identity_row["ssim"] == pytest.approx(1, 1e-4)
    for parameter, pair in result["post_hoc_vs_physical"].items():
        assert pair["post_hoc"] == PAIRS[parameter]
        for row in pair["settings"]:  # matched on 500 images (all 120 here): the same image-space change
            assert abs(row["post_hoc_ssim"] - row["ssim"]) < 0.02 or row["post_hoc_strength"] in (0.0, 1.0, 8.0)
    drops = [(r["post_hoc_drop"], r["physical_drop"]) for p in result["post_hoc_vs_physical"].values()
             for r in p["settings"]]
    physical = sum(max(d, 0) for _, d in drops)
    assert result["ratio"] == (round(sum(max(d, 0) for d, _ in drops) / physical, 3) if physical else None)
    assert [s["severity"] for s in result["post_hoc_severities"]["gaussian_noise"]] == [1, 2, 3, 4, 5]


def test_the_worst_case_lies_in_its_box_and_costs_at_least_what_the_identity_does(finished):
    from defuse.drift.optimize import worst_case_drift

    model, x, y = _trained(finished, 80)
    result = worst_case_drift(model, x, y, budget=0.1, steps=3, restarts=1, random_settings=4, seed=0)
    for name, value in result["worst_setting"].items():
        low, high = result["box"][name]
        assert low - 1e-6 <= value <= high + 1e-6
    assert result["worst_loss"] >= result["loss_trace"][0][0]  # never below the identity's loss
    assert result["worst_accuracy"] <= result["clean_accuracy"]
    assert result == worst_case_drift(model, x, y, budget=0.1, steps=3, restarts=1, random_settings=4, seed=0)


def test_drift_aware_training_adds_a_loss_on_drifted_copies_inside_the_box(finished):
    from defuse.data import ImageDataModule
    from defuse.stages.correct.finetune import CorrectionModule, drift_box

    run, config = finished
    model, x, y = _trained(finished, 64)
    box = drift_box(model, ImageDataModule(config.data, config.seed).split("val"), seed=0)
    assert box and all(BY_NAME[k].low <= low < high <= BY_NAME[k].high for k, (low, high) in box.items())
    plain = CorrectionModule(model, lam=0.0, keep=0.0)
    aware = CorrectionModule(model, lam=0.0, keep=0.0, drift_box=box, drift_seed=3)
    batch = {"clean": (x, y)}
    plain.log = aware.log = lambda *a, **k: None
    assert float(aware.training_step(batch, 0)) > float(plain.training_step(batch, 0))
    drifted = aware._drifted(x)
    # still images: the black background, pushed below 0 by read noise, is clipped back to the black floor (~1e-8)
    assert drifted.shape == x.shape and 0.0 <= float(drifted.min()) < 1e-6 and float(drifted.max()) <= 1.0
    assert ((drifted - x).abs().flatten(1).amax(dim=1) > 1e-3).all()  # every image drifted, each its own way
    assert not torch.equal(aware._drifted(x), drifted)  # a fresh draw each step


def test_defuse_drift_commands_write_their_files(finished, tmp_path, capsys):
    import shutil

    from defuse.cli import main

    target = tmp_path / "run"
    shutil.copytree(finished[0].root, target)
    assert main(["drift", "forensics", "--run-dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert "drift tolerance of before" in out and (target / "checks" / "drift_forensics_before.json").exists()
    written = __import__("json").loads((target / "checks" / "drift_forensics_before.json").read_text())
    assert written["images"] == 64 and set(written["parameters"]) == {p.name for p in parameters_for(1)}
    assert main(["drift", "optimize", "--run-dir", str(target), "--model", str(tmp_path / "nope.ckpt")]) == 2
    assert "nope.ckpt is missing" in capsys.readouterr().err
    assert main(["drift", "optimize", "--run-dir", str(target)]) == 0 and main(["report", "--run-dir", str(target)]) == 0
    worst = __import__("json").loads((target / "report" / "report.json").read_text())["drift_summary"][
        "worst_case_before"]
    assert worst["worst_accuracy"] <= worst["clean_accuracy"] and "Worst case (before" in (
        target / "report" / "index.html").read_text()


def test_the_checks_carry_the_drift_tolerance_and_the_report_shows_it(finished):
    import json

    run, _ = finished
    spec = json.loads(run.path("checks/drift_tolerance.json").read_text())
    assert set(spec) >= {"before", "after"} and spec["before"]["model"] == "before"
    report = json.loads(run.path("report/report.json").read_text())
    assert set(report["drift"]) == set(spec["before"]["parameters"])  # DESIGN.md's drift.<parameter> keys
    exposure = report["drift"]["exposure_ev"]
    assert exposure["tolerance_before"] == {"low": spec["before"]["parameters"]["exposure_ev"]["tolerance_low"],
                                            "high": spec["before"]["parameters"]["exposure_ev"]["tolerance_high"]}
    html = run.path("report/index.html").read_text()
    assert 'id="drift-table"' in html and "under-exposed" not in html  # the strip is a picture, not text
    assert run.path("checks/before_drift_presets.png").read_bytes()[:4] == b"\x89PNG"
