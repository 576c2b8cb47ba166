"""Label issues: the real training, validation and audit images whose given label a person's region label says is
the region's mistake (:mod:`.find`), and what a person reviews of them (:mod:`.review`). Found by correct (which
relabels or leaves them out) and by ``defuse review`` (which asks a person), so they live below both."""

from defuse.label_issues.find import (
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
from defuse.label_issues.review import (
    image_witness,
    issues_for_review,
    moved_to_person,
    read_reviewed_labels,
    repaired_pairs,
)

__all__ = [
    "CONTRADICTED", "DOUBTED", "LABEL_ISSUE_COLUMNS", "MIN_BUG_IMAGES", "MOVED", "NEIGHBOUR", "REVIEWED",
    "contradicting_labels", "doubted_labels", "encode_splits", "find_label_issues", "image_judge_scores",
    "image_witness", "issues_for_review", "moved_to_person", "neighbour_shares", "neighbourhood_labels",
    "read_reviewed_labels", "repaired_pairs",
]
