"""ML4ML variance matrices (Liao, Zhang and Chen 2021) and the features an assessor reads from them.

For a family of transforms (rotation, brightness, scale) and its grid of n = 31 values t_0..t_30
(:data:`~defuse.transforms.GRIDS`, the identity in the middle), the *confidence table* C is (n, N):
C[i, k] is the model's maximum softmax probability on image k transformed by t_i (the confidence of whatever
class it predicts there, as in the reference code). The variance matrix is

    M[i, j] = ||C[i] - C[j]||_2 / sqrt(N),

the root-mean-square change of confidence between two transform values: symmetric, zero on the diagonal, in
[0, 1]. A model invariant to the family has a flat, dark matrix; one that is not grows bright away from the
diagonal. Matrices are built separately for the images the model reads correctly at the identity and those it
reads wrongly (the assessor reads the correct ones), and optionally per class.

Features (:func:`matrix_features`), following the reference code (``measurement.py``, ``utils.py``), where our
choice differs it says so:

* ``mean``, ``mean_square``, ``std`` of the n^2 cells; ``share_above`` the share of cells above 0.15.
* ``discontinuity``: sum over off-diagonals d = 1..n-1 of (n-d)/n * std(cells of that diagonal), over the mean
  off-diagonal cell m. Stripes across the diagonals mean a few transform values behave unlike their neighbours.
* ``asymmetry``: mean over cells with a + b >= n of |M[a, b] - M[n-1-b, n-1-a]| / m: whether t and -t (mirrored
  about the identity) hurt alike.
* Gradients, signed, on the upper triangle, both pointing away from the diagonal (positive when the matrix grows
  smoothly): horizontal ``M[r, b+1] - M[r, b]``, vertical ``M[r-1, b] - M[r, b]``, diagonal
  ``M[r-1, b+1] - M[r, b]``. For each: mean and std over cells, and ``wstd`` the mean of the per-column (h) or
  per-row (v, d) stds. ``gradient_overall`` = mean over the three of mean / wstd. Ours: the reference's diagonal
  statistics read the vertical gradient (a bug) and its cells skip the centre rows; we use the true diagonal
  and every cell. We also keep the raw matrix (its zero diagonal) where the reference first overwrites the
  diagonal and the centre 3x3 block with neighbouring values, which hides the smallest transforms.
* ``subsample_sensitivity``: the mean absolute cell difference between the matrix of a random 90% of the
  images and the full one (the reference sums the cells; a mean does not grow with n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from defuse.models.inference import predict_logits
from defuse.transforms import GRID_TRANSFORMS, GRIDS, IDENTITY_INDEX

BRIGHT_CELL = 0.15  # the reference's threshold for a cell that shows variance
SUBSAMPLE = 0.9
GRADIENT_FLOOR = 1e-4  # on cells in [0, 1]; gradients of a model that varies are 1e-3 to 1e-1
FEATURES = ("mean", "mean_square", "std", "share_above", "discontinuity", "asymmetry",
            "h_mean", "h_std", "h_wstd", "v_mean", "v_std", "v_wstd", "d_mean", "d_std", "d_wstd",
            "gradient_overall", "subsample_sensitivity")


@torch.no_grad()
def confidence_table(model: nn.Module, images: torch.Tensor, family: str) -> tuple[np.ndarray, np.ndarray]:
    """(C, predicted): C (n, N) max-softmax confidences of ``model`` over ``family``'s grid; predicted (n, N) the
    class it reads at each value. One batched pass per grid value."""
    if family not in GRIDS:
        raise ValueError(f"`family` must be one of {', '.join(GRIDS)}, got {family!r} instead.")
    confidences, predicted = [], []
    for value in GRIDS[family]:
        probs = predict_logits(model, GRID_TRANSFORMS[family](images, float(value))).softmax(dim=1)
        top = probs.max(dim=1)
        confidences.append(top.values.double().numpy())
        predicted.append(top.indices.numpy())
    return np.stack(confidences), np.stack(predicted)


def variance_matrix(table: np.ndarray) -> np.ndarray:
    """M (n, n) from a confidence table (n, N): M[i, j] = ||C[i] - C[j]|| / sqrt(N); zeros for no images."""
    n, count = table.shape
    if count == 0:
        return np.zeros((n, n))
    squares = (table**2).sum(axis=1)
    gram = table @ table.T
    distances = np.clip(squares[:, None] + squares[None, :] - 2 * gram, 0.0, None) / count
    matrix = np.sqrt(distances)
    np.fill_diagonal(matrix, 0.0)
    return (matrix + matrix.T) / 2  # exactly symmetric despite rounding


def _gradient_stats(values: np.ndarray, valid: np.ndarray, group_axis: int) -> tuple[float, float, float]:
    """(mean, std, wstd) of the gradient cells where ``valid``; wstd: mean std within each row (axis 1) or
    column (axis 0) that holds at least two cells."""
    cells = values[valid]
    if len(cells) == 0:
        return 0.0, 0.0, 0.0
    groups = [values[i][valid[i]] if group_axis == 1 else values[:, i][valid[:, i]] for i in range(values.shape[0])]
    within = [g.std() for g in groups if len(g) >= 2]
    return float(cells.mean()), float(cells.std()), float(np.mean(within)) if within else 0.0


def matrix_features(matrix: np.ndarray, subsampled: np.ndarray | None = None) -> dict[str, float]:
    """The features of a variance matrix (n, n) (see the module docstring); ``subsampled``: the matrix of a
    random 90% of the same images, for ``subsample_sensitivity`` (0 without it)."""
    n = len(matrix)
    off_mean = matrix.sum() / (n * n - n)
    scale = off_mean if off_mean > 0 else 1.0  # a flat zero matrix: nothing to normalise, every ratio is 0
    diagonals = [np.diagonal(matrix, d) for d in range(1, n)]
    discontinuity = sum((n - d) / n * diag.std() for d, diag in zip(range(1, n), diagonals)) / scale
    a, b = np.indices((n, n))
    below = a + b >= n
    asymmetry = np.abs(matrix[a[below], b[below]] - matrix[n - 1 - b[below], n - 1 - a[below]]).mean() / scale
    r, c = np.indices((n - 1, n - 1))
    upper = c >= r  # cells (r, c) of the upper triangle with a right / upper neighbour
    horizontal = matrix[:-1, 1:] - matrix[:-1, :-1]  # M[r, c+1] - M[r, c], r, c < n-1
    vertical = matrix[:-1, 1:] - matrix[1:, 1:]  # M[r-1, b] - M[r, b] with r = row+1, b = col+1
    diagonal = matrix[: n - 2, 2:] - matrix[1 : n - 1, 1 : n - 1]  # M[r-1, b+1] - M[r, b], 1 <= r <= b <= n-2
    rd, cd = np.indices(diagonal.shape)
    stats = {
        "h": _gradient_stats(horizontal, upper, group_axis=0),
        "v": _gradient_stats(vertical, upper, group_axis=1),
        "d": _gradient_stats(diagonal, cd >= rd, group_axis=1),
    }
    features = {"mean": float(matrix.mean()), "mean_square": float((matrix**2).mean()), "std": float(matrix.std()),
                "share_above": float((matrix > BRIGHT_CELL).mean()), "discontinuity": float(discontinuity),
                "asymmetry": float(asymmetry)}
    for name, (mean, std, wstd) in stats.items():
        features.update({f"{name}_mean": mean, f"{name}_std": std, f"{name}_wstd": wstd})
    # wstd floored at GRADIENT_FLOOR: a perfectly smooth matrix has wstd 0 (or rounding noise), not an infinite
    # feature.
    features["gradient_overall"] = float(np.mean([m / max(w, GRADIENT_FLOOR) for m, _, w in stats.values()]))
    features["subsample_sensitivity"] = (float(np.abs(matrix - subsampled).mean()) if subsampled is not None
                                         else 0.0)
    return features


@dataclass(frozen=True)
class FamilyVariance:
    """One family's variance matrices on a set of images: ``correct`` / ``incorrect`` (the images read right or
    wrong at the identity), ``per_class`` (class -> matrix of its correct images, when asked), the features of the
    correct matrix, and how many images each holds."""

    family: str
    grid: np.ndarray
    correct: np.ndarray
    incorrect: np.ndarray
    features: dict[str, float]
    counts: dict[str, int]
    per_class: dict[int, np.ndarray]


def family_variance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, family: str,
                    rng: np.random.Generator, per_class: bool = False) -> FamilyVariance:
    """The variance matrices of ``model`` on ``images`` (N, C, H, W) with ``labels`` (N,) over ``family``'s grid.

    ``rng`` draws the 90% subsample of the correct images (``subsample_sensitivity``)."""
    table, predicted = confidence_table(model, images, family)
    right = predicted[IDENTITY_INDEX] == labels.numpy()
    correct_table = table[:, right]
    subset = rng.choice(correct_table.shape[1], size=int(round(SUBSAMPLE * correct_table.shape[1])), replace=False)
    correct = variance_matrix(correct_table)
    classes = {}
    if per_class:
        y = labels.numpy()
        classes = {int(k): variance_matrix(table[:, right & (y == k)]) for k in np.unique(y)}
    return FamilyVariance(family, GRIDS[family], correct, variance_matrix(table[:, ~right]),
                          matrix_features(correct, variance_matrix(correct_table[:, subset])),
                          {"correct": int(right.sum()), "incorrect": int((~right).sum())}, classes)


__all__ = ["FEATURES", "FamilyVariance", "confidence_table", "family_variance", "matrix_features",
           "variance_matrix"]
