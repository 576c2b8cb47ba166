"""Correction: fine-tune the classifier on corrected labels and the labelled regions, keeping clean accuracy on
images it never saw.

Loss: ``CE(training set, labels as corrected) + lambda * CE(region batch, person's label)
+ keep * KL(original || fine-tuned)``, starting from the classifier's own weights. The training set is the
training split less its label issues, plus, when the person consents (``correct.relabel``), the training images
whose labels the person's answers contradict, under the person's label (``relabelled_repeats`` times each). The
region batch holds fresh decoded samples of the labelled regions whose bug no real image shows (those the
validity judge gives the person's label at least ``min_validity``); lambda = 0 trains without them. The KL term
holds the original model's answers only on images whose label it already gives, so it never pulls a corrected
image back.

Why real images: a fine-tune on decoded samples alone learns the generator's smooth rendering of a bug, not the
bug (measured on the planted benchmark: 99.8% on decoded validation samples, 0.61 on the real subgroup). And a
region batch in every step (decoded samples with the relabelled real images, repeated) moves real neighbours
across (measured on the planted benchmark, seed 1: held-out 2s and 9s read as 7 after the slant repair,
held-out accuracy -0.4 to -1.1 points). The corrected labels in the training set, the relabelled images twice,
fixed the same bugs at -0.18 to 0.0 points of held-out accuracy.

*Label issues.* An image whose given label is a labelled region's mistake (1, in a "7 -> 1" region the person
called 7) and which the independent validity judge (fitted on the audit split, never on the classifier) reads as
the person's class is contradicted by both, when most of its nearest held-out (audit) images carry the person's
label too (the judge is one linear model, and near a boundary it is sure of some real images of the mistaken
class); or which the *image judge* (a classifier fitted on the audit images alone, ``correct.image_judge_epochs``)
gives the person's class with probability at least ``IMAGE_JUDGE_SURE``: the latent judge sees the generator's
rendering, in which a bug's extreme (the shortest 2s labelled 7) sits among the mistaken class, and the image
judge sees the digit. Every such image of train, val and audit is listed (label_issues.csv, with the nearest such region). A
pair is a *labelling bug* when at least ``MIN_BUG_IMAGES`` training images, and at least ``LABEL_BUG_SHARE`` of
those with the given label, contradict it; fewer are boundary cases the judge is
unsure of, whose labels stand (listed, nothing else). Images of a labelling bug leave every loss and every check
without consent; with it they are trained (train) or graded (val, audit) under the person's label.

*The person's answer reaches real images.* Where every split carries a labelling bug, the judges fitted on the
audit labels agree with the bug and contradict nothing. A region the person answered with a class c reaches the
real images within its ``source_radius`` (:func:`neighbourhood_labels`); those labelled with the other class of its
pair (the mistake when c is the source class; the source class when c is the model's own reading) are listed as
kind "neighbour" for ``defuse review``, and each is relabelled (or kept) only by a person's answer on it: geometry
alone flags genuine labels too (measured with every split but test poisoned, seed 0: 83 within reach of the top
slant region, 67 poisoned; 631 of the top thin region, 95 poisoned).

*Choice and guard.* Every (layers, lambda, epoch) is a candidate: ``correct.layers`` "all" fine-tunes every layer
for each lambda, "head" only the classifier head on frozen features, on the corrected labels alone (lambda 0, at
``head_lr``), which moves fewer unrelated decisions. Held-out real images (val and audit) play two roles:
the *bug images* (labelled with a class a person gave a region, read by the original model as that region's
mistake) measure the repair; every other held-out image is the *guard*. A candidate is admissible only if the
lower end of the paired bootstrap 95% interval of its guard accuracy change is at least ``-max_clean_drop``, and
no class of the guard loses more than ``max_class_drop``. The admissible candidate with the best accuracy on the
bug images (decoded validation samples when there are fewer than ``MIN_BUG_IMAGES``; ties go to the surer reading
of the bug images, then to the better guard change) wins, if it beats the original; otherwise the original weights
stay and the summary says why. A winner trained with decoded samples must beat the best candidate trained on real
images alone beyond chance (:func:`_unless_decoded_samples_help`).

*What the repair moves, the person settles.* Where every split carries a labelling bug, the bug's images that no
rule reached keep the mistaken label: in the guard, a candidate that fixes them loses them; in the clean loss, they
go on teaching the bug. Every candidate is read on every held-out and clean training image, and those labelled
with a repaired pair's mistake that a candidate moves to the person's label are listed (kind "moved",
:func:`moved_to_person`) for ``defuse review``; each answer relabels its image or confirms its label. Answers on
held-out images re-grade the same checkpoints (the key holds only what the fine-tune trains on); answers on
training images retrain. No model fitted on the same labels decides them.

*Weight averaging.* Each epoch's candidate is the running mean of the weights at the end of every epoch so far
(``correct.average``, stochastic weight averaging), not the last step's weights: one epoch's last steps move
unrelated test decisions by a few images a class, and the mean moves fewer (measured on the kept planted runs:
largest class drop on test 2.90 -> 0.52 points for slant seed 0; runs meeting every repair bar 9 -> 12 of 15).

*Scope.* The repaired model moves answers only to the classes a person gave the labelled regions
(``correct.scoped``, :class:`~defuse.models.classifiers.ScopedRepair`): where the fine-tune answers such a class and
the original another, the fine-tune's answer; everywhere else the original's. Candidates are judged (guard, bug
images) as they will answer. A fine-tune also moves a few answers a class that nobody asked about (on the planted
benchmark: 9 -> 4, 5 -> 3, 1 -> 7), the guard cannot tell them from noise on a few thousand images, and they cost
test accuracy no held-out figure predicted. Measured on the planted benchmark (three seeds, graded on test):
largest class drop outside the subgroup at most 1.40 points (short's 7s, the bug's own pair) where it reached
1.45, at most 1.05 in every other case; with a person's review, short seed 0 is no longer refused (0.977 on the
real subgroup).

Every (layers, lambda, epoch) is a Lightning checkpoint under ``correct/``; an interrupted fine-tune resumes from the last
one (loaded weights-only), and finished lambdas are not trained again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from defuse.artifacts import CORRECT_DIR, LABEL_ISSUES, LABEL_REVIEW, REPAIRED_CKPT  # noqa: F401  (re-exported)
from defuse.config import CorrectConfig, TrainerConfig, outcome_fields, path_fields
from defuse.data import ImageDataModule, ImageSet
from defuse.distill import Regions
from defuse.fit import make_trainer
from defuse.identify import latent_means
from defuse.label import parse_label
from defuse.models.classifiers import ScopedRepair, classifier_head, scoped_changes
from defuse.models.inference import predict_labels, predict_logits
from defuse.models.loading import LoadedClassifier, save_classifier
from defuse.rundir import atomic_write_json, defuse_version, fingerprint, path_digest
from defuse.seeding import int_seed, numpy_rng, torch_generator
from defuse.validity import ValidityModel


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionSamples:
    """Decoded fresh samples of labelled regions: images (N, C, H, W) in [0,1], labels (N,), region ids (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    regions: torch.Tensor


@torch.no_grad()
def sample_regions(regions: Regions, bug_labels: dict[int, int], generator: nn.Module, per_region: int,
                   tau: float, rng: np.random.Generator, validity: ValidityModel | None = None,
                   min_validity: float = 0.0) -> RegionSamples:
    """Fresh decoded samples of every region in ``bug_labels`` (region id -> class): ``per_region`` are drawn.

    With ``validity`` and ``min_validity`` > 0, only the samples the validity judge gives the person's class at
    least ``min_validity`` are kept: a region's Gaussian also reaches hybrids that neither the person's label nor
    the judge would call that class, and teaching those as the class reshuffles unrelated decisions (measured
    on the slant benchmark: the largest per-class test drop fell from 2.1 to 1.0 points). May return no samples.
    """
    latents, labels, ids = [], [], []
    for region in regions.regions:
        if region.id in bug_labels:
            z = region.sample(per_region, tau, rng)
            label = bug_labels[region.id]
            if validity is not None and min_validity > 0:
                z = z[validity.validity(z, np.full(len(z), label)) >= min_validity]
            latents.append(z)
            labels += [label] * len(z)
            ids += [region.id] * len(z)
    if not latents:
        raise ValueError("No region is labelled with a class: nothing to correct. Label regions first "
                         "(`defuse label`); 'not-a-bug' and skipped regions are left out.")
    z = torch.from_numpy(np.concatenate(latents))
    generator = generator.eval()
    images = torch.cat([generator.decode(z[i : i + 2048]) for i in range(0, max(len(z), 1), 2048)])
    return RegionSamples(images.clamp(0, 1), torch.tensor(labels), torch.tensor(ids))


MIN_BUG_IMAGES = 10  # real held-out bug images needed to choose on them rather than on decoded samples
# Share of a label's training images that must contradict it (person and judge) for the pair to be a labelling
# bug. Measured on the planted benchmark (five planted pairs, seeds 0 and 1): the planted pairs had 93-130
# contradicted training images (13-20% of the label's images), every other pair the reference labelled 1-16 (at
# most 3%). Those others are the judge's doubts on a natural boundary; treated as label issues, 92 real training
# 8s doubted for a "9 -> 8" region left the clean loss and 16 became 9s, and the fine-tune lost held-out 8s to 9
# beyond the guard's class bound (thin, seed 1: every candidate refused).
LABEL_BUG_SHARE = 0.05
BOOTSTRAP_RESAMPLES = 2000
LABEL_ISSUE_COLUMNS = ("split", "position", "image", "kind", "given_label", "given_class", "region", "person_label",
                       "person_class", "label_bug", "relabelled", "reviewed", "judge_validity", "image_judge")
CONTRADICTED, DOUBTED, REVIEWED, NEIGHBOUR, MOVED = "contradicted", "doubted", "reviewed", "neighbour", "moved"
# The splits whose labels a person may review: never test, which only grades.
REVIEWABLE_SPLITS = ("train", "val", "audit")


# Audit images whose labels vote on a contradicted image's class (its nearest neighbours in the generator's latent
# space), and the share of them that must carry the person's label.
NEIGHBOURS = 10
NEIGHBOUR_SHARE = 0.5
# The image judge's probability of the person's class that contradicts a train or val label (see
# :func:`image_judge_scores`, :func:`contradicting_labels`). Measured on the kept planted runs (five cases, seeds
# 0-2; 1,600 audit images, 20 epochs), as the witness beside the latent rule: the rules relabelled 132 to 162 of
# a bug's 148 to 172 mislabelled training and validation images (the latent rule alone: about two thirds), the
# shortest 2s labelled 7 among them. 0.99 (short, seed 1) relabelled fewer right labels (crossed 7s) but left the
# subgroup at 0.85 (0.91). As the only witness there (seven cases, seeds 0-2): 131 to 171 relabelled, 0 to 3 of
# them right labels (0 to 11 beside the latent rule).
IMAGE_JUDGE_SURE = 0.9


def contradicting_labels(regions: Regions, bug_labels: dict[int, int], latents: np.ndarray, labels: np.ndarray,
                         validity: ValidityModel, min_validity: float = 0.5,
                         neighbours: tuple[np.ndarray, np.ndarray] | None = None, exclude_self: bool = False,
                         image_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each image: the id of the nearest region whose person's label its own label contradicts (-1: none), and
    that person's label (-1: none).

    Contradicted: the image's label is the mistake of a region the person labelled with another class, and the
    validity judge (fitted on held-out labels, independent of the classifier) gives the image that class with
    validity at least ``min_validity`` (a sure call: measured on the slant benchmark, 0.5 keeps 105 of 117
    mislabelled training images found and 8 of 17 false alarms). The
    person and an independent judge both say the label is wrong; region geometry alone cannot tell (refined regions
    are tight, and real images of the mistaken class sit as far from them as the mislabelled ones), so it only
    picks which of several such regions an image belongs to (the nearest, by Mahalanobis distance).

    ``neighbours`` (latents, labels of held-out images, the audit split) adds a local witness: at least
    ``NEIGHBOUR_SHARE`` of the image's ``NEIGHBOURS`` nearest held-out images (in the same latent space; the image
    itself left out with ``exclude_self``, for images of that set) must carry the person's label. The judge is one
    linear model over the whole space and, near a boundary, sure of real images of the mistaken class; their
    neighbours are mostly of their own class. Measured on the planted benchmark (short 2s -> 7, seeds 0-2): the
    judge alone relabelled 8, 13 and 17 real 7s as 2 (each trained four times, they took crossed test 7s to 2); with
    the neighbours 2, 1 and 3, keeping 94 of 100, 101 of 103 and 89 of 95 of the mislabelled images. Images it
    turns away fall to :func:`doubted_labels`: out of the clean loss, not relabelled.

    ``image_scores`` (N, K), the image judge's class probabilities (:func:`image_judge_scores`; a classifier fitted
    on the audit images), replaces that witness where it is given (train and val; it learnt the audit labels, so
    there the latent rule above stays): an image is contradicted when the image judge gives the person's class
    probability at least ``IMAGE_JUDGE_SURE``, whatever the latent judge says. The latent judge and its neighbours
    see the generator's rendering, in which a bug's extreme (the shortest 2s) sits among the mistaken class and
    some real images of the mistaken class sit among the bug; the image judge sees the digit. Measured on the
    training labels of the 21 kept planted runs (seven cases, seeds 0-2): of the 62 relabelled training images
    whose label was right, 53 were the latent rule's alone (the image judge gave them under 0.9, most under 0.5),
    against 34 of about 3,300 mislabelled ones; on top-heavy seed 0, the latent rule's 8 right labels relabelled
    cost 4 test 4s, and without them the run met every bar.
    """
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if image_scores is not None:  # the image judge decides alone where it judges
        judged = np.where(image_scores.max(axis=1) >= IMAGE_JUDGE_SURE, image_scores.argmax(axis=1), -1)
    else:  # the latent rule: the latent judge, sure, and most of its audit neighbours
        scores = validity.scores(latents)
        judged = np.where(scores.max(axis=1) >= min_validity, scores.argmax(axis=1), -1)
        if neighbours is not None and len(neighbours[1]):
            classes = max(scores.shape[1], int(neighbours[1].max()) + 1)
            share = neighbour_shares(latents, *neighbours, num_classes=classes, exclude_self=exclude_self)
            witnessed = share[np.arange(len(latents)), np.maximum(judged, 0)] >= NEIGHBOUR_SHARE
            judged = np.where(witnessed, judged, -1)
    return _nearest_relabelled_region(regions, bug_labels, latents,
                                      lambda mistake, person: (labels == mistake) & (judged == person))


def image_judge_scores(data: ImageDataModule, arch: str, width: int, epochs: int, seed: int,
                       trainer: TrainerConfig | None, root: str | Path,
                       names: tuple[str, ...] = ("train", "val")) -> dict[str, np.ndarray]:
    """The image judge's class probabilities for every image of ``names``, (N, K) each: a classifier of ``arch``
    fitted by Lightning on the audit split alone for ``epochs`` (held-out labels; neither the classifier under test
    nor its training labels), seeded from stream ``correct.image_judge``. Not for the audit split itself, whose
    labels it learnt. Deterministic on CPU, so ``defuse review`` and the correct stage see the same judge."""
    from defuse.models.classifiers import ClassifierModule  # Lightning module of fit-classifier

    audit = data.split("audit")
    mean, std = data.channel_stats()
    with torch.random.fork_rng():  # the judge's initial weights, without moving the caller's random state
        torch.manual_seed(int_seed(seed, "correct.image_judge"))
        module = ClassifierModule(arch=arch, width=width, in_channels=data.channels, num_classes=data.num_classes,
                                  mean=mean, std=std, classes=list(data.classes))
        make_trainer(trainer or TrainerConfig(progress_bar=False), epochs, str(root), num_sanity_val_steps=0,
                     limit_val_batches=0).fit(
            module, train_dataloaders=data.images_loader(audit, shuffle=True, stream="correct.image_judge_shuffle"))
    model = module.model.eval()
    return {name: F.softmax(predict_logits(model, data.split(name).float_images()).float(), dim=1).numpy()
            for name in names}


def neighbour_shares(latents: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray, num_classes: int,
                     k: int = NEIGHBOURS, exclude_self: bool = False) -> np.ndarray:
    """For each latent, the share of its ``k`` nearest ``reference`` latents (Euclidean) carrying each label,
    (N, num_classes). With ``exclude_self``, ``latents`` are ``reference`` itself and each leaves itself out."""
    reference_t, labels_t = torch.as_tensor(reference, dtype=torch.float32), torch.as_tensor(reference_labels)
    k = min(k, len(reference) - int(exclude_self))
    shares = []
    for start in range(0, len(latents), 4096):  # (4096, reference) distances at a time
        chunk = torch.as_tensor(latents[start : start + 4096], dtype=torch.float32)
        distance = torch.cdist(chunk, reference_t)
        if exclude_self:
            distance[torch.arange(len(chunk)), torch.arange(start, start + len(chunk))] = float("inf")
        nearest = labels_t[distance.topk(k, largest=False).indices]
        shares.append(F.one_hot(nearest, num_classes).float().mean(dim=1))
    return torch.cat(shares).numpy() if shares else np.zeros((0, num_classes))


def doubted_labels(regions: Regions, bug_labels: dict[int, int], latents: np.ndarray, labels: np.ndarray,
                   validity: ValidityModel) -> np.ndarray:
    """For each image: the id of the nearest region (Mahalanobis) whose mistake m is its label while the validity
    judge reads it as another class than m (-1: none).

    Weaker than :func:`contradicting_labels`: the judge doubts the label without being sure of the person's class.
    Such images are never relabelled, but those of a labelling bug leave the clean loss and the guard: on the
    slant benchmark 23 of
    the 46 poisoned labels the sure rule misses are of this kind (the judge reads most as 8 or 9), and left in
    the clean loss they teach the bug again."""
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    judged = validity.predict_proba(latents).argmax(axis=1)
    return _nearest_relabelled_region(regions, bug_labels, latents,
                                      lambda mistake, person: (labels == mistake) & (judged != mistake))[0]


def neighbourhood_labels(regions: Regions, bug_labels: dict[int, int], latents: np.ndarray, labels: np.ndarray,
                         validity: ValidityModel) -> tuple[np.ndarray, np.ndarray]:
    """For each image: the nearest region it lies within reach of (standardised latent distance to the centre at
    most the region's ``source_radius``) whose person's label c its own label contradicts within the region's pair
    (-1: none), and c (-1: none). The person's answer is the authority over the real images the region reaches:
    c = the source class makes the images labelled as the mistake suspect; c = the mistake itself (the model reads
    these images right) makes those labelled as the source class suspect; any other class, both.

    No judge is asked: it is fitted on the same labels, and where every split carries a labelling bug it agrees
    with the bug. Geometry alone cannot tell a mislabelled image from a real one of the other class (measured on
    the planted benchmark with every split but test poisoned, seed 0: 83 images within reach of the top slant
    region, 67 of them poisoned; 631 within reach of the top thin region, 95 poisoned), so these images are
    listed for a person's review (``defuse review``) and are relabelled only on their answers.
    """
    n = len(latents)
    region_of, person_of, nearest = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, np.inf)
    scale = np.asarray(validity.scale)
    for region in regions.regions:
        person = bug_labels.get(region.id)
        if person is None or region.source_radius <= 0:
            continue
        pair = {region.source_label, region.predicted_label}
        suspects = np.isin(labels, sorted(pair - {person}))
        if not suspects.any():
            continue
        distance = np.linalg.norm((latents - np.asarray(region.mean)) / scale, axis=1)
        closer = suspects & (distance <= region.source_radius) & (distance < nearest)
        region_of[closer], person_of[closer], nearest[closer] = region.id, person, distance[closer]
    return region_of, person_of


def _mahalanobis(latents: np.ndarray, region) -> np.ndarray:
    """Squared Mahalanobis distance of each latent to the region's Gaussian, (N,)."""
    mean, cov = np.asarray(region.mean), np.asarray(region.cov)
    delta = latents - mean
    return np.einsum("nd,nd->n", delta, np.linalg.solve(cov + 1e-6 * np.eye(len(mean)), delta.T).T)


def _nearest_relabelled_region(regions: Regions, bug_labels: dict[int, int], latents: np.ndarray,
                               eligible) -> tuple[np.ndarray, np.ndarray]:
    """For each latent: the nearest region (Mahalanobis) the person labelled with another class than its mistake
    for which ``eligible(mistake, person)`` holds (-1: none), and that person's label (-1: none)."""
    n = len(latents)
    region_of, person_of, nearest = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, np.inf)
    for region in regions.regions:
        person = bug_labels.get(region.id, region.predicted_label)
        if person == region.predicted_label:
            continue
        hit = eligible(region.predicted_label, person)
        if not hit.any():
            continue
        distance = _mahalanobis(latents, region)
        closer = hit & (distance < nearest)
        region_of[closer], person_of[closer], nearest[closer] = region.id, person, distance[closer]
    return region_of, person_of


