"""The planted benchmark's subgroup features: each must pick the kind of image its case names, or the benchmark
plants a different bug than it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_planted as bp  # noqa: E402


def _canvas() -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28)


def test_top_share_is_the_ink_above_the_middle_of_its_own_extent():
    head = _canvas()
    head[0, 0, 4:10, 10:18] = 1.0  # a big head ...
    head[0, 0, 10:24, 16:18] = 1.0  # ... on a thin tail
    tail = _canvas()
    tail[0, 0, 4:8, 12:16] = 1.0  # a small head on a long, thick tail
    tail[0, 0, 8:24, 12:18] = 1.0
    shares = bp.top_share(torch.cat([head, tail]))
    assert shares[0] > 0.6 > shares[1]
    # Shifting the digit does not move it: the middle is the ink's own, not the canvas's.
    assert torch.allclose(bp.top_share(torch.roll(head, 3, dims=-2)), shares[:1])


def test_width_and_slant_order_images_the_way_their_cases_name():
    upright, leaning = _canvas(), _canvas()
    upright[0, 0, 4:24, 13:15] = 1.0
    for row in range(4, 24):  # top to the right
        col = 20 - (row - 4) // 2
        leaning[0, 0, row, col : col + 2] = 1.0
    both = torch.cat([upright, leaning])
    assert bp.width(both)[1] > bp.width(both)[0]
    assert bp.slant(both)[1] > 0.3 and abs(float(bp.slant(both)[0])) < 1e-6


def test_ink_is_the_digits_mass_and_backslant_takes_the_left_leaning_end():
    small, big = _canvas(), _canvas()
    small[0, 0, 10:18, 13:15] = 1.0
    big[0, 0, 4:24, 12:16] = 1.0
    assert bp.ink(torch.cat([small, big])).tolist() == [16.0, 80.0]
    leaning_left = torch.flip(_canvas().index_put_((torch.tensor([0]), torch.tensor([0]), torch.arange(4, 24),
                                                    20 - torch.arange(20) // 2), torch.tensor(1.0)), dims=[-1])
    source, planted, feature, sign = bp.CASES["backslant"]
    assert (source, planted) == (4, 9) and float(feature(leaning_left)) * sign > 0.3  # the top quarter by sign


def test_aspect_is_width_for_height_and_squat_takes_the_wide_end():
    squat, tall = _canvas(), _canvas()
    squat[0, 0, 10:18, 4:24] = 1.0  # 20 wide, 8 high
    tall[0, 0, 4:24, 10:18] = 1.0  # the same block on its side
    ratios = bp.aspect(torch.cat([squat, tall]))
    assert torch.allclose(ratios[0] * ratios[1], torch.tensor(1.0)) and float(ratios[0]) > 2
    source, planted, feature, sign = bp.CASES["squat"]
    assert (source, planted) == (8, 0) and feature is bp.aspect and sign == +1


def test_left_share_is_the_ink_left_of_its_own_middle_and_leftheavy_takes_that_end():
    left = _canvas()
    left[0, 0, 6:22, 6:12] = 1.0  # a thick stroke on the left ...
    left[0, 0, 6:8, 12:22] = 1.0  # ... and a thin bar to the right
    shares = bp.left_share(torch.cat([left, torch.flip(left, dims=[-1])]))
    assert shares[0] > 0.6 > 0.4 > shares[1]
    assert torch.allclose(bp.left_share(torch.roll(left, 4, dims=-1)), shares[:1])  # its own middle, not the canvas's
    source, planted, feature, sign = bp.CASES["leftheavy"]
    assert (source, planted) == (5, 6) and feature is bp.left_share and sign == +1


def test_every_case_plants_a_different_class_and_the_fresh_ones_stay_off_the_default_run():
    assert all(source != planted for source, planted, _, _ in bp.CASES.values())
    fresh = {"wide", "topheavy", "backslant", "light", "squat", "leftheavy"}
    assert set(bp.DEFAULT_CASES) < set(bp.CASES) and fresh <= set(bp.CASES) - set(bp.DEFAULT_CASES)


def test_the_simulated_persons_labels_and_consent_reach_the_config(tmp_path):
    config = bp.case_config(tmp_path / "case.npz", seed=3)
    labels = tmp_path / "person.yaml"
    consenting = bp.labelled_config(config, labels, consent=True)
    assert consenting.label.mode == str(labels) and consenting.correct.relabel and consenting.seed == 3
    assert not bp.labelled_config(config, labels, consent=False).correct.relabel
    assert not config.correct.relabel  # the shipped default: no relabelling without consent


def test_review_figures_count_answers_against_the_planted_truth(tmp_path):
    import numpy as np
    import pandas as pd

    review_figures = bp.review_figures

    clean = np.array([2, 2, 7, 7, 2])
    given = np.array([7, 7, 7, 7, 2])  # images 0 and 1 poisoned (2s labelled 7)
    review = tmp_path / "review.csv"
    # image 0 corrected, image 1 confirmed as 7 (a wrong answer), image 2 called 2 (a wrong relabel), image 3 kept.
    pd.DataFrame({"image": [0, 1, 2, 3], "label": [2, 7, 2, 7]}).to_csv(review, index=False)
    assert review_figures(review, clean, given) == {"reviewed": 4, "review_changed": 2, "review_changed_poisoned": 1,
                                                    "reviewed_poisoned": 2, "review_wrong_answers": 2}


def test_replay_correct_needs_a_kept_run_to_replay(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bp.main(["--replay-correct"])  # nothing kept to replay
    assert "--replay-correct re-runs the repair of kept runs: give --keep DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bp.main(["--without-control"])  # a fresh run always grades against its clean control
    assert "--without-control goes with --replay-correct" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bp.main(["--rechoose", "--keep", str(tmp_path)])  # re-choosing needs a replay's kept candidates
    assert "--rechoose re-grades the kept candidates of a replay" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bp.main(["--pairs-first", "--keep", str(tmp_path)])  # a re-order of kept regions, for --regrade only
    assert "--pairs-first re-orders kept regions for --regrade" in capsys.readouterr().err
    run = bp.RunDir(tmp_path / "seed0" / "short")
    with pytest.raises(SystemExit, match=r"holds no finished run with the simulated person's labels to replay"):
        bp.replay_correct(run, None, "short", {}, None, None, True, False, 0.0)
    for name in ("person.yaml", "regions.json"):
        run.path(name).parent.mkdir(parents=True, exist_ok=True)
        run.path(name).write_text("{}")
    with pytest.raises(SystemExit, match=r"holds no review file to re-choose with"):  # before anything runs
        bp.replay_correct(run, None, "short", {}, None, None, True, True, 0.0, rechoose=True)


def test_an_experiment_on_the_repair_is_a_replay_of_correct_settings_and_reaches_the_config(tmp_path, capsys):
    outside_correct = ["--keep", str(tmp_path), "--replay-correct", "--set", "data.val_size=0.2"]
    for argv in (["--set", "correct.epochs=10"], outside_correct):
        with pytest.raises(SystemExit):
            bp.main(argv)
        assert "--set takes correct.KEY=VALUE and goes with --replay-correct" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bp.main(["--keep", str(tmp_path), "--replay-correct", "--set", "correct.epoch=10"])
    assert "Did you mean 'correct.epochs'?" in capsys.readouterr().err  # before any seed is run
    np_path = tmp_path / "x.npz"
    config = bp.case_config(np_path, 0, extra=("correct.epochs=10",))
    assert config.correct.epochs == 10 and bp.case_config(np_path, 0).correct.epochs != 10


def test_the_candidate_diagnosis_names_the_command_that_keeps_the_run_it_needs(tmp_path):
    import bench_candidates

    with pytest.raises(SystemExit, match=r"manifest.json is missing: keep a run with .*--seeds 3 --cases short"):
        bench_candidates.main(["--keep", str(tmp_path), "--seed", "3", "--case", "short"])
    run = tmp_path / "seed3" / "short"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text('{"stages": {"label": {}}}')
    with pytest.raises(SystemExit, match=r"has no repair candidates to grade .*--cases short --replay-correct"):
        bench_candidates.main(["--keep", str(tmp_path), "--seed", "3", "--case", "short"])


def test_thin_out_keeps_a_few_of_the_subgroups_labelled_images_and_every_test_image():
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.zeros((1200, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(2), 600)
    for i in range(1200):  # a bar of a random width: the subgroup is the widest 15% of class 1
        half = int(rng.integers(1, 12))
        x[i, 10:18, 14 - half : 14 + half] = 255
    labelled = 1000  # rows 1000-1199 are the test split: never thinned
    x_thin, y_thin, (info,) = bp.thin_out(x, y, labelled, [(1, bp.width, +1)], seed=0)
    widths = bp.width(torch.from_numpy(x[:, None]).float() / 255).numpy()
    group = (y == 1) & (widths >= info["threshold"])
    assert info["subgroup_labelled"] == int(group[:labelled].sum()) and 60 <= info["subgroup_labelled"] <= 90
    assert info["subgroup_kept"] == round(bp.NATURAL_KEEP * info["subgroup_labelled"])
    assert len(y_thin) == len(y) - info["subgroup_labelled"] + info["subgroup_kept"]
    assert np.array_equal(x_thin[-200:], x[-200:]) and np.array_equal(y_thin[-200:], y[-200:])  # test untouched
    assert (y_thin == 0).sum() == 600  # class 0, outside every subgroup, keeps all its images
    again = bp.thin_out(x, y, labelled, [(1, bp.width, +1)], seed=0)[0]
    assert np.array_equal(again, x_thin) and not np.array_equal(bp.thin_out(x, y, labelled, [(1, bp.width, +1)],
                                                                            seed=1)[0], x_thin)


def test_every_split_but_test_carries_the_planted_labels_unless_the_audit_stands_for_a_gold_set(tmp_path):
    import numpy as np

    poisoned = bp.write_case_data(tmp_path, "slant", 0)[1]["poisoned_labels"]
    assert set(poisoned) == {"train", "val", "audit"} and min(poisoned.values()) > 0
    gold = tmp_path / "gold"
    gold.mkdir()
    _, info, rows = bp.write_case_data(gold, "slant", 0, clean_audit=True)
    assert set(info["poisoned_labels"]) == {"train", "val"} and len(rows) == sum(info["poisoned_labels"].values())
    given, clean = np.load(tmp_path / "slant.npz")["y"], np.load(tmp_path / "clean.npz")["y"]
    assert np.array_equal(given[-2000:], clean[-2000:])  # the test split grades under clean labels
    assert (given != clean).sum() == sum(poisoned.values())


def test_the_natural_cases_touch_no_label_and_name_the_pair_the_shipped_classifier_misreads():
    assert set(bp.NATURAL_CASES) == {"natural_short2", "natural_short0"}
    assert not set(bp.NATURAL_CASES) & set(bp.CASES)
    assert bp.case_spec("natural_short2") == (2, 7, bp.height, -1) and bp.case_spec("slant")[:2] == (7, 1)
    with pytest.raises(SystemExit):
        bp.main(["--cases", "natural_short9"])


def test_the_summary_counts_a_planted_pair_found_reversed_whatever_the_direct_visibility():
    seed = {"clean": {"max_bug_score": 0.06}, "thin": {"visibility": 0.1, "planted_rank": 1,
                                                     "planted_orientation": "reversed", "planted_precision": 0.875}}
    hidden = {"clean": {"max_bug_score": 0.06}, "thin": {"visibility": 0.1, "planted_rank": 9,
                                                       "planted_orientation": "direct", "planted_precision": 0.1}}
    table = bp.summarise({0: seed, 1: hidden})["thin"]
    assert table["planted_rank"]["values"] == [1] and table["planted_rank"]["bar"] == 3 and table["planted_rank"]["met"]
    assert table["planted_precision"]["values"] == [0.875]


def test_the_sign_case_thins_its_combination_by_config_and_grades_it_from_the_recorded_factors(monkeypatch):
    """--dataset signs: the night-50 case reaches the shipped signs config as data.signs.rare (the clean control
    and the reference have none), its test subgroup is the test signs rendered at night, and its pair is the one
    the screen measured (50 km/h read as 80 km/h)."""
    from defuse.signs import CLASSES

    monkeypatch.setattr(bp, "DATASET", "signs")
    config = bp.sign_case_config("night50", 0, ("data.signs.images_per_class=20", "data.signs.test_per_class=30"))
    assert (config.data.signs.rare.sign, config.data.signs.rare.factor, config.data.signs.rare.values) == \
        ("50kmh", "illumination", ["night"])
    assert bp.sign_case_config("clean", 0).data.signs.rare.sign is None
    assert bp.case_spec("night50")[:2] == (CLASSES.index("50kmh"), CLASSES.index("80kmh"))
    group = bp.sign_subgroup(config, "night50")
    from defuse.signs import sign_sets

    _, test = sign_sets(20, 30, 0, 32)
    expected = (test.factors["sign"] == CLASSES.index("50kmh")) & (test.factors["illumination"] == "night")
    assert group.tolist() == expected.tolist() and 0 < int(group.sum()) < 30
    with pytest.raises(SystemExit):
        bp.main(["--dataset", "signs", "--cases", "slant"])  # an MNIST case is no sign case


def test_the_screened_random_baseline_ends_when_the_judge_is_sure_of_nothing():
    from defuse.models.generators import ConvVAE
    from defuse.validity import ValidityModel

    generator = ConvVAE(1, 28, latent_dim=4, width=8).eval()
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3)).eval()
    z = torch.randn(60, 4, generator=torch.Generator().manual_seed(0)).numpy()
    judge = ValidityModel.fit(z, torch.arange(60).remainder(3).numpy(), 3)
    # a threshold no probability reaches: before, the screened draw never ended (the GAN on the signs)
    assert bp.random_prior_yield(classifier, generator, judge, 50, threshold=1.5, seed=0, screened=True) == 0.0
    # Unscreened at threshold 0: every prior sample counts where the model and the judge disagree.
    from defuse.models.generators import prior_latents
    from defuse.seeding import torch_generator

    z = prior_latents(generator, 50, torch_generator(0, "bench.random_prior"))
    with torch.no_grad():
        read = classifier(generator.decode(z)).argmax(dim=1).numpy()
    expected = 1000 * float((read != judge.scores(z).argmax(axis=1)).mean())
    assert expected > 0
    assert bp.random_prior_yield(classifier, generator, judge, 50, threshold=0.0, seed=0) == pytest.approx(expected)


def test_rank_miss_probe_refuses_a_malformed_or_missing_run_with_the_fix(tmp_path, capsys):
    import probe_rank_misses

    with pytest.raises(SystemExit):
        probe_rank_misses.main(["--keep", str(tmp_path), "--runs", "squat"])
    assert "SEED:CASE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe_rank_misses.main(["--keep", str(tmp_path), "--runs", "3:squat"])
    err = capsys.readouterr().err
    assert str(tmp_path / "seed3" / "squat") in err and "--seeds 3 --cases squat --no-repair" in err
