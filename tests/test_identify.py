import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch
from stubs import LineClassifier, LineGenerator, line_images, line_validity

from defuse.config import IdentifyConfig
from defuse.records import Failures
from defuse.search import (
    Screening,
    gradient_search,
    identify,
    least_drawn,
    make_evaluate,
    select_sources,
    shell_radii,
    shell_search,
)

CONFIG = IdentifyConfig(budget=64, shells=4, min_radius=0.1, max_radius=4.0, refine_steps=6,
                        failures_per_source=3, batch_sources=16, screen=False, walk_step=0.0)


def test_sources_exclude_misclassified_images_and_reconstruction_artefacts():
    images, labels = line_images(10)
    labels[0] = 1  # the classifier gets this one wrong
    scrambled = LineGenerator(scramble=True)  # reconstruction flips z: z0 in [-1, 0.5] -> [-0.5, 1]; still class 0
    images[1, 0, 0, 0] = -1.5  # its reconstruction lands at z0 = 1.5: class 1, an artefact
    selection = select_sources(LineClassifier(), scrambled, images, labels)
    assert 0 not in selection.index.tolist() and 1 not in selection.index.tolist()
    assert selection.stats == {"images": 10, "reconstruction_accuracy": 0.8, "excluded_misclassified": 1,
                               "excluded_reconstruction_misclassified": 1, "eligible": 8, "sources": 8,
                               "reconstruction_by_class": {"0": round(8 / 9, 4)}}


def test_the_reach_of_each_class_names_the_classes_the_generator_draws_worst():
    assert least_drawn({"0": 0.95, "1": 0.15, "2": 0.4, "3": 0.15}, ("20kmh", "50kmh", "stop", "yield"), shown=3) == (
        "50kmh 15%, yield 15%, stop 40%")
    assert least_drawn({"4": 0.5}, ()) == "4 50%"  # without names, the class index


def test_max_sources_takes_a_seeded_subset():
    images, labels = line_images(50)
    a = select_sources(LineClassifier(), LineGenerator(), images, labels, max_sources=10, seed=1).index
    b = select_sources(LineClassifier(), LineGenerator(), images, labels, max_sources=10, seed=1).index
    assert len(a) == 10 and torch.equal(a, b) and torch.equal(a, a.sort().values)


def test_shell_search_finds_flips_and_bisects_to_the_boundary():
    images, labels = line_images(20)
    gen, clf = LineGenerator(), LineClassifier()
    mu, _ = gen.encode(images)
    out = shell_search(make_evaluate(gen, clf), mu, torch.ones_like(mu), labels, directions=16,
                       edges=shell_radii(0.1, 4.0, 4), refine_steps=8, per_source=3,
                       generator=torch.Generator().manual_seed(0))
    assert len(out["source"]) > 0
    assert (out["predicted"] == 1).all() and (out["step"] == 0).all()
    assert (out["z"][:, 0] > 1).all()  # every kept latent is really across the boundary
    # the reported radius is the smallest flipping radius along the failure's direction, to one bisection step
    offset = out["z"] - mu[out["source"]]
    found_at = offset.norm(dim=1) / 2**0.5
    unit = offset / found_at[:, None]
    boundary = (1 - mu[out["source"], 0]) / unit[:, 0]
    assert (out["radius"] >= boundary - 1e-5).all()
    assert (out["radius"] - boundary <= found_at / 2**8 + 1e-5).all()
    counts = torch.bincount(out["source"], minlength=20)
    assert int(counts.max()) <= 3
    assert int(out["queries"]) >= 20 * 16  # the first shell alone queries every source


def _counting(evaluate):
    """``evaluate`` that also records every latent it was asked about."""
    asked = []

    def wrapped(z):
        asked.append(z.clone())
        return evaluate(z)

    return wrapped, asked


def test_screening_queries_only_candidates_the_judge_still_calls_the_source_class():
    images, labels = line_images(20)
    gen, clf = LineGenerator(), LineClassifier()
    mu, _ = gen.encode(images)
    judge = line_validity().judge()
    evaluate, asked = _counting(make_evaluate(gen, clf))
    out = shell_search(evaluate, mu, torch.ones_like(mu), labels, directions=4, edges=shell_radii(0.5, 4.0, 3),
                       refine_steps=0, per_source=3, generator=torch.Generator().manual_seed(0),
                       screening=Screening(judge, threshold=0.3, oversample=32))
    queried = torch.cat(asked)
    assert len(queried) == int(out["queries"]) > 0
    assert (judge(queried, torch.zeros(len(queried), dtype=torch.long)) >= 0.3).all()
    assert len(out["source"]) > 0 and (judge(out["z"], labels[out["source"]]) >= 0.3).all()


