"""The correct stage: label issues, region samples and the fine-tune's candidates brought together
(:func:`repair`), resumable from the checkpoints of the same inputs.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from defuse.artifacts import LABEL_REVIEW
from defuse.config import CorrectConfig, TrainerConfig, outcome_fields, path_fields
from defuse.data import ImageDataModule
from defuse.label_issues.find import (
    CONTRADICTED,
    LABEL_ISSUE_COLUMNS,
    MIN_BUG_IMAGES,
    MOVED,
    encode_splits,
    find_label_issues,
)
from defuse.label_issues.review import _moved_rows, image_witness, repaired_pairs
from defuse.models.inference import copy_model
from defuse.models.loading import LoadedClassifier, save_classifier
from defuse.records import Regions
from defuse.rundir import defuse_version, fingerprint, path_digest
from defuse.seeding import numpy_rng
from defuse.stages.correct.candidates import correct
from defuse.stages.correct.images import RealImages, RegionSamples, sample_regions
from defuse.validity import ValidityModel

log = logging.getLogger(__name__)


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
    def load(cls, path: str | Path) -> Repair:
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
        classifier: the classifier under test as loaded from classifier.ckpt (one defuse trained, or a TorchScript or factory module a user brought: its repair is saved the same way).
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
    original = Repair(copy_model(classifier.model).eval(), classifier.hparams)
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
                             trainer=trainer, seed=seed, pairs=pairs)
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
    return replace(original, model=model, hparams=dict(classifier.hparams), summary={"labelled_regions": len(bug_labels), **counts,
                                                   "region_samples_trained": int(len(train_regions.labels)),
                                                   "region_samples_validated": int(len(val_regions.labels)),
                                                   **summary})


# Correct settings that leave the fine-tune's checkpoints as they are: how candidates are judged and chosen
# (the guard's bounds), the person's answers on held-out images (`reviewed_labels`; answers on training
# images are in what it trains on), and which (layers, lambda) families are candidates: each trains in its own
# folder (lambda_<l>, head_lambda_<l>) from the same seed, so a family dropped from `layers` or `lambdas` and
# brought back, or one added, leaves the others' epochs standing. A changed choice re-grades the same checkpoints.
CHOICE_ONLY = ("reviewed_labels", "layers", "lambdas", "max_clean_drop", "max_class_drop")


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
        # Settings that only choose among the candidates or name which families train (each family in a folder of
        # its own, seeded alike whatever else trains) leave every checkpoint standing: see CHOICE_ONLY. The review
        # file's answers on training images are in `trained_on`; those on held-out images only re-grade.
        "judge": judge_hash, "data": section_by_content(data.config),
        "config": {k: v for k, v in section_by_content(config).items() if k not in CHOICE_ONLY},
        "tau": tau, "seed": seed, "trainer": trainer_fields,
        # What the fine-tune trains on and leaves out (new witnesses or answers change them, not the inputs).
        "trained_on": trained_on,
        "defuse": defuse_version(),  # a forced re-run after an upgrade must not resume the old version's epochs
    })
