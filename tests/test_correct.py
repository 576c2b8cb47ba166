import copy
import json
import re

import numpy as np
import pytest
import torch

from defuse.config import CorrectConfig, DataConfig
from defuse.correct import RegionSamples, contradicting_labels, correct, sample_regions
from defuse.data import ImageDataModule
from defuse.distill import Region, Regions
from defuse.models import build_classifier
from stubs import LineGenerator, quadrant_validity


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


def test_correct_raises_region_accuracy_and_resumes(tmp_path, digits):
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    regions = _regions_of_ones_called_seven(digits, 60)
    config = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0)
    repaired, summary = correct(classifier, digits, regions, regions, config, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())  # the original is untouched
    assert summary["chosen"] == {"lambda": 2.0, "epoch": 0}
    assert summary["val_region_accuracy_after"] > summary["val_region_accuracy_before"]
    first = json.loads((tmp_path / "lambda_2" / "epochs.json").read_text())
    assert len(first) == 1 and (tmp_path / "lambda_2" / "last.ckpt").exists()

    # A second call with more epochs resumes from last.ckpt: epoch 0 is not trained again.
    longer = CorrectConfig(lambdas=[2.0], epochs=2, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0)
    _, again = correct(classifier, digits, regions, regions, longer, tmp_path)
    second = json.loads((tmp_path / "lambda_2" / "epochs.json").read_text())
    assert [r["epoch"] for r in second] == [0, 1] and second[0] == first[0]
    assert len(again["candidates"]) == 2


def test_clean_accuracy_bound_keeps_the_original_when_nothing_qualifies(tmp_path, digits):
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    regions = _regions_of_ones_called_seven(digits, 30)
    config = CorrectConfig(lambdas=[1.0], epochs=1, lr=3e-3, max_clean_drop=0.0)
    # an untrained classifier gains clean accuracy when fine-tuned, so force the bound with a tiny lr
    tiny = CorrectConfig(lambdas=[1.0], epochs=1, lr=1e-9, max_clean_drop=0.0)
    repaired, summary = correct(classifier, digits, regions, regions, tiny, tmp_path)
    assert summary["chosen"] is None and "no candidate" in summary["reason"]
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(repaired.eval()(x), classifier.eval()(x))
    del config


def test_a_repair_that_gives_up_part_of_a_class_is_refused(tmp_path, digits):
    from defuse.config import ClassifierConfig, TrainerConfig
    from defuse.fit import train_classifier

    classifier, _ = train_classifier(digits, ClassifierConfig(width=8, epochs=3), TrainerConfig(progress_bar=False),
                                     root=str(tmp_path / "fit"))
    regions = _regions_of_ones_called_seven(digits, 60)  # teaching real 1s as 7 costs the 1s
    loose = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0)
    _, chosen = correct(classifier, digits, regions, regions, loose, tmp_path / "a")
    guarded = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=0.05)
    _, refused = correct(classifier, digits, regions, regions, guarded, tmp_path / "b")
    ones = chosen["val_per_class_before"][1] - chosen["candidates"][0]["per_class"][1]
    assert chosen["chosen"] is not None and ones > 0.05
    assert chosen["candidates"][0]["largest_class_drop"] >= ones
    assert refused["chosen"] is None and "no candidate" in refused["reason"]


def test_training_images_whose_labels_contradict_the_person_leave_the_clean_loss(tmp_path, digits):
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    regions = _regions_of_ones_called_seven(digits, 30)
    train = digits.split("train")
    exclude = (train.labels == 1).numpy()  # the clean loss no longer says "these are 1s"
    config = CorrectConfig(lambdas=[2.0], epochs=1, lr=3e-3, max_clean_drop=1.0, max_class_drop=1.0)
    _, kept = correct(classifier, digits, regions, regions, config, tmp_path / "a")
    _, dropped = correct(classifier, digits, regions, regions, config, tmp_path / "b", train_exclude=exclude)
    assert kept["train_excluded_contradicting"] == 0
    assert dropped["train_excluded_contradicting"] == int(exclude.sum()) > 0
    # without real 1s pulling back, the 1s-called-7 are learned at least as well
    assert dropped["candidates"][0]["region"] >= kept["candidates"][0]["region"]


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
    regions = Regions([_region(1), _region(2)], {})  # both 0 -> 1
    judge = quadrant_validity()  # class 1 where z0 > 1, class 2 where z1 > 1, else class 0
    latents = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    labels = np.array([1, 0, 1, 2])
    # Region 1 labelled 0: image 0 is labelled 1 (the region's mistake) and the judge reads it as 0, the person's
    # class; image 1 is labelled 0 already; image 2 is labelled 1 and the judge agrees it is a 1; image 3 is another
    # class altogether.
    assert contradicting_labels(regions, {1: 0}, latents, labels, judge).tolist() == [True, False, False, False]
    # A region labelled with its own predicted class (the person agrees with the model): nothing contradicts.
    assert not contradicting_labels(regions, {1: 1}, latents, labels, judge).any()
    assert not contradicting_labels(regions, {}, latents, labels, judge).any()


def test_excluded_validation_images_leave_the_clean_check(tmp_path, digits):
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.3], [0.4], width=8)
    regions = _regions_of_ones_called_seven(digits, 30)
    val = digits.split("val")
    exclude = np.zeros(len(val), dtype=bool)
    exclude[: len(val) // 2] = True
    config = CorrectConfig(lambdas=[1.0], epochs=1, lr=1e-9, max_clean_drop=0.0)
    _, summary = correct(classifier, digits, regions, regions, config, tmp_path, val_exclude=exclude)
    kept = val.float_images()[~torch.from_numpy(exclude)]
    expected = float((classifier.eval()(kept).argmax(1) == val.labels[~torch.from_numpy(exclude)]).float().mean())
    assert summary["val_excluded_contradicting"] == len(val) // 2
    assert summary["val_clean_accuracy_before"] == pytest.approx(expected, abs=1e-4)


def test_the_keep_term_holds_the_model_to_the_original_and_stays_out_of_checkpoints():
    from defuse.correct import CorrectionModule

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
