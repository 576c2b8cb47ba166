import copy
import json
import re
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from stubs import LineGenerator, quadrant_validity

from defuse.config import CorrectConfig, DataConfig
from defuse.data import ImageDataModule
from defuse.label_issues import (
    contradicting_labels,
    image_judge_scores,
    moved_to_person,
    neighbour_shares,
    neighbourhood_labels,
    repaired_pairs,
)
from defuse.models import build_classifier
from defuse.records import Region, Regions
from defuse.stages.correct.candidates import choose_candidate, correct
from defuse.stages.correct.finetune import candidate_weights
from defuse.stages.correct.images import RealImages, RegionSamples, sample_regions
from defuse.stages.correct.stage import _inputs_key, _trained_on, section_by_content
from defuse.stats import paired_change


def _region(region_id: int) -> Region:
    return Region(id=region_id, source_label=0, predicted_label=1, pair="0 -> 1", n_failures=10, weight=0.5,
                  purity=1.0, error_rate=1.0, flip_rate=1.0, validity=0.9, confidence=0.9, suggested_label=0,
                  median_radius=1.0, pair_median_radius=1.0, source_confidence=1.0, coverage=0.5, bug_score=0.8,
                  mean=[2.0, float(region_id)], cov=[[0.1, 0.0], [0.0, 0.1]])


def test_sample_regions_takes_only_regions_labelled_with_a_class():
    regions = Regions([_region(1), _region(2), _region(3)], {})
    samples = sample_regions(regions, {1: 0, 3: 2}, LineGenerator(), per_region=5, tau=1.0,
                             rng=np.random.default_rng(0))
    assert samples.images.shape == (10, 1, 2, 2)
    assert samples.labels.tolist() == [0] * 5 + [2] * 5 and samples.regions.tolist() == [1] * 5 + [3] * 5
    with pytest.raises(ValueError, match=re.escape("No region is labelled with a class: nothing to correct.")):
        sample_regions(regions, {}, LineGenerator(), per_region=5, tau=1.0, rng=np.random.default_rng(0))


@pytest.fixture
def digits():
    return ImageDataModule(DataConfig(source="digits", batch_size=128), seed=0)


def _regions_of_ones_called_seven(data: ImageDataModule, n: int) -> RegionSamples:
    """A stand-in for region samples: real '1' images that must be learned as class 7 (a label the data contradicts,
    so the fine-tune has to move the model)."""
    train = data.split("train")
    ones = train.float_images()[train.labels == 1][:n]
    return RegionSamples(ones, torch.full((len(ones),), 7), torch.ones(len(ones), dtype=torch.long))


def _issues(data: ImageDataModule, split: str, label: int, person: int, relabelled: bool) -> pd.DataFrame:
    """Label issues: every image of ``split`` labelled ``label``, which the person calls ``person``."""
    rows = np.flatnonzero(data.split(split).labels.numpy() == label)
    return pd.DataFrame({"split": split, "position": rows, "image": data.indices(split).numpy()[rows],
                         "given_label": label, "given_class": str(label), "region": 1, "person_label": person,
                         "person_class": str(person), "relabelled": relabelled})


def test_correct_raises_region_accuracy_and_resumes(tmp_path, digits):
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    regions = _regions_of_ones_called_seven(digits, 60)
    real = RealImages.gather(digits)
    config = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0, layers=["all"])
    repaired, summary = correct(classifier, digits, real, regions, regions, config, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())  # the original is untouched
    assert summary["chosen"] == {"layers": "all", "lambda": 2.0, "epoch": 0}
    assert summary["chosen_on"].startswith("decoded")  # no real bug images here
    assert summary["val_region_accuracy_after"] > summary["val_region_accuracy_before"]
    first = json.loads((tmp_path / "lambda_2" / "epochs.json").read_text())
    assert len(first) == 1 and (tmp_path / "lambda_2" / "last.ckpt").exists()
    assert len(first[0]["held_out"]) == len(real.guard) == len(digits.split("val")) + len(digits.split("audit"))

    # A second call with more epochs resumes from last.ckpt: epoch 0 is not trained again.
    longer = CorrectConfig(lambdas=[2.0], epochs=2, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0, layers=["all"])
    _, again = correct(classifier, digits, real, regions, regions, longer, tmp_path)
    second = json.loads((tmp_path / "lambda_2" / "epochs.json").read_text())
    assert [r["epoch"] for r in second] == [0, 1] and second[0] == first[0]
    assert len(again["candidates"]) == 2
    # Each epoch's candidate is that epoch's weights, loadable into the classifier as they are, and the resumed
    # epoch trained on from epoch 0's (it moved them).
    states = [torch.load(tmp_path / "lambda_2" / f"epoch{e}.ckpt", weights_only=True) for e in (0, 1)]
    weights = [candidate_weights(state) for state in states]
    assert set(weights[0]) == set(classifier.state_dict())
    assert any(not torch.allclose(weights[0][k], weights[1][k], atol=1e-4) for k in weights[0]
               if weights[0][k].is_floating_point())


def test_clean_accuracy_bound_keeps_the_original_when_nothing_qualifies(tmp_path, digits):
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    regions = _regions_of_ones_called_seven(digits, 30)
    # an untrained classifier gains clean accuracy when fine-tuned, so force the bound with a tiny lr
    tiny = CorrectConfig(lambdas=[1.0], epochs=1, lr=1e-9, head_lr=1e-9, max_clean_drop=0.0)
    repaired, summary = correct(classifier, digits, RealImages.gather(digits), regions, regions, tiny, tmp_path)
    assert summary["chosen"] is None and "no candidate" in summary["reason"]
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(repaired.eval()(x), classifier.eval()(x))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from defuse.config import ClassifierConfig, TrainerConfig
    from defuse.models.training import train_classifier

    data = ImageDataModule(DataConfig(source="digits", batch_size=128), seed=0)
    classifier, _ = train_classifier(data, ClassifierConfig(width=8, epochs=3), TrainerConfig(progress_bar=False),
                                     root=str(tmp_path_factory.mktemp("fit")))
    return classifier


