"""Correction: fine-tune the classifier on corrected labels and the labelled regions, keeping clean accuracy on
images it never saw.

The loss and how the fine-tune holds the original's answers: :mod:`defuse.correct.finetune`.

Why real images: a fine-tune on decoded samples alone learns the generator's smooth rendering of a bug, not the
bug (measured on the planted benchmark: 99.8% on decoded validation samples, 0.61 on the real subgroup). And a
region batch in every step (decoded samples with the relabelled real images, repeated) moves real neighbours
across (measured on the planted benchmark, seed 1: held-out 2s and 9s read as 7 after the slant repair,
held-out accuracy -0.4 to -1.1 points). The corrected labels in the training set, the relabelled images twice,
fixed the same bugs at -0.18 to 0.0 points of held-out accuracy.

The stage in modules a newcomer can read one at a time:

- :mod:`defuse.correct.issues`: label issues, the images whose labels a person's region labels put in doubt;
- :mod:`defuse.correct.review`: what a person reviews (before the fine-tune, and what the repair moves after it);
- :mod:`defuse.correct.images`: decoded region samples and real images by role;
- :mod:`defuse.correct.finetune`: the Lightning fine-tune;
- :mod:`defuse.correct.candidates`: every candidate read on the held-out images, and the choice;
- :mod:`defuse.correct.stage`: :func:`repair`, the stage that brings them together.
"""

from defuse.artifacts import CORRECT_DIR, LABEL_ISSUES, LABEL_REVIEW, REPAIRED_CKPT
from defuse.correct.candidates import choose_candidate, correct
from defuse.correct.finetune import CorrectionModule, candidate_weights, drift_box
from defuse.correct.images import RealImages, RegionSamples, sample_regions
from defuse.correct.issues import (
    CONTRADICTED,
    DOUBTED,
    LABEL_ISSUE_COLUMNS,
    MIN_BUG_IMAGES,
    MOVED,
    NEIGHBOUR,
    REVIEWED,
    contradicting_labels,
    doubted_labels,
    encode_splits,
    find_label_issues,
    image_judge_scores,
    neighbour_shares,
    neighbourhood_labels,
)
from defuse.correct.review import (
    image_witness,
    issues_for_review,
    moved_to_person,
    read_reviewed_labels,
    repaired_pairs,
)
from defuse.correct.stage import Repair, repair

__all__ = [
    "CONTRADICTED", "CORRECT_DIR", "CorrectionModule", "DOUBTED", "LABEL_ISSUES", "LABEL_ISSUE_COLUMNS", "LABEL_REVIEW",
    "MIN_BUG_IMAGES", "MOVED", "NEIGHBOUR", "REPAIRED_CKPT", "REVIEWED", "RealImages", "RegionSamples", "Repair",
    "candidate_weights", "choose_candidate", "contradicting_labels", "correct", "doubted_labels", "drift_box",
    "encode_splits", "find_label_issues", "image_judge_scores", "image_witness", "issues_for_review",
    "moved_to_person", "neighbour_shares", "neighbourhood_labels", "read_reviewed_labels", "repair",
    "repaired_pairs", "sample_regions",
]
