"""Effective Invariance (Deng, Gould and Zheng, NeurIPS 2022): how much a prediction survives a transform, without
labels.

Notation: p = softmax(f(x)) with argmax y and maximum p^; p_t, y_t, p^_t the same on a transformed view T(x).
For one image and one view ``EI = sqrt(p^ * p^_t)`` when ``y_t == y``, else 0: 1 for a confident, unchanged
prediction, 0 for a changed one. A transform with several views (the paper's rotation: 90, 180 and 270 degrees)
scores an image by the mean over its views; a set of images by the mean over images.

Beside mean EI each transform reports the agreement rate (``y_t == y``), the mean confidence under the
transform (p^_t) and, where labels exist, the accuracy under the transform, each with a 95% percentile
bootstrap interval over images, overall and per class (by true label). :func:`compare_ei` compares two models
on the same images: the paired per-image EI difference, flagged a regression when it drops by more than
``REGRESSION_DROP`` and its interval excludes 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from defuse.models.inference import predict_logits
from defuse.stats import Estimate, bootstrap_means
from defuse.transforms import EI_TRANSFORMS, ei_views

REGRESSION_DROP = 0.01  # EI points a repair may lose before a significant drop is called a regression


def effective_invariance(probs: torch.Tensor, transformed_probs: torch.Tensor) -> torch.Tensor:
    """Per-image EI (N,) from softmax outputs (N, K) of the original and of one transformed view."""
    if probs.shape != transformed_probs.shape or probs.dim() != 2:
        raise ValueError(f"`probs` and `transformed_probs` must both be (N, K), got {tuple(probs.shape)} and "
                         f"{tuple(transformed_probs.shape)} instead.")
    confidence, label = probs.max(dim=1)
    confidence_t, label_t = transformed_probs.max(dim=1)
    return torch.where(label == label_t, (confidence * confidence_t).sqrt(), torch.zeros_like(confidence))


@dataclass(frozen=True)
class PerImage:
    """One transform's per-image figures, each the mean over the transform's views: ``ei``, ``agree``
    (share of views that keep the prediction), ``confidence`` (p^_t) and ``correct`` (share of views read as the
    label; ``None`` without labels)."""

    ei: np.ndarray
    agree: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray | None


@torch.no_grad()
def per_image_scores(model: nn.Module, images: torch.Tensor, transform: str,
                     labels: torch.Tensor | None = None) -> PerImage | None:
    """The per-image figures of ``model`` on ``images`` (N, C, H, W) under ``transform`` (one of
    :data:`~defuse.transforms.EI_TRANSFORMS`); ``None`` when the transform does not apply to them."""
    views = ei_views(transform, images.shape[1], images.shape[-1])
    if views is None:
        return None
    probs = predict_logits(model, images).softmax(dim=1)
    broken = int((~torch.isfinite(probs).all(dim=1)).sum())
    if broken:  # NaN compares unequal to everything: EI and every verdict after it would be silently wrong
        raise ValueError(f"The classifier's outputs are NaN or infinite on {broken} of {len(images)} images: its "
                         f"weights or its normalisation (a zero std?) are broken. Check the checkpoint before "
                         f"checking its invariances.")
    totals = {name: torch.zeros(len(images), dtype=torch.float64) for name in ("ei", "agree", "confidence", "correct")}
    for view in views:
        transformed = predict_logits(model, view.apply(images)).softmax(dim=1)
        confidence_t, label_t = transformed.max(dim=1)
        totals["ei"] += effective_invariance(probs, transformed).double()
        totals["agree"] += (label_t == probs.argmax(dim=1)).double()
        totals["confidence"] += confidence_t.double()
        if labels is not None:
            totals["correct"] += (label_t == labels).double()
    mean = {name: (value / len(views)).numpy() for name, value in totals.items()}
    return PerImage(mean["ei"], mean["agree"], mean["confidence"], mean["correct"] if labels is not None else None)


@dataclass(frozen=True)
class TransformEI:
    """One transform's figures on one model: overall and per class (class index -> figures).

    ``applicable`` is False for a transform these images cannot take (grayscale on one channel): then every
    figure is absent, which is not a pass."""

    transform: str
    applicable: bool
    images: int = 0
    ei: Estimate | None = None
    agreement: Estimate | None = None
    confidence: Estimate | None = None
    accuracy: Estimate | None = None
    per_class: dict[int, dict[str, Estimate | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(scores: PerImage | None, transform: str, rng: np.random.Generator,
              labels: np.ndarray | None = None) -> TransformEI:
    """Bootstrap estimates of one transform's per-image figures, overall and per class of ``labels``."""
    if scores is None:
        return TransformEI(transform, applicable=False)

    def estimates(rows: np.ndarray | slice) -> dict[str, Estimate | None]:
        return {"ei": bootstrap_means(scores.ei[rows], rng), "agreement": bootstrap_means(scores.agree[rows], rng),
                "confidence": bootstrap_means(scores.confidence[rows], rng),
                "accuracy": bootstrap_means(scores.correct[rows], rng) if scores.correct is not None else None}

    per_class = {}
    if labels is not None:
        per_class = {int(k): estimates(np.flatnonzero(labels == k)) for k in np.unique(labels)}
    return TransformEI(transform, True, len(scores.ei), **estimates(slice(None)), per_class=per_class)


@dataclass(frozen=True)
class EIChange:
    """The paired per-image EI change after - before of one transform, with its 95% bootstrap interval, and
    whether it is a regression (a drop larger than ``REGRESSION_DROP`` whose interval excludes 0)."""

    transform: str
    change: Estimate
    regression: bool


def compare_ei(before: np.ndarray | None, after: np.ndarray | None, transform: str,
               rng: np.random.Generator) -> EIChange | None:
    """The paired change of mean EI between two models' per-image EI (N,) on the same images (``None`` where the
    transform does not apply to either)."""
    if before is None or after is None:
        return None
    if len(before) != len(after):
        raise ValueError(f"`before` and `after` must score the same images, got {len(before)} and {len(after)} "
                         "instead.")
    change = bootstrap_means(np.asarray(after) - np.asarray(before), rng)
    return EIChange(transform, change, regression=bool(change.mean < -REGRESSION_DROP and change.high < 0))


__all__ = ["EI_TRANSFORMS", "EIChange", "PerImage", "TransformEI", "compare_ei", "effective_invariance",
           "per_image_scores", "summarize"]