def test_a_repair_that_gives_up_part_of_a_class_is_refused(tmp_path, digits, trained):
    regions = _regions_of_ones_called_seven(digits, 60)  # teaching real 1s as 7 costs the 1s
    real = RealImages.gather(digits)
    loose = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0, layers=["all"])
    _, chosen = correct(trained, digits, real, regions, regions, loose, tmp_path / "a")
    guarded = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=0.05, layers=["all"])
    _, refused = correct(trained, digits, real, regions, regions, guarded, tmp_path / "b")
    assert chosen["chosen"] is not None and chosen["candidates"][0]["largest_class_drop"] > 0.05
    assert refused["chosen"] is None and "no candidate" in refused["reason"]
    # ... and the clean guard's bootstrap bound refuses it too: it loses the held-out 1s, far beyond noise.
    bounded = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=0.005, max_class_drop=1.0, layers=["all"])
    _, bound = correct(trained, digits, real, regions, regions, bounded, tmp_path / "c")
    low, high = bound["candidates"][0]["guard_change_ci95"]
    assert low < -0.005 and low <= bound["candidates"][0]["guard_change"] <= high and bound["chosen"] is None


def test_the_repaired_model_answers_as_the_chosen_candidate_was_judged(tmp_path, digits, trained):
    from defuse.models.inference import predict_labels

    regions = _regions_of_ones_called_seven(digits, 60)
    real = RealImages.gather(digits)
    # A mild fine-tune (a strong one reads every image as 7): it moves many answers to 7 and a few elsewhere.
    loose = CorrectConfig(lambdas=[0.5], epochs=1, lr=1e-3, max_clean_drop=1.0, max_class_drop=1.0, layers=["all"])
    repaired, summary = correct(trained, digits, real, regions, regions, loose, tmp_path / "a")
    x, labels = real.guard.float_images(), real.guard.labels
    before, after = (predict_labels(m, x) for m in (trained, repaired))
    assert (before != after).any() and ((before != after) & (after != 7)).any()  # every answer it moved stands
    change = float((after == labels).float().mean() - (before == labels).float().mean())
    assert summary["chosen"] is not None and summary["guard"]["guard_change"] == pytest.approx(change, abs=1e-4)


def test_label_issues_leave_every_loss_and_check_unless_the_person_consents_to_relabel(digits):
    issues = pd.concat([_issues(digits, "train", 1, 7, False), _issues(digits, "val", 1, 7, False)])
    left_out = RealImages.gather(digits, issues)
    n_train, n_val = (int((digits.split(s).labels == 1).sum()) for s in ("train", "val"))
    assert len(left_out.clean_train) == len(digits.split("train")) - n_train and len(left_out.relabelled) == 0
    assert len(left_out.guard) == len(digits.split("val")) + len(digits.split("audit")) - n_val
    consented = RealImages.gather(digits, issues.assign(relabelled=True))
    assert len(consented.clean_train) == len(left_out.clean_train)  # never in the clean loss under the old label
    assert len(consented.relabelled) == n_train and (consented.relabelled.labels == 7).all()
    # held-out relabelled images are graded under the person's label (here no model reads them: all guard)
    assert len(consented.guard) == len(left_out.guard) + n_val


def test_held_out_images_the_original_misreads_as_a_labelled_mistake_are_the_bug_images(digits):
    class ReadsEverythingAsOne(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.ones(len(x), dtype=torch.long), 10).float()

    real = RealImages.gather(digits, bug_pairs={(7, 1)}, original=ReadsEverythingAsOne())
    held_out = [digits.split(s) for s in ("val", "audit")]
    sevens = sum(int((h.labels == 7).sum()) for h in held_out)
    assert len(real.bugs) == sevens > 0 and (real.bugs.labels == 7).all()
    assert len(real.guard) == sum(len(h) for h in held_out) - sevens and not (real.guard.labels == 7).any()


def test_guard_images_a_candidate_moves_to_the_persons_label_await_the_persons_answer(digits):
    """Where every split carries a labelling bug, a held-out image of the bug keeps its mistaken label and the guard
    counts its fix as a loss: such moves (mistake -> person's label, for a repaired pair) are what a person settles,
    each image once; moves to other classes, images the original already misread, and answered images are not."""
    real = RealImages.gather(digits)
    labels = real.held_out.labels.numpy()
    base = labels.copy()
    ones, twos = np.flatnonzero(labels == 1), np.flatnonzero(labels == 2)
    first, second = base.copy(), base.copy()
    first[ones[:2]] = 7       # moved to the person's label: awaits an answer
    second[ones[1:4]] = 7     # a second candidate moves two more: the union is asked, each once
    second[ones[4]] = 3       # moved to a class nobody gave: the guard's business
    second[twos[0]] = 7       # labelled 2, not the pair's mistake
    base[ones[3]] = 5         # the original misread it already: not the fix's loss
    unanswered = ~real.reviewed.numpy()
    moved = moved_to_person(labels, base, [first, second], {(7, 1)}, unanswered)
    assert np.flatnonzero(moved >= 0).tolist() == sorted(ones[[0, 1, 2]].tolist()) and (moved[moved >= 0] == 7).all()
    source = np.concatenate([digits.indices(s).numpy() for s in ("val", "audit")])
    answered = RealImages.gather(digits, reviewed={int(source[ones[0]])})
    assert answered.reviewed.sum() == 1 and not answered.train_reviewed.any()
    assert np.flatnonzero(moved_to_person(labels, base, [first, second], {(7, 1)}, ~answered.reviewed.numpy())
                          >= 0).tolist() == sorted(ones[[1, 2]].tolist())
    assert (moved_to_person(labels, base, [first, second], set(), unanswered) < 0).all()
    trained = RealImages.gather(digits, reviewed={int(digits.indices("train")[5])})
    assert np.flatnonzero(trained.train_reviewed.numpy()).tolist() == [5]


def test_paired_change_and_its_bootstrap_interval():
    before = np.ones(1000, dtype=bool)
    assert paired_change(before, before, np.random.default_rng(0)) == (0.0, 0.0, 0.0)
    after = before.copy()
    after[:20] = False  # 20 of 1,000 lost: -2 points, an interval of about +-0.9 around it
    change, low, high = paired_change(before, after, np.random.default_rng(0))
    assert change == pytest.approx(-0.02) and low < -0.02 < high < -0.005 and low > -0.04
    assert paired_change(before, after, np.random.default_rng(0)) == (change, low, high)  # seeded: reproducible