def test_the_walk_collects_more_failures_within_the_budget_and_every_one_flips():
    images, labels = line_images(20)
    gen, clf = LineGenerator(), LineClassifier()
    mu, _ = gen.encode(images)
    kwargs = dict(directions=4, edges=shell_radii(0.5, 4.0, 3), refine_steps=2, per_source=10)
    explore_only = shell_search(make_evaluate(gen, clf), mu, torch.ones_like(mu), labels,
                                generator=torch.Generator().manual_seed(0), **kwargs)
    walked = shell_search(make_evaluate(gen, clf), mu, torch.ones_like(mu), labels, walk_step=0.3, walk_batch=4,
                          budget=40, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (walked["step"] > 0).any()
    assert (walked["z"][:, 0] > 1).all() and (walked["predicted"] == 1).all()
    assert int(torch.bincount(walked["source"]).max()) <= 10
    # per query, the walk finds more failures than exploring blind
    assert len(walked["source"]) / int(walked["queries"]) > len(explore_only["source"]) / int(explore_only["queries"])
    # a walk failure's radius is its distance from its source, in posterior scales per dimension
    steps = walked["step"] > 0
    distance = (walked["z"][steps] - mu[walked["source"][steps]]).norm(dim=1) / 2**0.5
    torch.testing.assert_close(walked["radius"][steps], distance)


def test_the_walk_stops_at_the_budget():
    images, labels = line_images(10)
    gen, clf = LineGenerator(), LineClassifier()
    mu, _ = gen.encode(images)
    evaluate, asked = _counting(make_evaluate(gen, clf))
    kwargs = dict(directions=2, edges=shell_radii(0.5, 4.0, 3), refine_steps=1, per_source=1000, walk_step=0.3,
                  walk_batch=4, generator=torch.Generator().manual_seed(0))
    small = shell_search(evaluate, mu, torch.ones_like(mu), labels, budget=24, **kwargs)
    assert int(small["queries"]) == len(torch.cat(asked)) <= 10 * 24
    large = shell_search(make_evaluate(gen, clf), mu, torch.ones_like(mu), labels, budget=48, **kwargs)
    assert int(small["queries"]) < int(large["queries"]) <= 10 * 48  # the budget, not the walk, ended it


def test_gradient_search_crosses_the_boundary():
    images, labels = line_images(8)
    gen, clf = LineGenerator(), LineClassifier()
    mu, _ = gen.encode(images)
    out = gradient_search(make_evaluate(gen, clf), mu, torch.ones_like(mu), labels, steps=200, lr=0.1, penalty=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert len(out["source"]) == 8 and (out["z"][:, 0] > 1).all() and (out["predicted"] == 1).all()


def _identify(images, labels, seed=0, generator=None, config=CONFIG):  # screening off: see the validity test
    return identify(LineClassifier(), generator or LineGenerator(), images, labels, line_validity(), config, seed=seed)


def test_identify_is_deterministic_for_a_seed_and_records_every_column():
    images, labels = line_images(40)
    a, b, c = _identify(images, labels, 3), _identify(images, labels, 3), _identify(images, labels, 4)
    pd.testing.assert_frame_equal(a.table, b.table)
    np.testing.assert_array_equal(a.z, b.z)
    assert not np.array_equal(a.z, c.z) if len(a.z) == len(c.z) else True
    assert list(a.table.columns) == ["source_index", "source_label", "predicted_label", "confidence",
                                     "source_confidence", "radius", "validity", "validity_label", "valid", "mode",
                                     "walk_step"]
    assert (a.table["predicted_label"] != a.table["source_label"]).all()
    assert a.stats["queries"] > 0 and a.stats["failures"] == len(a.table) > 0
    # failures across the line are class 1 for the validity model too: low validity, flagged not dropped
    assert (a.table["validity"] < 0.5).mean() > 0.5 and (~a.table["valid"]).any()


def test_identify_gradient_mode():
    images, labels = line_images(16)
    config = IdentifyConfig(mode="gradient", gradient_steps=100, gradient_lr=0.1, gradient_penalty=0.0)
    failures = _identify(images, labels, config=config)
    assert len(failures) == 16 and set(failures.table["mode"]) == {"gradient"}


def test_no_failures_gives_an_empty_but_valid_result(tmp_path):
    images, labels = line_images(10)
    config = IdentifyConfig(budget=16, shells=2, min_radius=0.01, max_radius=0.02, refine_steps=2,
                            failures_per_source=1)
    failures = _identify(images, labels, config=config)
    assert len(failures) == 0 and failures.stats["failures"] == 0 and failures.stats["sources"] == 10
    failures.save(tmp_path / "failures.parquet")
    again = Failures.load(tmp_path / "failures.parquet")
    assert len(again) == 0 and again.z.shape == (0, 2)


def test_nan_latents_are_refused():
    images, labels = line_images(10)
    with pytest.raises(ValueError, match="returned NaN or infinite latents"):
        _identify(images, labels, generator=LineGenerator(nan=True))


def test_a_generator_that_cannot_reconstruct_draws_a_warning(caplog):
    images, labels = line_images(10)
    images[:, 0, 0, 0] = -1.5  # every reconstruction through the scrambling generator crosses the boundary
    with caplog.at_level(logging.WARNING, logger="defuse.search"):
        failures = _identify(images, labels, generator=LineGenerator(scramble=True))
    assert "too weak to search with" in caplog.text and "(least kept: 0 0%)" in caplog.text
    assert failures.stats["sources"] == 0
    caplog.clear()  # verify's searches of the test split leave the warning to identify, which gave it once
    with caplog.at_level(logging.WARNING, logger="defuse.search"):
        identify(LineClassifier(), LineGenerator(scramble=True), images, labels, line_validity(), CONFIG,
                 warn_weak_generator=False)
    assert "too weak" not in caplog.text


def test_failures_round_trip_and_mismatch_is_refused(tmp_path):
    images, labels = line_images(20)
    failures = _identify(images, labels)
    failures.save(tmp_path / "failures.parquet")
    again = Failures.load(tmp_path / "failures.parquet", {"queries": 3})
    pd.testing.assert_frame_equal(again.table, failures.table)
    assert (again.z == failures.z).all() and again.stats == {"queries": 3}
    np.save(tmp_path / "failures_z.npy", failures.z[:1])
    with pytest.raises(ValueError, match=re.escape("they come from different runs")):
        Failures.load(tmp_path / "failures.parquet")


def test_identify_leaves_the_callers_models_untouched():
    images, labels = line_images(10)
    classifier, generator = LineClassifier().train(), LineGenerator().train()
    identify(classifier, generator, images, labels, line_validity(), CONFIG, seed=0)
    assert classifier.training and generator.training
    assert all(p.requires_grad for p in generator.parameters())


def test_a_judge_that_screens_out_every_candidate_is_reported(caplog):
    images, labels = line_images(10)
    # steps of 50+ posterior scales leave the judge's support of every class: nothing passes the screen
    config = IdentifyConfig(budget=64, shells=4, min_radius=50.0, max_radius=100.0, failures_per_source=3)
    with caplog.at_level(logging.WARNING, logger="defuse.search"):
        failures = _identify(images, labels, config=config)
    assert failures.stats["queries"] == 0 and failures.stats["candidates_screened_out"] > 0 and len(failures) == 0
    assert "screened out all" in caplog.text and "identify.screen=false" in caplog.text


def test_screened_search_through_identify_flags_every_failure_valid():
    images, labels = line_images(30)
    config = IdentifyConfig(budget=64, shells=4, min_radius=0.3, max_radius=4.0, refine_steps=2, failures_per_source=6,
                            validity_threshold=0.2, walk_step=0.2)
    failures = _identify(images, labels, config=config)
    assert len(failures) > 0 and failures.table["valid"].all() and (failures.table["validity"] >= 0.2).all()
    assert (failures.table["walk_step"] > 0).any()
    assert failures.stats["valid_failures_per_1000_queries"] == pytest.approx(
        1000 * len(failures) / failures.stats["queries"], abs=1e-3)


def test_class_transport_redraws_other_classes_images_as_each_class_with_a_conditional_generator():
    from defuse.models.generators import ConvVAE
    from defuse.stages.identify.discover import transported_sources

    vae = ConvVAE(3, 32, latent_dim=4, width=8, num_classes=3).eval()
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    moved, target, origin = transported_sources(vae, images, labels, num_classes=3, per_class=4, seed=1)
    assert target.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and moved.shape == (12, 3, 32, 32)
    assert (labels[origin] != target).all()  # always another class's image
    again = transported_sources(vae, images, labels, num_classes=3, per_class=4, seed=1)
    assert torch.equal(again[2], origin) and torch.equal(again[0], moved)  # seeded
    z, _ = vae.encode(images[origin], labels[origin])
    z[:, 4:] = torch.nn.functional.one_hot(target, 3).float()
    with torch.no_grad():
        assert torch.allclose(moved, vae.decode(z), atol=1e-6)  # the image's own learned dims, the new class
    with pytest.raises(ValueError, match="needs a class-conditional generator"):
        transported_sources(ConvVAE(3, 32, latent_dim=4, width=8), images, labels, 3, 4)
    from defuse.config import load_config

    with pytest.raises(ValueError, match="`identify.transport` = 5 needs a class-conditional generator"):
        load_config(None, ["identify.transport=5"])  # refused before anything is fitted
    assert load_config(None, ["identify.transport=5", "generator.conditional=true"]).identify.transport == 5


def test_a_class_conditional_generator_warns_that_its_judge_reads_the_class(caplog):
    from defuse.data import ImageSet
    from defuse.models.generators import ConvVAE
    from defuse.stages.identify.discover import discover

    images = (torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    split = ImageSet(images, torch.tensor([0, 1, 2] * 4), ("a", "b", "c"))
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)).eval()
    config = IdentifyConfig(budget=16, shells=2, failures_per_source=2)
    for classes, warned in ((3, True), (0, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="defuse.stages.identify.discover"):
            found = discover(classifier, ConvVAE(3, 32, latent_dim=4, width=8, num_classes=classes).eval(), split,
                             split, config)
        assert ("reads each sample's class from its class dimensions" in caplog.text) is warned
        assert found.metrics.get("validity_judge_reads_class", False) is warned