def encode_splits(generator: nn.Module, data: ImageDataModule,
                  names: tuple[str, ...] = ("train", "val", "audit")) -> dict[str, np.ndarray]:
    """Encoder means of every image of the named splits, (N, latent_dim) each: the judge's and the regions' space."""
    return {name: latent_means(generator, data.split(name).float_images()).numpy() for name in names}


def find_label_issues(regions: Regions, bug_labels: dict[int, int], latents: dict[str, np.ndarray],
                      judge: ValidityModel, data: ImageDataModule, relabel: bool,
                      reviewed: dict[int, int] | None = None,
                      image_scores: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """label_issues.csv: every train, val and audit image whose label the person's answers and the judge
    contradict (kind "contradicted", :func:`contradicting_labels`), the judge doubts (kind "doubted",
    :func:`doubted_labels`) or a labelled region reaches (kind "neighbour", :func:`neighbourhood_labels`; listed for
    review, its label stands until a person answers), with its split, position there, position in the source (``image``), the given label,
    the region, the person's label for it, whether its pair is a labelling bug (``label_bug``: enough training
    images contradict it, see ``LABEL_BUG_SHARE``), whether it is relabelled (the person's consent; contradicted
    images of labelling bugs only) and what the two witnesses give the person's label: ``judge_validity`` (the
    latent validity judge) and ``image_judge`` (the image judge's probability; empty for audit images and when it
    is off). Images of labelling bugs leave the clean loss and the guard unless relabelled;
    the others are listed for review, and their labels stand.

    ``reviewed`` (source image -> the label a person gave it on review, :func:`read_reviewed_labels`) overrides the
    rules image by image: the reviewer's label becomes ``person_label`` (``reviewed`` true) and the image is
    relabelled when it differs from the given label (the answer is the consent) or stands, back in the clean loss
    and the guard, when it is the same. Reviewed images no rule listed join the table as kind "reviewed".

    ``image_scores`` (split -> the image judge's probabilities, :func:`image_judge_scores`) adds the image judge's
    witness on those splits (see :func:`contradicting_labels`)."""
    classes = data.classes
    image_scores = image_scores or {}
    frames = []
    witnesses = (latents["audit"], data.split("audit").labels.numpy()) if "audit" in latents else None
    for name, z in latents.items():
        images = data.split(name)
        if len(images) == 0:
            continue
        labels = images.labels.numpy()
        region_of, person_of = contradicting_labels(regions, bug_labels, z, labels, judge, neighbours=witnesses,
                                                    exclude_self=name == "audit", image_scores=image_scores.get(name))
        doubted = doubted_labels(regions, bug_labels, z, labels, judge)
        doubted[region_of >= 0] = -1  # contradicted wins
        reached, reached_person = neighbourhood_labels(regions, bug_labels, z, labels, judge)
        reached[(region_of >= 0) | (doubted >= 0)] = -1  # ... and so does doubted
        person = {r.id: bug_labels.get(r.id, r.predicted_label) for r in regions.regions}
        validity = judge.scores(z)
        seen = image_scores.get(name)
        for kind, region_ids in ((CONTRADICTED, region_of), (DOUBTED, doubted), (NEIGHBOUR, reached)):
            rows = np.flatnonzero(region_ids >= 0)
            given = labels[rows]
            said = (reached_person[rows] if kind == NEIGHBOUR else
                    np.array([person[int(r)] for r in region_ids[rows]], dtype=np.int64))
            frames.append(pd.DataFrame({
                "split": name, "position": rows, "image": data.indices(name).numpy()[rows], "kind": kind,
                "given_label": given, "given_class": [classes[k] for k in given], "region": region_ids[rows],
                "person_label": said, "person_class": [classes[k] for k in said],
                "relabelled": relabel and kind == CONTRADICTED,
                # What each witness says of the person's label, for whoever reviews the row (the image judge
                # does not judge the audit images it learnt, nor anything when it is off: empty there).
                "judge_validity": validity[rows, said].round(3),
                "image_judge": seen[rows, said].round(3) if seen is not None else np.nan,
            }))
    frames = [f for f in frames if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(LABEL_ISSUE_COLUMNS))
    table = table.sort_values(["split", "position"], kind="stable").reset_index(drop=True)
    table = table.astype({"position": "int64", "image": "int64", "given_label": "int64", "region": "int64",
                          "person_label": "int64", "relabelled": "bool"})
    # A (person's label, given label) pair is a labelling bug when enough training images contradict it: at least
    # MIN_BUG_IMAGES, and at least LABEL_BUG_SHARE of the training images with that label. Fewer are the judge's
    # doubts on a natural boundary, whose labels stand (see LABEL_BUG_SHARE).
    contradicted = table[(table["kind"] == CONTRADICTED) & (table["split"] == "train")]
    counts = contradicted.groupby(["person_label", "given_label"]).size()
    per_label = np.bincount(data.split("train").labels.numpy(), minlength=len(classes))
    label_bugs = {pair for pair, n in counts.items()
                  if n >= max(MIN_BUG_IMAGES, LABEL_BUG_SHARE * per_label[int(pair[1])])}
    pairs = list(zip(table["person_label"], table["given_label"]))
    table["label_bug"] = np.array([pair in label_bugs for pair in pairs], dtype=bool)
    table["relabelled"] = table["relabelled"] & table["label_bug"]
    table["reviewed"] = False
    if reviewed:
        table = _with_review(table, reviewed, data)
    return table[list(LABEL_ISSUE_COLUMNS)]


def _with_review(table: pd.DataFrame, reviewed: dict[int, int], data: ImageDataModule) -> pd.DataFrame:
    """``table`` with a person's reviewed labels applied (see :func:`find_label_issues`)."""
    classes = data.classes
    answer = table["image"].map(reviewed)
    hit = answer.notna()
    table.loc[hit, "person_label"] = answer[hit].astype("int64")
    table.loc[hit, "person_class"] = [classes[int(k)] for k in answer[hit]]
    table.loc[hit, "relabelled"] = answer[hit].astype("int64") != table.loc[hit, "given_label"]
    table.loc[hit, "reviewed"] = True
    listed = set(table["image"].tolist())
    extra = []
    for name in REVIEWABLE_SPLITS:
        source = data.indices(name).numpy()
        labels = data.split(name).labels.numpy()
        positions = np.flatnonzero(np.isin(source, [i for i in reviewed if i not in listed]))
        said = np.array([reviewed[int(source[p])] for p in positions], dtype=np.int64)
        keep = said != labels[positions]  # a label the reviewer confirmed that no rule doubted: nothing to do
        positions, said = positions[keep], said[keep]
        if len(positions):
            extra.append(pd.DataFrame({
                "split": name, "position": positions, "image": source[positions], "kind": REVIEWED,
                "given_label": labels[positions], "given_class": [classes[k] for k in labels[positions]],
                "region": -1, "person_label": said, "person_class": [classes[k] for k in said],
                "label_bug": False, "relabelled": True, "reviewed": True}))
    if extra:
        table = pd.concat([table, *extra], ignore_index=True).sort_values(["split", "position"], kind="stable")
    return table.astype({"person_label": "int64", "relabelled": "bool", "reviewed": "bool"}).reset_index(drop=True)


def read_reviewed_labels(path: str | Path, data: ImageDataModule) -> dict[int, int]:
    """A person's review of label issues: source image -> the label they gave it.

    The file is a CSV with a header holding at least the columns ``image`` (the ``image`` column of
    label_issues.csv: the image's position in the source data) and ``label`` (a class name or index; empty or
    ``skip``: no answer), as ``defuse review`` writes it, or label_issues.csv itself with a ``label`` column added.
    A later row for the same image replaces an earlier one. Only train, val and audit images may be reviewed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"correct.reviewed_labels: {path} does not exist. Write it with `defuse review`, "
                                f"or give a CSV with the columns image,label.")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV ({error}). Expected a header with the columns image,label.") \
            from None
    missing = [c for c in ("image", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns) or 'none'})"
                         f". A review file has the columns image,label: image from label_issues.csv, label a class.")
    classes = list(data.classes)
    allowed = {int(i) for name in REVIEWABLE_SPLITS for i in data.indices(name).tolist()}
    answers: dict[int, int] = {}
    for line, (image, label) in enumerate(zip(frame["image"], frame["label"]), start=2):
        label = label.strip()
        if label in ("", "skip"):
            continue
        if not image.strip().isdigit():
            raise ValueError(f"{path}, line {line}: image {image!r} is not an image number (the image column of "
                             f"label_issues.csv).")
        if int(image) not in allowed:
            raise ValueError(f"{path}, line {line}: image {image} is not in the train, val or audit split of this "
                             f"run's data (test images only grade, and are never relabelled). Review the images "
                             f"label_issues.csv or `defuse review` lists.")
        parsed = parse_label(label, classes)  # as the review prompt reads an answer
        if isinstance(parsed, int):
            answers[int(image)] = parsed
        else:
            raise ValueError(f"{path}, line {line}: label {label!r} is not a class. Use a class name or index "
                             f"({', '.join(f'{k}={n}' for k, n in enumerate(classes))}), or leave it empty to skip.")
    return answers


# Roles of the held-out images (val, then audit, each in its split's order).
GUARD, BUG, LEFT_OUT = 0, 1, 2


@dataclass(frozen=True)
class RealImages:
    """The real images a fine-tune reads, by role.

    Attributes:
        clean_train: the clean loss (training images without label issues).
        relabelled: training images trained under a person's label (empty without consent).
        held_out: every val and audit image, in split order, under its label as corrected (a person's answer where
            relabelled). Candidates are read on all of them once, and the roles below say how each counts, so a
            person's later answer on a held-out image re-grades the same checkpoints instead of training anew.
        role: per held-out image, ``GUARD`` (must not get worse), ``BUG`` (a labelled bug's real image under the
            person's label: what the choice maximises) or ``LEFT_OUT`` (a label issue of a labelling bug, unsettled).
        split, position: where each held-out image comes from.
        reviewed: per held-out image, whether a person answered it on review.
        train_position, train_reviewed: each clean training image's position in the training split, and whether a
            person answered it on review.
    """

    clean_train: ImageSet
    relabelled: ImageSet
    held_out: ImageSet
    role: torch.Tensor
    split: np.ndarray
    position: np.ndarray
    reviewed: torch.Tensor
    train_position: np.ndarray
    train_reviewed: torch.Tensor

    @property
    def guard(self) -> ImageSet:
        return self.held_out.subset(self.role == GUARD)

    @property
    def bugs(self) -> ImageSet:
        return self.held_out.subset(self.role == BUG)

    @classmethod
    def gather(cls, data: ImageDataModule, issues: pd.DataFrame | None = None,
               bug_pairs: set[tuple[int, int]] = frozenset(), original: nn.Module | None = None,
               held_out: tuple[str, ...] = ("val", "audit"), reviewed: set[int] | None = None) -> "RealImages":
        """Split ``data`` into the roles. ``issues``: the label issues (:func:`find_label_issues`); relabelled ones
        join ``relabelled`` (train) or stay held out under the person's label, the other ones of labelling bugs are
        left out (all are when the frame has no ``label_bug`` column). Held-out images labelled p that ``original``
        reads as m, for a labelled pair ``(p, m)`` in ``bug_pairs``, are bugs. ``reviewed``: the source images a
        person answered on review."""
        issues = issues if issues is not None else pd.DataFrame(columns=list(LABEL_ISSUE_COLUMNS))

        def acted_on(name: str) -> tuple[ImageSet, torch.Tensor, torch.Tensor]:
            """(the split under its labels as corrected, flagged, relabelled). Doubted labels leave the guard too:
            a doubted held-out label is as likely the bug itself as an ambiguous image, and a repair that fixes a
            mislabelled one counts as a loss (measured on the slant and thin benchmarks, seed 0: kept in the guard,
            they refused every candidate; left out, the test split, whose labels are clean, showed +0.16 points
            outside the slant subgroup)."""
            images = data.split(name)
            rows = issues[issues["split"] == name]
            if "label_bug" in rows:  # a boundary pair's labels stand: those images stay where they are
                acted = rows["label_bug"].astype(bool)
                if "reviewed" in rows:  # ... unless a person reviewed them: their answer decides
                    acted |= rows["reviewed"].astype(bool)
                rows = rows[acted]
            rows = rows[rows["person_label"].astype("int64") != rows["given_label"].astype("int64")]
            flagged = torch.zeros(len(images), dtype=torch.bool)
            flagged[_column(rows, "position")] = True
            moved = rows[rows["relabelled"].astype(bool)]
            relabelled = torch.zeros(len(images), dtype=torch.bool)
            relabelled[_column(moved, "position")] = True
            labels = images.labels.clone()
            labels[_column(moved, "position")] = _column(moved, "person_label")
            return ImageSet(images.images, labels, images.classes), flagged, relabelled

        train, flagged, relabelled = acted_on("train")
        clean_train = train.subset(~flagged)
        relabelled_train = train.subset(relabelled)
        parts = [(name, *acted_on(name)) for name in held_out]
        pool = ImageSet(torch.cat([p[1].images for p in parts]), torch.cat([p[1].labels for p in parts]),
                        train.classes)
        left_out = torch.cat([p[2] & ~p[3] for p in parts])
        role = torch.where(left_out, LEFT_OUT, GUARD)
        if original is not None and bug_pairs and len(pool):
            read = predict_labels(original, pool.float_images())
            for person, mistake in bug_pairs:
                role[(pool.labels == person) & (read == mistake) & ~left_out] = BUG
        answered = sorted(reviewed or ())
        source = np.concatenate([data.indices(name).numpy() for name, *_ in parts])
        train_position = np.flatnonzero(~flagged.numpy())
        return cls(clean_train, relabelled_train, pool, role,
                   split=np.concatenate([np.full(len(p[1]), p[0]) for p in parts]),
                   position=np.concatenate([np.arange(len(p[1])) for p in parts]),
                   reviewed=torch.from_numpy(np.isin(source, answered)), train_position=train_position,
                   train_reviewed=torch.from_numpy(np.isin(data.indices("train").numpy()[train_position], answered)))

    def training_set(self, relabelled_repeats: int) -> ImageSet:
        """The fine-tune's training images: the clean ones, then the relabelled ones ``relabelled_repeats`` times
        (they outweigh the bug's mislabelled images that no rule found and that still teach it)."""
        images = [self.clean_train.images] + [self.relabelled.images] * relabelled_repeats
        labels = [self.clean_train.labels] + [self.relabelled.labels] * relabelled_repeats
        return ImageSet(torch.cat(images), torch.cat(labels), self.clean_train.classes)


def _column(frame: pd.DataFrame, name: str) -> torch.Tensor:
    """An integer column as a long tensor (an empty frame's columns have no integer type)."""
    return torch.from_numpy(np.array(frame[name], dtype=np.int64))


def paired_change(before: np.ndarray, after: np.ndarray, rng: np.random.Generator,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """Accuracy change after - before on the same images (booleans, correct or not), with the paired bootstrap 95%
    interval. Resampling images with replacement only moves the counts of images gained (+1), lost (-1) and
    unchanged, so the resamples are drawn as multinomial counts: exact, and independent of the number of images."""
    n = len(before)
    if n == 0:
        return 0.0, 0.0, 0.0
    diff = after.astype(np.int64) - before.astype(np.int64)
    probs = np.array([(diff == 1).sum(), (diff == -1).sum(), (diff == 0).sum()], dtype=np.float64) / n
    counts = rng.multinomial(n, probs, size=resamples)
    changes = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.quantile(changes, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high)


def drift_box(classifier: nn.Module, held_out: ImageSet, seed: int, max_drop: float = 0.01
              ) -> dict[str, tuple[float, float]]:
    """Each acquisition parameter's tolerated range for ``classifier`` on held-out images (the guard: val and audit,
    never test), for drift-aware repair; parameters tolerated nowhere (a zero-width range) are left out."""
    from defuse.drift.forensics import drift_forensics

    found = drift_forensics(classifier, held_out.float_images(), held_out.labels, max_drop=max_drop, seed=seed)
    box = {}
    for name, p in found["parameters"].items():
        low = p["identity"] if p.get("tolerance_low") is None else p["tolerance_low"]
        high = p["identity"] if p.get("tolerance_high") is None else p["tolerance_high"]
        if high > low:
            box[name] = (float(low), float(high))
    return box


class CorrectionModule(pl.LightningModule):
    """Fine-tunes ``classifier`` on training batches plus ``lam`` times region batches (none when a batch has no
    "regions" entry).

    Args:
        classifier: [0,1] images -> logits; trained in place.
        lam: weight of the region loss.
        lr: Adam learning rate.
        keep: weight of KL(original || fine-tuned) on the training images whose label the original gives.
        layers: "all" trains every weight; "head" only :func:`classifier_head`, on frozen features.
        average: each epoch's candidate is the running mean of the weights at the end of every epoch so far
            (:meth:`fold_epoch`), not the last step's weights.
    """

    def __init__(self, classifier: nn.Module, lam: float = 1.0, lr: float = 5e-4, keep: float = 0.0,
                 drift_box: dict[str, tuple[float, float]] | None = None, drift_seed: int = 0,
                 layers: str = "all", average: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["classifier"])
        # Drift-aware repair: the random drifts of each step come from their own generator (stream correct.drift).
        self._drift_generator = torch.Generator().manual_seed(drift_seed) if drift_box else None
        # The original model, frozen: on clean batches the fine-tuned one is held to its predictions (weight
        # ``keep``), so fixing the regions reshuffles fewer unrelated decisions. Kept in a list, not as a
        # submodule: it is fixed, so it stays out of checkpoints, optimisers and Lightning's train/eval switches.
        self._teacher = [copy.deepcopy(classifier).eval().requires_grad_(False)] if keep > 0 else []
        self.model = classifier.train().requires_grad_(layers == "all")  # checkpoints load in eval mode, frozen
        if layers == "head":
            classifier_head(self.model).requires_grad_(True)
        # A submodule, so checkpoints carry it and a resumed fine-tune goes on averaging where it stopped. Buffers
        # are not averaged: batch norm stays frozen at the original's statistics (on_train_epoch_start).
        self.averaged = AveragedModel(self.model).requires_grad_(False) if average else None

    @property
    def candidate(self) -> nn.Module:
        """The weights this epoch offers as a candidate: the running average, or the current weights."""
        return self.model if self.averaged is None else self.averaged.module

    def fold_epoch(self) -> None:
        """Fold the weights at the end of this epoch into the running average (nothing without ``average``)."""
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        # Keep batch-norm statistics as trained: region batches are decoded (smoother) images, and letting them
        # move the running means shifts every clean input too (measured: -1.8 points of clean accuracy).
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def training_step(self, batch, batch_idx):
        x_clean, y_clean = batch["clean"]
        logits = self(x_clean)
        clean = F.cross_entropy(logits, y_clean)
        loss = clean
        if "regions" in batch and self.hparams.lam > 0:
            x_region, y_region = batch["regions"]
            region = F.cross_entropy(self(x_region), y_region)
            loss = loss + self.hparams.lam * region
            self.log("region_loss", region, on_epoch=True, on_step=False)
        if self._teacher:
            teacher = self._teacher[0].to(x_clean.device)
            with torch.no_grad():
                target = F.log_softmax(teacher(x_clean), dim=1)
            # Held only where the original gives the label: a relabelled image is free to change its answer.
            agrees = (target.argmax(dim=1) == y_clean).float()
            kl = F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="none").sum(dim=1)
            drift = (kl * agrees).sum() / len(y_clean)
            loss = loss + self.hparams.keep * drift
            self.log("drift_loss", drift, on_epoch=True, on_step=False)
        if self._drift_generator is not None:
            drifted = F.cross_entropy(self(self._drifted(x_clean)), y_clean)
            loss = loss + drifted
            self.log("drifted_loss", drifted, on_epoch=True, on_step=False)
        self.log("clean_loss", clean, on_epoch=True, on_step=False)
        return loss

    def _drifted(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` re-acquired under one random setting per image, uniform inside the drift box."""
        from defuse.drift.acquisition import SensorNoise, acquire

        g = self._drift_generator
        n = len(x)
        setting = {name: low + (high - low) * torch.rand(n, generator=g)
                   for name, (low, high) in self.hparams.drift_box.items()}
        noise = SensorNoise.draw(x.shape, g)
        with torch.no_grad():
            return acquire(x.cpu(), setting, noise).to(x.device)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class _EpochRecord(Callback):
    """After every training epoch, writes what the choice needs (the model's readings of the guard and bug images,
    its accuracy on the decoded validation samples) to a JSON file, atomically, so the choice survives restarts."""

    def __init__(self, path: Path, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.path, self.sets = path, sets

    def on_train_epoch_end(self, trainer, module) -> None:
        # Runs before ModelCheckpoint (Lightning calls checkpoint callbacks last), so the epoch's checkpoint holds
        # the average this record describes.
        module.fold_epoch()
        records = json.loads(self.path.read_text()) if self.path.exists() else []
        records = [r for r in records if r["epoch"] != trainer.current_epoch]
        records.append({"epoch": trainer.current_epoch,
                        **{name: predict_labels(module.candidate, x).tolist() for name, (x, _) in self.sets.items()}})
        atomic_write_json(self.path, sorted(records, key=lambda r: r["epoch"]))


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy on each class's images (a class without images counts as 1.0)."""
    hits = np.bincount(labels[predicted == labels], minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return np.where(counts > 0, hits / np.maximum(counts, 1), 1.0)


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float | None:
    return float((predicted == labels).mean()) if len(labels) else None


def correct(
    classifier: nn.Module,
    data: ImageDataModule,
    real: RealImages,
    train_regions: RegionSamples,
    val_regions: RegionSamples,
    config: CorrectConfig,
    workdir: Path,
    *,
    trainer: TrainerConfig | None = None,
    seed: int = 0,
    scoped_classes: set[int] | None = None,
    pairs: set[tuple[int, int]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune copies of ``classifier`` for every lambda; return the chosen weights and how they were chosen.

    ``data`` gives the batch size and loaders; ``real`` every real image by role (:class:`RealImages`). With
    ``scoped_classes`` (the classes a person gave the labelled regions), every candidate is judged, and the chosen
    one returned, as a :class:`ScopedRepair` that moves answers only to those classes. ``pairs``: the (person's label,
    mistake) pairs repaired (:func:`repaired_pairs`); guard images labelled with a mistake that a candidate moves to
    the person's label are returned for a person's review (summary ``moved_for_review``, :func:`moved_to_person`).
    Randomness: streams ``correct.region_shuffle``, ``correct.clean_shuffle``, ``correct.guard_bootstrap``.
    """
    trainer_config = trainer or TrainerConfig(progress_bar=False)
    if len(real.guard) == 0:
        raise ValueError("No held-out image is left to guard clean accuracy: set `data.val_size` (and "
                         "`data.audit_size`) above 0, so the repair can show it does no harm.")
    num_classes = len(real.guard.classes)
    # Every held-out image is read once per candidate whatever its role, so a person's later answer on one re-grades
    # the same checkpoints (:attr:`RealImages.held_out`).
    sets = {"held_out": (real.held_out.float_images(), real.held_out.labels),
            "decoded": (val_regions.images, val_regions.labels),
            "train": (real.clean_train.float_images(), real.clean_train.labels)}
    base = {name: predict_labels(classifier, x).numpy() for name, (x, _) in sets.items()}
    region_x, region_y = train_regions.images, train_regions.labels
    training_set = real.training_set(config.relabelled_repeats)
    box = drift_box(classifier, real.guard, seed) if config.drift_augment else None
    # Without decoded samples to train on (every labelled pair is shown by real images), lambda changes nothing:
    # one fine-tune, on the corrected labels alone.
    lambdas = sorted(set(config.lambdas)) if len(region_y) else [0.0]
    # The head-only family trains on the corrected labels alone: decoded samples through frozen features are not
    # what it is for (a small move on real evidence).
    families = [("all", lam) for lam in lambdas if "all" in config.layers]
    if "head" in config.layers:
        families.append(("head", 0.0))
    candidates = []
    for layers, lam in families:
        folder = workdir / (f"lambda_{lam:g}" if layers == "all" else f"head_lambda_{lam:g}")
        folder.mkdir(parents=True, exist_ok=True)
        record = folder / "epochs.json"
        done = json.loads(record.read_text()) if record.exists() else []
        if len(done) < config.epochs:
            pl.seed_everything(seed, verbose=False)
            module = CorrectionModule(copy.deepcopy(classifier), lam=lam,
                                      lr=config.lr if layers == "all" else config.head_lr, keep=config.keep,
                                      drift_box=box, drift_seed=int_seed(seed, "correct.drift"), layers=layers,
                                      average=config.average)
            loaders = {"clean": data.images_loader(training_set, shuffle=True, stream="correct.clean_shuffle")}
            if lam > 0:
                loaders["regions"] = DataLoader(TensorDataset(region_x, region_y), batch_size=data.config.batch_size,
                                                shuffle=True, generator=torch_generator(seed, "correct.region_shuffle"))
            loaders = CombinedLoader(loaders, "max_size_cycle")
            checkpoints = ModelCheckpoint(dirpath=folder, filename="epoch{epoch}", save_top_k=-1, save_last=True,
                                          auto_insert_metric_name=False, save_on_train_epoch_end=True)
            fit = make_trainer(trainer_config, config.epochs, str(folder), num_sanity_val_steps=0,
                               limit_val_batches=0, callbacks=[_EpochRecord(record, sets), checkpoints],
                               enable_checkpointing=True)
            last = folder / "last.ckpt"
            fit.fit(module, train_dataloaders=loaders, ckpt_path=str(last) if last.exists() else None,
                    weights_only=True)
            done = json.loads(record.read_text())
        for entry in done[: config.epochs]:
            candidates.append({"layers": layers, "lambda": lam, "epoch": entry["epoch"], "path": str(folder / f"epoch{entry['epoch']}.ckpt"),
                               **{name: np.asarray(entry[name], dtype=np.int64) for name in sets}})

    if scoped_classes:  # judged as they will answer: only moves to the person's classes
        classes = torch.tensor(sorted(scoped_classes), dtype=torch.long)
        for c in candidates:
            for name in sets:
                moved = scoped_changes(torch.from_numpy(base[name]), torch.from_numpy(c[name]), classes).numpy()
                c[name] = np.where(moved, c[name], base[name])
    # The roles: guard and bug images are slices of the held-out readings.
    role = real.role.numpy()
    held_labels = real.held_out.labels.numpy()
    for reading in (base, *candidates):
        reading["guard"], reading["bugs"] = reading["held_out"][role == GUARD], reading["held_out"][role == BUG]
    truth = {"guard": held_labels[role == GUARD], "bugs": held_labels[role == BUG],
             "decoded": val_regions.labels.numpy()}
    unsettled = moved_to_person(held_labels, base["held_out"], [c["held_out"] for c in candidates], pairs or set(),
                                (real.role == GUARD).numpy() & ~real.reviewed.numpy())
    train_moved = moved_to_person(real.clean_train.labels.numpy(), base["train"],
                                  [c["train"] for c in candidates], pairs or set(), ~real.train_reviewed.numpy())
    rng = numpy_rng(seed, "correct.guard_bootstrap")
    base_hits = base["guard"] == truth["guard"]
    base_per_class = per_class_accuracy(base["guard"], truth["guard"], num_classes)
    use_bugs = len(truth["bugs"]) >= MIN_BUG_IMAGES
    table = []
    for c in candidates:
        change, low, high = paired_change(base_hits, c["guard"] == truth["guard"], rng)
        drop = float(np.max(base_per_class - per_class_accuracy(c["guard"], truth["guard"], num_classes)))
        table.append({"layers": c["layers"], "lambda": c["lambda"], "epoch": c["epoch"], "path": c["path"],
                      "guard_change": round(change, 4), "guard_change_ci95": [round(low, 4), round(high, 4)],
                      "largest_class_drop": round(drop, 4),
                      "bug_accuracy": _round(_accuracy(c["bugs"], truth["bugs"])),
                      "decoded_accuracy": _round(_accuracy(c["decoded"], truth["decoded"])),
                      "admissible": bool(low >= -config.max_clean_drop and drop <= config.max_class_drop)})
    if use_bugs:
        for t, confidence in zip(table, bug_confidence(classifier, candidates, real.bugs.float_images(),
                                                           real.bugs.labels)):
            t["bug_confidence"] = _round(confidence)
    key = "bug_accuracy" if use_bugs else "decoded_accuracy"
    chosen = choose_candidate(table, key)
    decoded_gain = None
    if use_bugs and chosen is not None and chosen["lambda"] > 0:
        chosen, decoded_gain = _unless_decoded_samples_help(chosen, table, candidates, truth["bugs"],
                                                            numpy_rng(seed, "correct.decoded_gain"))
    before = {"bug_accuracy": _round(_accuracy(base["bugs"], truth["bugs"])),
              "decoded_accuracy": _round(_accuracy(base["decoded"], truth["decoded"]))}
    summary: dict[str, Any] = {
        **({"drift_box": box} if box is not None else {}),
        "relabelled_training_images": len(real.relabelled), "clean_training_images": len(real.clean_train),
        "relabelled_repeats": config.relabelled_repeats,
        "guard_images": len(real.guard), "real_bug_images": len(real.bugs),
        "chosen_on": "real held-out bug images" if use_bugs else
                     f"decoded validation samples (fewer than {MIN_BUG_IMAGES} real held-out bug images)",
        "guard_accuracy_before": round(float(base_hits.mean()), 4),
        "real_bug_accuracy_before": before["bug_accuracy"], "val_region_accuracy_before": before["decoded_accuracy"],
        "candidates": [{k: v for k, v in t.items() if k != "path"} for t in table],
        "moved_for_review": [["train", int(real.train_position[i]), int(train_moved[i])]
                             for i in np.flatnonzero(train_moved >= 0)]
                            + [[str(real.split[i]), int(real.position[i]), int(unsettled[i])]
                               for i in np.flatnonzero(unsettled >= 0)],
        **({"scoped_classes": sorted(scoped_classes)} if scoped_classes else {}),
        **({"decoded_samples_gain": decoded_gain} if decoded_gain is not None else {}),
    }
    repaired = copy.deepcopy(classifier)
    if chosen is None or chosen[key] is None or before[key] is None or chosen[key] <= before[key]:
        reason = ("no candidate raised accuracy on the " + ("real bug images" if use_bugs else "decoded region samples")
                  + " while the guard's 95% lower bound stayed within correct.max_clean_drop and no class lost more "
                  "than correct.max_class_drop")
        if (unsettled >= 0).any():
            reason += (f"; the guard counts {int((unsettled >= 0).sum())} held-out images the candidates move to your label "
                       "as losses under their given labels: review them (`defuse review`), and your answers re-grade "
                       "the same candidates")
        log.warning("The repair is refused: %s. repaired.ckpt keeps the original weights.", reason)
        summary.update({"chosen": None, "reason": reason})
        return repaired.eval(), summary
    repaired.load_state_dict(candidate_weights(torch.load(chosen["path"], map_location="cpu", weights_only=True)))
    if scoped_classes:
        repaired = ScopedRepair(copy.deepcopy(classifier), repaired, sorted(scoped_classes))
    summary.update({"chosen": {"layers": chosen["layers"], "lambda": chosen["lambda"], "epoch": chosen["epoch"]},
                    "guard": {k: chosen[k] for k in ("guard_change", "guard_change_ci95", "largest_class_drop")},
                    "real_bug_accuracy_after": chosen["bug_accuracy"],
                    "val_region_accuracy_after": chosen["decoded_accuracy"]})
    return repaired.eval(), summary


def moved_to_person(labels: np.ndarray, base: np.ndarray, readings: list[np.ndarray], pairs: set[tuple[int, int]],
                    eligible: np.ndarray) -> np.ndarray:
    """Which images await a person's answer because a candidate moves them to a person's label: ``eligible`` images
    (unreviewed guard or clean training images) labelled with a repaired pair's mistake m, read as m by the
    original (``base``), read as the person's label p by at least one candidate (``readings``): for each image, that
    label (-1: none), (N,).

    Why: where every split carries a labelling bug, the held-out images of the bug that no rule reached keep the
    mistaken label, and a candidate that fixes them loses them under that label: the guard, graded on the same
    labelling, vetoes the person's answer (measured on the planted benchmark, every split but test poisoned, seed
    0: bold, 43 such 3s labelled 8, the guard's 8s fell 4 to 6 points for every candidate; thin, the best candidate
    read 0.89 of its bug images and lost 2.02 points of the guard's 1s). Geometry cannot tell these from real
    images of m the fix breaks (a wider reach covers every held-out image of the pair's classes), and neither can a
    model fitted on the same labels; the person can, and their answers re-grade the same candidates.

    On training images the same moves point at the bug's mislabelled images that no rule reached, which go on
    teaching the bug: a candidate that learnt from the relabelled ones reads them as the person's label, so the
    person is asked about exactly those (measured on the planted benchmark, bold seed 0: relabelled 44 of 141
    poisoned training images, and the chosen candidate read 0.68 of the held-out bug images, 0.75 of the test
    subgroup)."""
    moved = np.full(len(base), -1, dtype=np.int64)
    for person, mistake in sorted(pairs):
        candidates = eligible & (labels == mistake) & (base == mistake) & (moved < 0)
        for reading in readings:
            moved[candidates & (reading == person)] = person
    return moved


def candidate_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier weights a candidate checkpoint offers: the running average where the fine-tune kept one
    (``correct.average``), else the fine-tuned weights."""
    state = checkpoint["state_dict"]
    prefix = "averaged.module." if any(k.startswith("averaged.module.") for k in state) else "model."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def choose_candidate(table: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The admissible candidate with the best ``key`` accuracy (None when none is admissible).

    Ties on the real bug images go to the higher ``bug_confidence`` (the mean probability given their labels): a
    few dozen bug images tie often (slant seed 0 of the planted benchmark: 60 of 62 for nine candidates), and how
    surely a candidate reads them is the same evidence at a finer grain, where the guard change that broke such
    ties before moved by one image in 2,333. Then to the better guard change, and only then to decoded-sample
    accuracy, which says little about real images (the repair issue: 99.8% on decoded samples, 0.61 on the real
    subgroup); then to the smaller lambda and the earlier epoch."""
    admissible = [t for t in table if t["admissible"]]
    confident = key == "bug_accuracy"
    return max(admissible, key=lambda t: (t[key], (t.get("bug_confidence") or 0.0) if confident else 0.0,
                                          t["guard_change"], t["decoded_accuracy"] or 0.0, -t["lambda"], -t["epoch"]),
               default=None)


def bug_confidence(classifier: nn.Module, candidates: list[dict[str, Any]], images: torch.Tensor,
                   labels: torch.Tensor) -> list[float | None]:
    """Each candidate's mean probability of the bug images' labels (None without bug images), read by the
    fine-tuned weights of its checkpoint. Unscoped: every bug label is a person's class, so where a
    :class:`ScopedRepair` takes the fine-tune's answer this is its probability too, and where it keeps the
    original's it says how near the fine-tune came."""
    if len(labels) == 0:
        return [None] * len(candidates)
    model = copy.deepcopy(classifier)
    confidences = []
    for c in candidates:
        model.load_state_dict(candidate_weights(torch.load(c["path"], map_location="cpu", weights_only=True)))
        probabilities = F.softmax(predict_logits(model, images).float(), dim=1)
        confidences.append(float(probabilities.gather(1, labels[:, None].long()).mean()))
    return confidences


def _unless_decoded_samples_help(chosen: dict[str, Any], table: list[dict[str, Any]], candidates: list[dict[str, Any]],
                                 bug_labels: np.ndarray, rng: np.random.Generator
                                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``chosen`` (trained with decoded samples, lambda > 0) if it reads the real held-out bug images better than
    the best admissible candidate trained on real images alone (lambda 0) by more than chance: the lower end of the
    paired bootstrap 95% interval of the difference above zero. Else that lambda-0 candidate.

    Why: decoded samples of the other labelled regions (natural boundary cases the person labelled too) move real
    images the guard does not hold. Measured on the planted benchmark (narrow, seed 2, replayed with a wider
    relabelling rule that was tried and dropped): a lambda-1 candidate, trained with decoded "5 -> 9" samples the
    person called 5, won on 51 of 52 bug images against 50 at lambda 0 and lost 3.1 points of test 9s (the
    guard's 9s: 0.9 points), where the lambda-0 one lost 0.5."""
    real_only = choose_candidate([t for t in table if t["lambda"] == 0], "bug_accuracy")
    if real_only is None:
        return chosen, {"against": None, "kept": True}
    hits = {t["path"]: c["bugs"] == bug_labels for t, c in zip(table, candidates) if t is chosen or t is real_only}
    change, low, high = paired_change(hits[real_only["path"]], hits[chosen["path"]], rng)
    kept = low > 0
    gain = {"against": {k: real_only[k] for k in ("layers", "lambda", "epoch")},
            "bug_accuracy_change": round(change, 4), "ci95": [round(low, 4), round(high, 4)], "kept": kept}
    if not kept:
        log.info("Decoded region samples did not read the real bug images better than the real images alone "
                 "(change %+.3f, 95%% interval [%.3f, %.3f]): chose the lambda-0 candidate.", change, low, high)
    return (chosen if kept else real_only), gain


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class Repair:
    """The correct stage's artifact: the repaired classifier (the original weights when nothing qualified) and
    how it was chosen (``summary``: the labelled regions, every candidate's validation figures, the choice)."""

    model: nn.Module
    hparams: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    label_issues: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(LABEL_ISSUE_COLUMNS)))

    def save(self, path: str | Path) -> None:
        save_classifier(path, self.model, self.hparams)

    def save_label_issues(self, path: str | Path) -> None:
        """label_issues.csv: the images whose labels the person's answers contradict (see the module docstring)."""
        tmp = Path(path).with_suffix(".csv.tmp")
        self.label_issues.to_csv(tmp, index=False)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Repair":
        from defuse.models.loading import load_classifier

        loaded = load_classifier(path)
        return cls(loaded.model, loaded.hparams)


def repair(
    classifier: LoadedClassifier,
    bug_labels: dict[int, int],
    regions: Regions,
    generator: nn.Module,
    judge: ValidityModel,
    data: ImageDataModule,
    config: CorrectConfig,
    *,
    tau: float,
    workdir: Path,
    seed: int = 0,
    trainer: TrainerConfig | None = None,
    reviewed: dict[int, int] | None = None,
) -> Repair:
    """The correct stage: fine-tune on the labelled regions; keep the original weights unless it helps unharmed.

    Reads train, val and audit, never test: region samples are decoded from the generator, the clean loss is the
    training split, and lambda and epochs are chosen on held-out val and audit images (see the module docstring).
    Images whose labels both the person and the judge contradict are listed in ``label_issues``; with
    ``config.relabel`` (the person's consent) they are trained and graded under the person's label, else left out.
    Without a region labelled with a class, or with no region sample the judge gives its label
    (``config.min_validity``), the original weights are kept and the summary says why.

    Args:
        classifier: the classifier under test as loaded from classifier.ckpt (a model defuse trained).
        bug_labels: region id -> the class a person (or ``--labels auto``, on request) says its images are.
        regions: the run's regions.
        generator: decodes region samples and encodes images for the judge.
        judge: the validity judge of the identify stage.
        data: the run's data (its train, val and audit splits).
        config: the correct section of the run config.
        tau: region samples come from N(mean, tau * cov) (``distill.tau``).
        workdir: checkpoints of every (lambda, epoch), so an interrupted fine-tune resumes; emptied when they
            belong to other inputs.
        seed: the run's seed (streams ``correct.train_samples``, ``correct.val_samples``, ``correct.region_shuffle``,
            ``correct.clean_shuffle``, ``correct.guard_bootstrap``).
        trainer: accelerator and progress settings.
        reviewed: source image -> the label a person gave it on review (:func:`read_reviewed_labels`); each
            answer decides that image's label, see :func:`find_label_issues`.
    """
    if "arch" not in classifier.hparams:
        raise ValueError("Correcting a classifier you brought (TorchScript or factory) is not supported yet: "
                         "defuse can only fine-tune the classifiers it trains.")
    original = Repair(copy.deepcopy(classifier.model).eval(), classifier.hparams)
    if not bug_labels:  # nothing to learn: the repaired model is the original, and the summary says why
        log.warning("No region is labelled with a class (all are not-a-bug, skipped or unanswered): "
                    "repaired.ckpt keeps the original weights.")
        return replace(original, summary={"labelled_regions": 0, "chosen": None,
                                          "reason": "no region labelled with a class", "label_issues": 0})
    latents = encode_splits(generator, data)
    image_scores = image_witness(classifier.hparams, data, config, seed, trainer, Path(workdir).parent)
    issues = find_label_issues(regions, bug_labels, latents, judge, data, config.relabel, reviewed, image_scores)
    counts = {"reviewed_labels": int(issues["reviewed"].sum()),
              "reviewed_relabelled": int((issues["reviewed"] & issues["relabelled"]).sum()),"label_issues": len(issues), "label_issues_by_split": issues["split"].value_counts().to_dict(),
              "label_issues_by_kind": issues["kind"].value_counts().to_dict(),
              "label_issues_of_labelling_bugs": int(issues["label_bug"].sum()),
              "relabelled": bool(config.relabel)}
    if len(issues):
        bug_rows = issues[issues["label_bug"]]
        contradicted = int((bug_rows["kind"] == CONTRADICTED).sum())
        if len(bug_rows):
            log.warning("%d training/validation/audit labels contradict the person's region labels and the judge, "
                        "and the judge doubts %d more, in pairs that look like labelling bugs (label_issues.csv); "
                        "the doubted ones are left out. %s%s", contradicted, len(bug_rows) - contradicted,
                        "The contradicted ones are relabelled with the person's label (correct.relabel)."
                        if config.relabel else "The contradicted ones are left out too; to train on them under "
                        "the person's label, consent with --relabel (correct.relabel=true).",
                        "" if reviewed else f" A person can settle each of them: `defuse review --run-dir "
                        f"{Path(workdir).parent}`, then --reviewed-labels {Path(workdir).parent / LABEL_REVIEW}.")
        if len(issues) > len(bug_rows):
            log.warning("%d labels on natural boundaries of the labelled regions are doubted by the judge (too few "
                        "for a labelling bug): listed in label_issues.csv for review, and their labels stand.",
                        len(issues) - len(bug_rows))
    original = replace(original, label_issues=issues)
    train_regions = sample_regions(regions, bug_labels, generator, config.samples_per_region, tau,
                                   numpy_rng(seed, "correct.train_samples"), judge, config.min_validity)
    val_regions = sample_regions(regions, bug_labels, generator, config.val_samples_per_region, tau,
                                 numpy_rng(seed, "correct.val_samples"), judge, config.min_validity)
    if len(train_regions.labels) == 0 or len(val_regions.labels) == 0:
        log.warning("The validity judge gives none of the labelled regions' fresh samples their label with at least "
                    "correct.min_validity=%s: nothing to train on, so repaired.ckpt keeps the original weights. "
                    "Check the labels, or lower correct.min_validity (0 trains on every sample).", config.min_validity)
        return replace(original, summary={"labelled_regions": len(bug_labels), "chosen": None, **counts,
                                          "reason": "no region sample passes correct.min_validity"})
    train_regions = _without_pairs_shown_by_real_images(train_regions, regions, bug_labels, issues)
    pairs = repaired_pairs(regions, bug_labels, issues)
    real = RealImages.gather(data, issues, pairs, classifier.model, reviewed=set(reviewed or ()))
    key = _inputs_key(classifier.model, bug_labels, regions, judge, data, config, tau, seed, trainer,
                      _trained_on(issues, real, config))
    workdir = Path(workdir)
    if (workdir / "KEY").exists() and (workdir / "KEY").read_text().strip() != key:
        shutil.rmtree(workdir)  # checkpoints of other inputs: resuming from them would be wrong
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "KEY").write_text(key + "\n")
    model, summary = correct(classifier.model, data, real, train_regions, val_regions, config, workdir,
                             trainer=trainer, seed=seed,
                             scoped_classes={person for person, _ in pairs} if config.scoped else None,
                             pairs=pairs)
    moved = summary.pop("moved_for_review")
    if moved:
        issues = pd.concat([issues, _moved_rows(moved, regions, bug_labels, data)], ignore_index=True) \
            .sort_values(["split", "position"], kind="stable").reset_index(drop=True)
        original = replace(original, label_issues=issues)
        held_out = sum(split != "train" for split, _, _ in moved)
        log.warning("A candidate moves %d images labelled as a labelled region's mistake to your label (%d training "
                    "images, which go on teaching the bug; %d held-out, which the guard counts as losses): they are "
                    "listed in label_issues.csv (kind %r) for `defuse review`. Your answers on held-out images "
                    "re-grade the same candidates; on training images, they retrain.", len(moved),
                    len(moved) - held_out, held_out, MOVED)
    summary["moved_for_review"] = len(moved)
    hparams = dict(classifier.hparams)
    if isinstance(model, ScopedRepair):  # what rebuilds it: load_classifier makes the same ScopedRepair
        hparams["scoped_classes"] = model.classes.tolist()
    return replace(original, model=model, hparams=hparams, summary={"labelled_regions": len(bug_labels), **counts,
                                                   "region_samples_trained": int(len(train_regions.labels)),
                                                   "region_samples_validated": int(len(val_regions.labels)),
                                                   **summary})


def repaired_pairs(regions: Regions, bug_labels: dict[int, int], issues: pd.DataFrame | None = None
                   ) -> set[tuple[int, int]]:
    """The (true class, mistaken class) pairs the repair fixes: each region labelled with another class than the
    model's reading, and each relabelled image's (person's label, given label). The second matters where the
    person answered a region with the model's own reading: its relabelled neighbours are the bug (the model learnt
    their wrong labels), and without their pair the scope would hold the fine-tune's fix back and the choice would
    grade them as guard images (measured on the planted benchmark, thin seed 0, every split poisoned: 123 images
    relabelled on review, subgroup 0.65 -> 0.65)."""
    pairs = {(label, r.predicted_label) for r in regions.regions
             if (label := bug_labels.get(r.id, r.predicted_label)) != r.predicted_label}
    if issues is not None and len(issues):
        moved = issues[issues["relabelled"].astype(bool)]
        pairs |= {(int(person), int(given)) for person, given in zip(moved["person_label"], moved["given_label"])
                  if int(person) != int(given)}
    return pairs


def image_witness(hparams: dict[str, Any], data: ImageDataModule, config: CorrectConfig, seed: int,
                  trainer: TrainerConfig | None, root: str | Path) -> dict[str, np.ndarray] | None:
    """The image judge's probabilities on train and val for the label issues (:func:`image_judge_scores`), with the
    architecture of the classifier under test (``hparams``; the small CNN for one a user brought); None when
    ``correct.image_judge_epochs`` is 0."""
    if config.image_judge_epochs == 0 or len(data.split("audit")) == 0:
        return None
    return image_judge_scores(data, str(hparams.get("arch", "small_cnn")), int(hparams.get("width", 32)),
                              config.image_judge_epochs, seed, trainer, root)


def issues_for_review(regions: Regions, bug_labels: dict[int, int], generator: nn.Module, judge: ValidityModel,
                      data: ImageDataModule, reviewed: dict[int, int] | None = None,
                      image_scores: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The label issues a person should review before the fine-tune: every train, val and audit image of a labelling
    bug (contradicted or doubted, :func:`find_label_issues`) or within a labelled region's reach (kind "neighbour",
    :func:`neighbourhood_labels`) not reviewed yet, by region, then split and position.

    The rules relabel only what the judges are sure of; what neither is sure of is left out rather than taught,
    and a person's answer on each is the witness that settles it (measured on the planted short case, seeds 0-2,
    before the image judge: 122 to 154 doubted training images a run, 37 to 53 of them mislabelled).
    ``image_scores``: the image judge's witness (:func:`image_witness`), as the correct stage uses it."""
    latents = encode_splits(generator, data)
    table = find_label_issues(regions, bug_labels, latents, judge, data, relabel=False, reviewed=reviewed,
                              image_scores=image_scores)
    todo = table[(table["label_bug"].astype(bool) | (table["kind"] == NEIGHBOUR)) & ~table["reviewed"].astype(bool)]
    order = pd.Categorical(todo["split"], categories=list(REVIEWABLE_SPLITS), ordered=True)
    return todo.assign(_order=order).sort_values(["region", "_order", "position"], kind="stable") \
        .drop(columns="_order").reset_index(drop=True)


def _without_pairs_shown_by_real_images(samples: RegionSamples, regions: Regions, bug_labels: dict[int, int],
                                        issues: pd.DataFrame) -> RegionSamples:
    """The decoded training samples, less those of regions whose (person's label, mistake) pair has at least
    ``MIN_BUG_IMAGES`` relabelled training images: there the real images show the bug as it is, and the decoded
    samples only add the generator's rendering of it, hybrids that move real neighbours across (measured on the
    slant benchmark: held-out 1s read as 7)."""
    relabelled = issues[(issues["split"] == "train") & issues["relabelled"].astype(bool)]
    counts = relabelled.groupby(["person_label", "given_label"]).size().to_dict() if len(relabelled) else {}
    shown = [r.id for r in regions.regions if counts.get((bug_labels.get(r.id, r.predicted_label), r.predicted_label),
                                                         0) >= MIN_BUG_IMAGES]
    keep = ~torch.isin(samples.regions, torch.tensor(shown, dtype=samples.regions.dtype))
    return RegionSamples(samples.images[keep], samples.labels[keep], samples.regions[keep])


def section_by_content(section: Any) -> dict[str, Any]:
    """A config section as part of a cache key: each file or folder it names stands for what it holds (its
    digest), so data moved elsewhere keeps the fine-tune's checkpoints and data edited in place trains anew."""
    return {**asdict(section), **{key: path_digest(path) for key, path in path_fields(section).items()}}


def _trained_on(issues: pd.DataFrame, real: RealImages, config: CorrectConfig) -> str:
    """A digest of what the fine-tune reads beyond the config: the training split's label issues (what leaves the
    clean loss and what is relabelled), and, with ``correct.drift_augment``, the guard its drift box comes from.
    Held-out answers only re-grade: candidates are read on every held-out image whatever its role."""
    digest = hashlib.sha256(issues[issues["split"] == "train"].to_csv(index=False).encode())
    if config.drift_augment:
        digest.update(real.role.numpy().tobytes() + real.held_out.labels.numpy().tobytes())
    return digest.hexdigest()


def _moved_rows(moved: list[list], regions: Regions, bug_labels: dict[int, int], data: ImageDataModule
                ) -> pd.DataFrame:
    """label_issues.csv rows (kind "moved") for held-out images a candidate moves to a person's label
    (:func:`moved_to_person`), each with the region labelled that way (-1 where only relabelled images made the
    pair) and the person's label of its pair."""
    classes = data.classes
    region_of = {(bug_labels.get(r.id, r.predicted_label), r.predicted_label): r.id for r in reversed(regions.regions)}
    rows = []
    for name, position, person in moved:
        given = int(data.split(name).labels[position])
        rows.append({"split": name, "position": position, "image": int(data.indices(name)[position]), "kind": MOVED,
                     "given_label": given, "given_class": classes[given], "region": region_of.get((person, given), -1),
                     "person_label": person, "person_class": classes[person], "label_bug": False, "relabelled": False,
                     "reviewed": False, "judge_validity": np.nan, "image_judge": np.nan})
    return pd.DataFrame(rows, columns=list(LABEL_ISSUE_COLUMNS))


def _inputs_key(model: nn.Module, bug_labels: dict[int, int], regions: Regions, judge: ValidityModel,
                data: ImageDataModule, config: CorrectConfig, tau: float, seed: int,
                trainer: TrainerConfig | None, trained_on: str) -> str:
    """A fingerprint of everything the fine-tune's checkpoints depend on (weights hashed, not compared);
    ``trained_on``: :func:`_trained_on`."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    judge_hash = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in
                                         (judge.coef, judge.intercept, judge.mean, judge.scale))).hexdigest()
    trainer_fields = outcome_fields(trainer) if trainer else None
    return fingerprint({
        "weights": weights.hexdigest(), "labels": {str(k): v for k, v in sorted(bug_labels.items())},
        "regions": [(r.id, r.source_label, r.predicted_label, r.mean, r.cov) for r in regions.regions],
        # `scoped` only changes how candidates are judged, not how they are trained: their checkpoints stand. The
        # review file's answers on training images are in `trained_on`; those on held-out images only re-grade.
        "judge": judge_hash, "data": section_by_content(data.config),
        "config": {k: v for k, v in section_by_content(config).items() if k not in ("scoped", "reviewed_labels")},
        "tau": tau, "seed": seed,
        # What the fine-tune trains on and leaves out (new witnesses or answers change them, not the inputs).
        "trained_on": trained_on,
        "defuse": defuse_version(),  # a forced re-run after an upgrade must not resume the old version's epochs
    })