def test_region_samples_the_judge_denies_the_persons_label_are_left_out():
    judge = quadrant_validity()  # class 1 where z0 > 1: the regions' centres (z0 = 2) are 1s to the judge
    regions = Regions([_region(1), _region(2)], {})
    samples = sample_regions(regions, {1: 0, 2: 1}, LineGenerator(), per_region=40, tau=1.0,
                             rng=np.random.default_rng(0), validity=judge, min_validity=0.5)
    assert (samples.regions == 2).sum() > 30 and (samples.regions == 1).sum() < 10
    assert (judge.validity(samples.images.flatten(1)[:, :2].numpy(), samples.labels.numpy()) >= 0.5).all()
    none = sample_regions(regions, {1: 0}, LineGenerator(), per_region=5, tau=0.01, rng=np.random.default_rng(0),
                          validity=judge, min_validity=0.99)
    assert len(none.labels) == 0 and none.images.shape[1:] == (1, 2, 2)


def test_contradicting_labels_need_the_person_and_the_independent_judge():
    regions = Regions([_region(1), replace(_region(2), mean=[-2.0, -2.0])], {})  # both 0 -> 1
    judge = quadrant_validity()  # class 1 where z0 > 1, class 2 where z1 > 1, else class 0
    latents = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    labels = np.array([1, 0, 1, 2, 1])
    # Region 1 labelled 0: image 0 is labelled 1 (the region's mistake) and the judge reads it as 0, the person's
    # class; image 1 is labelled 0 already; image 2 is labelled 1 and the judge agrees it is a 1; image 3 is another
    # class altogether.
    region_of, person_of = contradicting_labels(regions, {1: 0}, latents, labels, judge)
    assert region_of.tolist() == [1, -1, -1, -1, 1] and person_of.tolist() == [0, -1, -1, -1, 0]
    # Both regions labelled 0: each image goes to the nearest (image 4 is nearer to region 2's mean, (-2, -2)).
    region_of, _ = contradicting_labels(regions, {1: 0, 2: 0}, latents, labels, judge)
    assert region_of.tolist() == [1, -1, -1, -1, 2]
    # A region labelled with its own predicted class (the person agrees with the model): nothing contradicts.
    assert (contradicting_labels(regions, {1: 1}, latents, labels, judge)[0] == -1).all()
    assert (contradicting_labels(regions, {}, latents, labels, judge)[0] == -1).all()


def test_a_contradicted_label_needs_its_held_out_neighbours_to_carry_the_persons_label_too():
    regions = Regions([_region(1)], {})  # 0 -> 1, labelled 0 below
    judge = quadrant_validity()  # class 0 where z0 < 1 and z1 < 1
    latents = np.array([[0.0, 0.0], [0.0, -1.0]])
    labels = np.array([1, 1])  # both carry the region's mistake, and the judge is sure both are 0s
    assert contradicting_labels(regions, {1: 0}, latents, labels, judge)[0].tolist() == [1, 1]
    # Held-out neighbours: 0s around the first image, 1s (its given label) around the second.
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.normal(0, 0.05, (12, 2)), rng.normal(0, 0.05, (12, 2)) + [0.0, -1.0]])
    reference_labels = np.array([0] * 12 + [1] * 12)
    region_of, person_of = contradicting_labels(regions, {1: 0}, latents, labels, judge,
                                                neighbours=(reference, reference_labels))
    assert region_of.tolist() == [1, -1] and person_of.tolist() == [0, -1]


def test_the_image_judge_contradicts_a_label_the_latent_judge_accepts_only_when_it_is_sure():
    regions = Regions([_region(1)], {})  # 0 -> 1, labelled 0 below
    judge = quadrant_validity()
    latents = np.array([[3.0, 0.0]] * 4)  # the latent judge reads every one as a 1: alone, it contradicts none
    labels = np.array([1, 1, 1, 2])
    scores = np.array([[0.95, 0.05, 0.0], [0.85, 0.15, 0.0], [0.0, 0.0, 1.0], [0.99, 0.01, 0.0]])
    region_of, person_of = contradicting_labels(regions, {1: 0}, latents, labels, judge, image_scores=scores)
    # Image 0: the image judge is sure of the person's class (0.95 >= IMAGE_JUDGE_SURE); image 1: not sure enough;
    # image 2: sure of another class; image 3: sure of 0, but its label is not the region's mistake.
    assert region_of.tolist() == [1, -1, -1, -1] and person_of.tolist() == [0, -1, -1, -1]
    assert (contradicting_labels(regions, {1: 0}, latents, labels, judge)[0] == -1).all()  # no image judge: none


def test_where_the_image_judge_judges_a_latent_contradiction_does_not_stand_alone():
    regions = Regions([_region(1)], {})  # 0 -> 1, labelled 0 below
    judge = quadrant_validity()
    latents = np.zeros((3, 2))  # the latent judge reads every one as a 0: alone, it contradicts all three 1s
    labels = np.array([1, 1, 1])
    assert contradicting_labels(regions, {1: 0}, latents, labels, judge)[0].tolist() == [1, 1, 1]
    # The image judge sees the images: sure of a 0, unsure, sure of a 1 (the label was right).
    scores = np.array([[0.97, 0.03, 0.0], [0.6, 0.4, 0.0], [0.02, 0.98, 0.0]])
    region_of, _ = contradicting_labels(regions, {1: 0}, latents, labels, judge, image_scores=scores)
    assert region_of.tolist() == [1, -1, -1]


def test_the_image_judge_learns_the_audit_labels_and_is_the_same_judge_every_time(tmp_path, digits):
    first = image_judge_scores(digits, "small_cnn", 8, 15, 0, None, tmp_path)
    second = image_judge_scores(digits, "small_cnn", 8, 15, 0, None, tmp_path)
    assert set(first) == {"train", "val"} and first["train"].shape == (len(digits.split("train")), 10)
    np.testing.assert_array_equal(first["train"], second["train"])  # review and correct see one judge
    np.testing.assert_allclose(first["val"].sum(axis=1), 1.0, atol=1e-5)
    # Fitted on the 270 audit images alone (45 steps here), it reads most training images as their label (chance: 0.1).
    assert (first["train"].argmax(axis=1) == digits.split("train").labels.numpy()).mean() > 0.7
    other = image_judge_scores(digits, "small_cnn", 8, 15, 1, None, tmp_path)["train"]  # another seed's stream
    assert not np.array_equal(other, first["train"])


def test_neighbour_shares_count_labels_among_the_nearest_and_can_leave_each_image_out():
    reference = np.array([[0.0], [1.0], [2.0], [10.0]])
    labels = np.array([0, 0, 1, 2])
    shares = neighbour_shares(np.array([[0.1], [9.0]]), reference, labels, num_classes=3, k=2)
    assert shares.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    # Each reference image among its own neighbours, left out: image 0's two nearest are 1 (label 0) and 2 (label 1).
    own = neighbour_shares(reference, reference, labels, num_classes=3, k=2, exclude_self=True)
    assert own[0].tolist() == [0.5, 0.5, 0.0] and np.allclose(own.sum(axis=1), 1.0)


