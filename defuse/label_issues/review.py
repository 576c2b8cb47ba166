"""A person's review: the label issues to answer before the fine-tune, what the repair moves after it, and
the answers read back.

*What the repair moves, the person settles.* Where every split carries a labelling bug, the bug's images that no
rule reached keep the mistaken label: in the guard, a candidate that fixes them loses them; in the clean loss, they
go on teaching the bug. Every candidate is read on every held-out and clean training image, and those labelled
with a repaired pair's mistake that a candidate moves to the person's label are listed (kind "moved",
:func:`moved_to_person`) for ``defuse review``; each answer relabels its image or confirms its label. Answers on
held-out images re-grade the same checkpoints (the key holds only what the fine-tune trains on); answers on
training images retrain. No model fitted on the same labels decides them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from defuse.config import CorrectConfig, TrainerConfig
from defuse.data import ImageDataModule
from defuse.label_issues.find import (
    LABEL_ISSUE_COLUMNS,
    MOVED,
    REVIEWABLE_SPLITS,
    encode_splits,
    find_label_issues,
    image_judge_scores,
)
from defuse.records import Regions, parse_label
from defuse.validity import ValidityModel

log = logging.getLogger(__name__)


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


def issues_for_review(regions: Regions, bug_labels: dict[int, int], generator: nn.Module, judge: ValidityModel,
                      data: ImageDataModule, reviewed: dict[int, int] | None = None,
                      image_scores: dict[str, np.ndarray] | None = None,
                      training_aum: np.ndarray | None = None) -> pd.DataFrame:
    """The label issues a person should review before the fine-tune: every train, val and audit image listed for a
    labelled region (contradicted, doubted, :func:`find_label_issues`, or within its reach, kind "neighbour",
    :func:`neighbourhood_labels`) not reviewed yet, by region, then split, then (training images, given
    ``training_aum``: each training image's area under the margin, fit-classifier's training margins) the hardest
    learnt first, then position. A person who stops early has then seen the likeliest errors: on the planted
    benchmark's listed training issues (every split but test poisoned, seeds 0-2) the lowest-AUM rows held
    poisoned labels at precision 0.63-0.78 against 0.30-0.42 for the list as a whole
    (benchmarks/records/probe_training_margins.json).

    The rules relabel only what the judges are sure of, and where every split carries the bug the judges, fitted on
    its labels, declare no pair a labelling bug: its contradicted and doubted images then keep the mistaken label
    in the clean loss and go on teaching the bug. So all of them are asked, not only a labelling bug's: the
    person's answer on each settles it (planted short case, seed 0, every split but test poisoned: 7 contradicted
    and 19 doubted poisoned images of a pair no rule declared were never asked; 109 doubted genuine 7s are the
    extra work).
    ``image_scores``: the image judge's witness (:func:`image_witness`), as the correct stage uses it."""
    latents = encode_splits(generator, data)
    table = find_label_issues(regions, bug_labels, latents, judge, data, relabel=False, reviewed=reviewed,
                              image_scores=image_scores)
    todo = table[~table["reviewed"].astype(bool)]
    order = pd.Categorical(todo["split"], categories=list(REVIEWABLE_SPLITS), ordered=True)
    hardest = np.zeros(len(todo))
    if training_aum is not None and len(training_aum) == len(data.split("train")):
        train = (todo["split"] == "train").to_numpy()
        hardest[train] = training_aum[todo["position"].to_numpy()[train]]
    return todo.assign(_order=order, _hardest=hardest) \
        .sort_values(["region", "_order", "_hardest", "position"], kind="stable") \
        .drop(columns=["_order", "_hardest"]).reset_index(drop=True)


def image_witness(hparams: dict[str, Any], data: ImageDataModule, config: CorrectConfig, seed: int,
                  trainer: TrainerConfig | None, root: str | Path) -> dict[str, np.ndarray] | None:
    """The image judge's probabilities on train and val for the label issues (:func:`image_judge_scores`), with the
    architecture of the classifier under test (``hparams``; the small CNN for one a user brought); None when
    ``correct.image_judge_epochs`` is 0."""
    if config.image_judge_epochs == 0 or len(data.split("audit")) == 0:
        return None
    return image_judge_scores(data, str(hparams.get("arch", "small_cnn")), int(hparams.get("width", 32)),
                              config.image_judge_epochs, seed, trainer, root)


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