def test_the_keep_term_holds_the_model_to_the_original_and_stays_out_of_checkpoints():
    from defuse.stages.correct.finetune import CorrectionModule

    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    held = CorrectionModule(copy.deepcopy(classifier), lam=1.0, keep=1.0)
    free = CorrectionModule(copy.deepcopy(classifier), lam=1.0, keep=0.0)
    assert all(k.startswith("model.") for k in held.state_dict())  # the frozen original is not saved
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    batch = {"clean": (x, y), "regions": (x, y)}
    for module in (held, free):
        module.log = module.log_dict = lambda *a, **k: None  # no Trainer attached
        module.model.eval()  # dropout off: the two losses differ only by the keep term
    assert float(held.training_step(batch, 0)) == pytest.approx(float(free.training_step(batch, 0)), abs=1e-5)
    with torch.no_grad():  # move the fine-tuned copy away from the original: now the term costs something
        for p in held.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        free.model.load_state_dict(held.model.state_dict())
    assert float(held.training_step(batch, 0)) > float(free.training_step(batch, 0)) + 1e-4


def test_the_keep_term_frees_the_images_whose_label_the_original_does_not_give():
    from defuse.stages.correct.finetune import CorrectionModule

    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8).eval()
    x = torch.rand(16, 1, 28, 28)
    original = classifier(x).argmax(dim=1)
    module = CorrectionModule(copy.deepcopy(classifier), lam=0.0, keep=1.0)
    module.log = lambda *a, **k: None  # no Trainer attached
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module.model.eval()
    clean_only = CorrectionModule(copy.deepcopy(module.model), lam=0.0, keep=0.0)
    clean_only.log = module.log
    clean_only.model.eval()
    relabelled = (original + 1) % 10  # a label the original never gives: a corrected image, free to move
    held = float(module.training_step({"clean": (x, original)}, 0)) - float(
        clean_only.training_step({"clean": (x, original)}, 0))
    freed = float(module.training_step({"clean": (x, relabelled)}, 0)) - float(
        clean_only.training_step({"clean": (x, relabelled)}, 0))
    assert held > 1e-4 and freed == pytest.approx(0.0, abs=1e-6)


def test_training_set_counts_each_relabelled_image_the_configured_number_of_times(digits):
    relabelled = _issues(digits, "train", 1, 7, True)
    real = RealImages.gather(digits, relabelled.assign(kind="contradicted"))
    ones = int((digits.split("train").labels == 1).sum())
    training = real.training_set(relabelled_repeats=3)
    assert len(training) == len(digits.split("train")) - ones + 3 * ones
    assert int((training.labels == 7).sum()) == int((digits.split("train").labels == 7).sum()) + 3 * ones
    assert int((training.labels == 1).sum()) == 0


def test_pairs_that_few_training_images_contradict_are_listed_but_not_relabelled(digits):
    from defuse.label_issues import MIN_BUG_IMAGES, find_label_issues

    # Region 1 (0 -> 1, labelled 0): the quadrant judge reads every latent at (0, 0) as 0, so every training image
    # labelled 1 contradicts it, plenty of them; with only a few such images the pair is a boundary case.
    regions = Regions([_region(1)], {})
    judge = quadrant_validity()
    train_labels = digits.split("train").labels.numpy()
    latents = {name: np.zeros((len(digits.split(name)), 2)) for name in ("train", "val", "audit")}
    # The held-out witnesses (audit): its 0s sit at (0, 0) with the contradicted images, its other images far away.
    latents["audit"][digits.split("audit").labels.numpy() != 0] = [-50.0, -50.0]
    issues = find_label_issues(regions, {1: 0}, latents, judge, digits, relabel=True)
    contradicted = issues[(issues["kind"] == "contradicted") & (issues["split"] == "train")]
    assert len(contradicted) == int((train_labels == 1).sum()) >= MIN_BUG_IMAGES and contradicted["relabelled"].all()
    few = np.tile([5.0, 0.0], (len(train_labels), 1))  # read as class 1 (z0 > 1): no contradiction ...
    few[np.flatnonzero(train_labels == 1)[: MIN_BUG_IMAGES - 1]] = 0.0  # ... but for MIN_BUG_IMAGES - 1 of them
    issues = find_label_issues(regions, {1: 0}, {**latents, "train": few}, judge, digits, relabel=True)
    contradicted = issues[(issues["kind"] == "contradicted") & (issues["split"] == "train")]
    assert len(contradicted) == MIN_BUG_IMAGES - 1 and not issues["relabelled"].any()


def test_each_label_issue_says_what_each_witness_gives_the_persons_label(digits):
    from defuse.label_issues import find_label_issues

    # As above: every training 1 contradicts region 1 (0 -> 1, labelled 0); the image judge is given for train
    # only, as the correct stage gives it (it learnt the audit labels), with a made-up probability per image.
    regions = Regions([_region(1)], {})
    judge = quadrant_validity()
    latents = {name: np.zeros((len(digits.split(name)), 2)) for name in ("train", "val", "audit")}
    latents["audit"][digits.split("audit").labels.numpy() != 0] = [-50.0, -50.0]
    n = len(digits.split("train"))
    scores = np.full((n, 10), 0.01)
    scores[:, 0] = np.linspace(0.05, 0.9, n)
    issues = find_label_issues(regions, {1: 0}, latents, judge, digits, relabel=True,
                               image_scores={"train": scores})
    train = issues[issues["split"] == "train"]
    assert len(train) > 0 and (train["person_label"] == 0).all()
    expected = judge.scores(latents["train"])[train["position"], 0].round(3)
    np.testing.assert_allclose(train["judge_validity"], expected)
    np.testing.assert_allclose(train["image_judge"], scores[train["position"], 0].round(3))
    audit = issues[issues["split"] == "audit"]
    assert len(audit) > 0 and audit["image_judge"].isna().all() and audit["judge_validity"].notna().all()


def test_a_pair_few_of_its_labels_contradict_is_a_boundary_whose_labels_stand(digits, monkeypatch):
    import defuse.label_issues.find as correct_module

    # Region 1 (0 -> 1, labelled 0): the judge reads latents at (0, 0) as 0. Two in five training 1s sit there, more
    # than MIN_BUG_IMAGES but (with the share raised to one half) too small a share of the 1s for a labelling bug.
    monkeypatch.setattr(correct_module, "LABEL_BUG_SHARE", 0.5)
    regions = Regions([_region(1)], {})
    latents = {name: np.tile([5.0, 0.0], (len(digits.split(name)), 1)) for name in ("train", "val", "audit")}
    ones = np.flatnonzero(digits.split("train").labels.numpy() == 1)
    contradicted_ones = ones[: 2 * len(ones) // 5]
    latents["train"][contradicted_ones] = 0.0
    latents["audit"][digits.split("audit").labels.numpy() == 0] = 0.0  # held-out 0s witness the person's label
    assert len(contradicted_ones) >= correct_module.MIN_BUG_IMAGES
    issues = correct_module.find_label_issues(regions, {1: 0}, latents, quadrant_validity(), digits, relabel=True)
    listed = issues[issues["split"] == "train"]
    assert sorted(listed["position"]) == sorted(contradicted_ones)  # listed for review ...
    assert not issues["label_bug"].any() and not issues["relabelled"].any()  # ... but no labelling bug
    real = RealImages.gather(digits, issues)
    assert len(real.clean_train) == len(digits.split("train")) and len(real.relabelled) == 0  # the labels stand
    # Three in five are a labelling bug: they are relabelled, and leave the clean loss.
    latents["train"][ones[: 3 * len(ones) // 5]] = 0.0
    issues = correct_module.find_label_issues(regions, {1: 0}, latents, quadrant_validity(), digits, relabel=True)
    assert issues["label_bug"].all() and issues["relabelled"].all()
    real = RealImages.gather(digits, issues)
    assert len(real.relabelled) == 3 * len(ones) // 5 == len(digits.split("train")) - len(real.clean_train)


def test_decoded_samples_give_way_where_relabelled_real_images_show_the_pair():
    from defuse.stages.correct.stage import (
        MIN_BUG_IMAGES,
        _without_pairs_shown_by_real_images,
    )

    regions = Regions([_region(1), replace(_region(2), source_label=2, pair="2 -> 1")], {})  # 0 -> 1 and 2 -> 1
    samples = sample_regions(regions, {1: 0, 2: 2}, LineGenerator(), per_region=5, tau=1.0,
                             rng=np.random.default_rng(0))
    issues = pd.DataFrame({"split": "train", "position": np.arange(MIN_BUG_IMAGES), "person_label": 0,
                           "given_label": 1, "region": 1, "relabelled": True})
    kept = _without_pairs_shown_by_real_images(samples, regions, {1: 0, 2: 2}, issues)
    assert kept.regions.tolist() == [2] * 5  # the 0 -> 1 pair has its real images; 2 -> 1 keeps its samples
    # Without consent nothing is relabelled: the decoded samples are all there is, and they stay.
    unconsented = _without_pairs_shown_by_real_images(samples, regions, {1: 0, 2: 2}, issues.assign(relabelled=False))
    assert len(unconsented.labels) == 10
    fewer = _without_pairs_shown_by_real_images(samples, regions, {1: 0, 2: 2}, issues.iloc[:MIN_BUG_IMAGES - 1])
    assert len(fewer.labels) == 10


def test_labels_the_judge_doubts_are_found_but_never_relabelled():
    from defuse.label_issues import doubted_labels

    regions = Regions([_region(1)], {})  # 0 -> 1
    judge = quadrant_validity()  # class 1 where z0 > 1, class 2 where z1 > 1, else class 0
    latents = np.array([[0.0, 3.0], [3.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    labels = np.array([1, 1, 1, 2])
    # Labelled 1 (the region's mistake): the judge reads image 0 as 2 and image 2 as 0 (both doubt the 1), image 1
    # as 1 (agrees); image 3 has another label.
    assert doubted_labels(regions, {1: 0}, latents, labels, judge).tolist() == [1, -1, 1, -1]
    assert (doubted_labels(regions, {1: 1}, latents, labels, judge) == -1).all()  # the person agrees: no doubt


def test_doubted_labels_leave_training_and_the_guard_but_are_never_relabelled(digits):
    doubted = pd.concat([_issues(digits, "train", 1, 7, True), _issues(digits, "val", 1, 7, True)])
    real = RealImages.gather(digits, doubted.assign(kind="doubted", relabelled=False))
    ones = {name: int((digits.split(name).labels == 1).sum()) for name in ("train", "val")}
    assert len(real.clean_train) == len(digits.split("train")) - ones["train"] and len(real.relabelled) == 0
    assert len(real.guard) == len(digits.split("val")) + len(digits.split("audit")) - ones["val"]


def test_with_every_pair_shown_by_real_images_only_the_corrected_labels_train(tmp_path, digits, trained):
    # Every 1 is called 7 by the person and relabelled: no region needs decoded samples, so lambda changes
    # nothing and only lambda 0 trains; the held-out relabelled 1s are the bug images it is chosen on.
    issues = pd.concat([_issues(digits, name, 1, 7, True) for name in ("train", "val", "audit")])
    real = RealImages.gather(digits, issues.assign(kind="contradicted"), {(7, 1)}, trained)
    shape = tuple(real.guard.images.shape[1:])
    empty = RegionSamples(torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    config = CorrectConfig(lambdas=[0.0, 1.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0)
    _, summary = correct(trained, digits, real, empty, empty, config, tmp_path)
    assert [(c["layers"], c["lambda"]) for c in summary["candidates"]] == [("all", 0.0), ("head", 0.0)]
    assert not (tmp_path / "lambda_1").exists()
    assert summary["chosen_on"] == "real held-out bug images" and summary["real_bug_images"] >= 10
    assert summary["real_bug_accuracy_after"] > summary["real_bug_accuracy_before"] + 0.5


def test_a_head_only_candidate_moves_the_head_and_leaves_the_features_as_they_were(tmp_path, digits, trained):
    # The same relabelled 1s as above, with only the head family: the features stay bit-identical, the head
    # learns the person's label on the held-out bug images.
    issues = pd.concat([_issues(digits, name, 1, 7, True) for name in ("train", "val", "audit")])
    real = RealImages.gather(digits, issues.assign(kind="contradicted"), {(7, 1)}, trained)
    shape = tuple(real.guard.images.shape[1:])
    empty = RegionSamples(torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    config = CorrectConfig(epochs=1, head_lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0, layers=["head"])
    repaired, summary = correct(trained, digits, real, empty, empty, config, tmp_path)
    assert summary["chosen"] == {"layers": "head", "lambda": 0.0, "epoch": 0}
    assert (tmp_path / "head_lambda_0" / "epoch0.ckpt").exists() and not (tmp_path / "lambda_0").exists()
    before, after = trained.state_dict(), repaired.state_dict()
    features = [k for k in before if ".features." in k]
    assert features and all(torch.equal(before[k], after[k]) for k in features)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".head." in k)
    assert summary["real_bug_accuracy_after"] > summary["real_bug_accuracy_before"] + 0.5


def test_correct_layers_refuses_an_unknown_family():
    with pytest.raises(ValueError, match=re.escape("`correct.layers` must be a non-empty list")):
        CorrectConfig(layers=["encoder"]).validate()


def test_ties_on_the_bug_images_go_to_the_surer_reading_then_the_real_guard_change_not_to_decoded_accuracy():
    def candidate(layers, lam, epoch, bug, guard, decoded, admissible=True, confidence=None):
        return {"layers": layers, "lambda": lam, "epoch": epoch, "bug_accuracy": bug, "guard_change": guard,
                "decoded_accuracy": decoded, "admissible": admissible, "bug_confidence": confidence}

    table = [candidate("all", 1.0, 4, 0.93, -0.002, 1.0), candidate("head", 0.0, 1, 0.93, 0.001, 0.58),
             candidate("all", 0.0, 2, 0.90, 0.004, 0.60), candidate("all", 1.0, 3, 0.97, 0.0, 1.0, admissible=False)]
    assert choose_candidate(table, "bug_accuracy")["layers"] == "head"  # tie at 0.93: the guard decides
    assert choose_candidate(table, "decoded_accuracy")["epoch"] == 4  # no real bug images: decoded decides
    assert choose_candidate([t | {"admissible": False} for t in table], "bug_accuracy") is None
    # The same tie, read more surely by the worse guard change: the sureness decides; accuracy still comes first.
    sure = [table[0] | {"bug_confidence": 0.91}, table[1] | {"bug_confidence": 0.87}, table[2] | {"bug_confidence": 0.99}]
    assert choose_candidate(sure, "bug_accuracy")["epoch"] == 4
    # Decoded samples decide (too few bug images): the bug images' sureness plays no part.
    assert choose_candidate([t | {"decoded_accuracy": 0.6} for t in sure[:2]], "decoded_accuracy")["layers"] == "head"


def test_bug_confidence_is_each_checkpoints_mean_probability_of_the_bug_labels(tmp_path):
    from defuse.stages.correct.candidates import bug_confidence

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    images = torch.rand(6, 1, 2, 2)
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    candidates = []
    for epoch, bias in enumerate([(0.0, 0.0), (0.0, 3.0)]):  # the second leans towards class 1
        weights = {"1.weight": torch.zeros(2, 4), "1.bias": torch.tensor(bias)}
        path = tmp_path / f"epoch{epoch}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}}, path)
        candidates.append({"path": str(path)})
    uniform, leaning = bug_confidence(model, candidates, images, labels)
    assert uniform == pytest.approx(0.5)
    p1 = float(torch.sigmoid(torch.tensor(3.0)))
    assert leaning == pytest.approx((4 * p1 + 2 * (1 - p1)) / 6)
    assert bug_confidence(model, candidates, images[:0], labels[:0]) == [None, None]


def test_decoded_samples_must_read_the_real_bug_images_better_than_real_images_alone_beyond_chance():
    from defuse.stages.correct.candidates import _unless_decoded_samples_help

    labels = np.zeros(50, dtype=np.int64)

    def candidate(lam, hits, admissible=True):
        predicted = np.where(np.arange(50) < hits, 0, 1)
        row = {"layers": "all", "lambda": lam, "epoch": 0, "path": f"lambda_{lam}_{hits}", "bug_accuracy": hits / 50,
               "guard_change": 0.0, "decoded_accuracy": None, "admissible": admissible}
        return row, {"bugs": predicted}

    def choose(*specs):
        rows, candidates = zip(*(candidate(*spec) for spec in specs))
        chosen = choose_candidate(list(rows), "bug_accuracy")
        return _unless_decoded_samples_help(chosen, list(rows), list(candidates), labels, np.random.default_rng(0))

    # One bug image more with decoded samples (46 of 50 against 45): chance, so the real-images-only candidate.
    chosen, gain = choose((1.0, 46), (0.0, 45))
    assert chosen["lambda"] == 0.0 and gain["kept"] is False and gain["bug_accuracy_change"] == pytest.approx(0.02)
    assert gain["ci95"][0] <= 0 < gain["ci95"][1]
    # Ten more: beyond chance, the decoded samples stay.
    chosen, gain = choose((1.0, 45), (0.0, 35))
    assert chosen["lambda"] == 1.0 and gain["kept"] is True and gain["ci95"][0] > 0
    # No admissible lambda-0 candidate to fall back on: the choice stands.
    chosen, gain = choose((1.0, 46), (0.0, 45, False))
    assert chosen["lambda"] == 1.0 and gain == {"against": None, "kept": True}


def test_a_reviewed_label_decides_its_image_relabelled_or_standing_whatever_the_rules_say(digits):
    from defuse.label_issues import find_label_issues

    # Region 1 (0 -> 1, labelled 0): every training 1 at (0, 0) is contradicted (a labelling bug), without consent.
    regions = Regions([_region(1)], {})
    latents = {name: np.tile([5.0, 0.0], (len(digits.split(name)), 1)) for name in ("train", "val", "audit")}
    train = digits.split("train").labels.numpy()
    ones, threes = np.flatnonzero(train == 1), np.flatnonzero(train == 3)
    latents["train"][ones] = 0.0
    latents["audit"][digits.split("audit").labels.numpy() == 0] = 0.0
    source = digits.indices("train").numpy()
    val_one = int(np.flatnonzero(digits.split("val").labels.numpy() == 1)[0])
    reviewed = {int(source[ones[0]]): 0,  # the person confirms the region's label: relabelled, consent or not
                int(source[ones[1]]): 1,  # ... says it is a 1 after all: the label stands
                int(source[ones[2]]): 4,  # ... neither: trained as what the person says
                int(source[threes[0]]): 8,  # an image no rule listed
                int(digits.indices("val").numpy()[val_one]): 0}
    issues = find_label_issues(regions, {1: 0}, latents, quadrant_validity(), digits, relabel=False,
                               reviewed=reviewed)
    by_image = issues.set_index("image")
    assert by_image.loc[list(reviewed), "reviewed"].all() and by_image["reviewed"].sum() == len(reviewed)
    assert by_image.loc[list(reviewed), "person_label"].tolist() == list(reviewed.values())
    assert by_image.loc[list(reviewed), "relabelled"].tolist() == [True, False, True, True, True]
    assert by_image.loc[int(source[threes[0]]), "kind"] == "reviewed"
    assert not issues[~issues["reviewed"]]["relabelled"].any()  # the rest wait for consent, as before
    real = RealImages.gather(digits, issues)
    assert sorted(real.relabelled.labels.tolist()) == [0, 4, 8]
    # Left out: the unreviewed 1s and the three relabelled training images; the 1 the person confirmed trains as 1.
    assert len(real.clean_train) == len(train) - (len(ones) - 1) - 1
    assert int((real.clean_train.labels == 1).sum()) == 1
    # The reviewed held-out 1 is graded as a 0, the other held-out images of the bug are left out as before.
    assert int((real.guard.labels == 0).sum() + (real.bugs.labels == 0).sum()) == 1 + sum(
        int((digits.split(s).labels == 0).sum()) for s in ("val", "audit"))


def test_a_review_file_takes_class_names_or_indices_and_names_the_line_and_value_it_cannot_use(digits, tmp_path):
    from defuse.label_issues import read_reviewed_labels

    train, test = digits.indices("train").tolist(), digits.indices("test").tolist()
    path = tmp_path / "review.csv"
    path.write_text(f"image,label\n{train[0]},3\n{train[1]},skip\n{train[2]},\n{train[3]},7\n{train[0]},5\n")
    assert read_reviewed_labels(path, digits) == {train[0]: 5, train[3]: 7}  # a later answer replaces an earlier one
    path.write_text(f"image,label\n{train[0]},3\n{train[1]},seven\n")
    with pytest.raises(ValueError, match=r"review.csv, line 3: label 'seven' is not a class"):
        read_reviewed_labels(path, digits)
    path.write_text(f"image,label\n{test[0]},3\n")
    with pytest.raises(ValueError, match=rf"line 2: image {test[0]} is not in the train, val or audit split"):
        read_reviewed_labels(path, digits)
    path.write_text(f"image,answer\n{train[0]},3\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) label \(found: image, answer\)"):
        read_reviewed_labels(path, digits)
    with pytest.raises(FileNotFoundError, match="defuse review"):
        read_reviewed_labels(tmp_path / "absent.csv", digits)


def test_the_fine_tunes_cache_key_follows_what_the_data_file_holds_not_where_it_lies(tmp_path):
    """Checkpoints of a fine-tune on other data must never be resumed: the key sees an in-place edit of the npz,
    and the same bytes moved elsewhere keep it (a kept run replayed from a copied folder reuses its epochs)."""
    first, moved = tmp_path / "a.npz", tmp_path / "elsewhere" / "a.npz"
    moved.parent.mkdir()
    np.savez(first, x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4) % 2)
    moved.write_bytes(first.read_bytes())
    key = section_by_content(DataConfig(source="npz", root=str(first)))
    assert section_by_content(DataConfig(source="npz", root=str(moved))) == key
    assert key["root"] != str(first) and len(key["root"]) == 64  # a sha256, not the path

    model = torch.nn.Linear(2, 2)

    def inputs_key(root) -> str:  # the key the stage writes to correct/KEY, for data at ``root``
        data = SimpleNamespace(config=DataConfig(source="npz", root=str(root)))
        return _inputs_key(model, {1: 0}, Regions([_region(1)], {}), quadrant_validity(), data,
                           CorrectConfig(), 0.25, 0, None, "trained-on")

    stage_key = inputs_key(first)
    assert inputs_key(moved) == stage_key
    np.savez(first, x=np.ones((4, 8, 8), np.uint8), y=np.arange(4) % 2)
    assert section_by_content(DataConfig(source="npz", root=str(first))) != key
    assert inputs_key(first) != stage_key
    assert section_by_content(DataConfig()) == asdict(DataConfig())  # no file named: the section as it is


def test_settings_that_only_choose_among_candidates_keep_the_fine_tunes_checkpoints():
    """How candidates are chosen, and which families are candidates (each trains in its own folder from the same
    seed), leave the checkpoints standing; what the fine-tune trains with does not."""
    model = torch.nn.Linear(2, 2)
    data = SimpleNamespace(config=DataConfig())

    def key(**changed) -> str:
        return _inputs_key(model, {1: 0}, Regions([_region(1)], {}), quadrant_validity(), data,
                           CorrectConfig(**changed), 0.25, 0, None, "trained-on")

    shipped = key()
    for choice in ({"layers": ["all"]}, {"lambdas": [0.0]}, {"max_clean_drop": 0.01},
                   {"max_class_drop": 0.05}, {"reviewed_labels": "answers.csv"}):
        assert key(**choice) == shipped, choice
    for training in ({"lr": 1e-3}, {"epochs": 3}, {"head_lr": 1e-3}, {"relabelled_repeats": 3}, {"keep": 0.5}):
        assert key(**training) != shipped, training


def test_answers_on_held_out_images_re_grade_the_same_checkpoints_and_answers_on_training_images_retrain(digits):
    issues = pd.DataFrame({"split": ["train", "val"], "position": [0, 0], "person_label": [7, 7],
                           "given_label": [1, 1], "relabelled": [True, True]})
    real = RealImages.gather(digits)
    key = _trained_on(issues, real, CorrectConfig())
    held_out_answer = pd.concat([issues, issues.assign(split="audit", position=3)], ignore_index=True)
    assert _trained_on(held_out_answer, real, CorrectConfig()) == key
    train_answer = pd.concat([issues, issues.assign(position=3)], ignore_index=True)
    assert _trained_on(train_answer, real, CorrectConfig()) != key
    # With drift augmentation the guard shapes the drift box, so it is part of what the fine-tune reads.
    assert _trained_on(issues, real, CorrectConfig(drift_augment=True)) != key


def test_the_persons_answer_makes_the_other_class_of_its_pair_suspect_within_the_regions_reach():
    from types import SimpleNamespace

    region = replace(_region(1), mean=[0.0, 0.0], source_radius=2.0)  # 0 -> 1, reach 2 (unit scale)
    regions = Regions([region], {})
    judge = SimpleNamespace(scale=np.ones(2))  # only its standardisation is read: no judge's reading counts
    latents = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0], [0.0, 1.5], [0.5, 0.5]])
    labels = np.array([1, 0, 1, 2, 1])
    # Answered 0 (the source class: the model is wrong here): the images labelled 1 within reach are suspect.
    region_of, person_of = neighbourhood_labels(regions, {1: 0}, latents, labels, judge)
    assert region_of.tolist() == [1, -1, -1, -1, 1] and person_of.tolist() == [0, -1, -1, -1, 0]
    # Answered 1 (the model's own reading: its labels are the suspects): the images labelled 0 within reach.
    region_of, person_of = neighbourhood_labels(regions, {1: 1}, latents, labels, judge)
    assert region_of.tolist() == [-1, 1, -1, -1, -1] and person_of.tolist() == [-1, 1, -1, -1, -1]
    # Answered 2 (neither): both classes of the pair are suspect, never a third class's images.
    assert neighbourhood_labels(regions, {1: 2}, latents, labels, judge)[0].tolist() == [1, 1, -1, -1, 1]
    # Unanswered, or a region without a reach (an older regions.json): nothing.
    assert (neighbourhood_labels(regions, {}, latents, labels, judge)[0] == -1).all()
    unreached = Regions([replace(region, source_radius=0.0)], {})
    assert (neighbourhood_labels(unreached, {1: 0}, latents, labels, judge)[0] == -1).all()


def test_images_within_a_labelled_regions_reach_are_listed_for_review_and_relabelled_only_on_its_answers(digits):
    from types import SimpleNamespace

    from defuse.label_issues import NEIGHBOUR, find_label_issues

    classes = digits.num_classes
    latents = {name: np.zeros((len(digits.split(name)), 2)) for name in ("train", "val", "audit")}
    region = replace(_region(1), source_label=3, predicted_label=5, pair="3 -> 5", mean=[0.0, 0.0],
                     source_radius=1.0)
    judge = SimpleNamespace(scale=np.ones(2),
                            scores=lambda z: np.full((len(z), classes), 1.0 / classes),
                            predict_proba=lambda z: np.tile(np.eye(classes)[3], (len(z), 1)))
    # The judge reads everything as 3, so no "doubted" or "contradicted" row competes; answered 5 (the model's
    # reading): every image labelled 3 lies within reach and is a suspect.
    table = find_label_issues(Regions([region], {}), {1: 5}, latents, judge, digits, relabel=True)
    threes = sum(int((digits.split(n).labels == 3).sum()) for n in ("train", "val", "audit"))
    mine = table[table["kind"] == NEIGHBOUR]
    assert len(mine) == threes and (mine["given_label"] == 3).all() and (mine["person_label"] == 5).all()
    assert not mine["relabelled"].any() and not mine["label_bug"].any()  # consent alone relabels none of them
    first = int(mine.iloc[0]["image"])
    reviewed = find_label_issues(Regions([region], {}), {1: 5}, latents, judge, digits, relabel=True,
                                 reviewed={first: 5})
    row = reviewed[reviewed["image"] == first].iloc[0]
    assert row["reviewed"] and row["relabelled"] and row["person_label"] == 5
    assert reviewed["relabelled"].sum() == 1  # the person's answer, image by image, is what relabels


def test_review_asks_about_every_listed_image_of_a_labelled_region_not_only_a_declared_labelling_bugs(monkeypatch):
    import defuse.label_issues.review as review

    # Where every split carries the bug, the judges declare no pair a labelling bug (label_bug false): its
    # contradicted and doubted images would keep the mistaken label in the clean loss unless a person is asked.
    table = pd.DataFrame({"split": ["train", "audit", "train", "val", "train"], "position": [4, 0, 2, 1, 9],
                          "image": [14, 30, 12, 21, 19], "kind": ["doubted", "contradicted", "neighbour", "doubted",
                                                                 "reviewed"],
                          "region": [2, 1, 1, 1, 1], "label_bug": False,
                          "reviewed": [False, False, False, False, True]})
    monkeypatch.setattr(review, "encode_splits", lambda generator, data: {})
    monkeypatch.setattr(review, "find_label_issues", lambda *args, **kwargs: table)
    todo = review.issues_for_review(Regions([], {}), {}, None, None, None)
    # All four unanswered rows, by region, then split (train, val, audit) and position; the answered one is not.
    assert todo["image"].tolist() == [12, 21, 30, 14]


def test_review_shows_a_regions_hardest_learnt_training_images_first(monkeypatch):
    from defuse.label_issues import review

    table = pd.DataFrame({"split": ["train", "train", "train", "val"], "position": [0, 1, 2, 0],
                          "image": [10, 11, 12, 20], "kind": "neighbour", "region": 1, "label_bug": False,
                          "reviewed": False})

    class Data:  # three training images
        def split(self, name):
            return [0, 1, 2]

    monkeypatch.setattr(review, "encode_splits", lambda generator, data: {})
    monkeypatch.setattr(review, "find_label_issues", lambda *args, **kwargs: table)
    aum = np.array([6.0, -1.0, 2.5])  # image 11 never learnt its label, 12 late, 10 at once
    todo = review.issues_for_review(Regions([], {}), {}, None, None, Data(), training_aum=aum)
    assert todo["image"].tolist() == [11, 12, 10, 20]  # training images hardest first; val after train, as before
    # Margins of another split's size (a stale file) order nothing.
    assert review.issues_for_review(Regions([], {}), {}, None, None, Data(),
                                    training_aum=aum[:2])["image"].tolist() == [10, 11, 12, 20]


def test_relabelled_images_add_their_pair_to_what_the_repair_fixes():
    regions = Regions([_region(1), replace(_region(2), source_label=6, predicted_label=1, pair="6 -> 1")], {})
    # Region 1 (0 -> 1) answered 0: a bug; region 2 (6 -> 1) answered 1, the model's reading: no pair of its own.
    assert repaired_pairs(regions, {1: 0, 2: 1}) == {(0, 1)}
    issues = pd.DataFrame({"person_label": [6, 6, 3], "given_label": [1, 1, 3], "relabelled": [True, True, True]})
    assert repaired_pairs(regions, {1: 0, 2: 1}, issues) == {(0, 1), (6, 1)}  # a label kept on review adds none
    listed_only = issues.assign(relabelled=False)
    assert repaired_pairs(regions, {2: 1}, listed_only) == set()
