"""The ML4ML assessor: reads a variance matrix's features and says whether the model is invariant to the family.

Liao et al. 2021 train a random forest on the features of models that experts labelled. We have no experts: the
zoo of ``scripts/build_zoo.py`` (small CNNs on the MNIST split, trained under varied augmentation, epochs and
anomalies) labels each model by an objective criterion, :func:`invariance_label`, measured on other test images
than the features. The zoo's feature table ships with the package (``zoo.csv``, a small text file); the assessor
is rebuilt from it deterministically when a check needs it, so no fitted model is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier

from defuse.invariance.variance import FEATURES

# A model is invariant to a family when no value of its grid costs more than this much accuracy against the
# identity (on images the features never read).
MAX_ACCURACY_DROP = 0.03
ZOO_TABLE = "zoo.csv"
TREES = 200
ASSESSOR_SEED = 0  # the forest's fixed seed: the shipped verdicts do not depend on the run's seed


def invariance_label(grid_accuracy: np.ndarray, identity_index: int) -> int:
    """1 (invariant) if every grid value's accuracy is within ``MAX_ACCURACY_DROP`` of the identity's, else 0."""
    grid_accuracy = np.asarray(grid_accuracy, dtype=np.float64)
    return int(grid_accuracy[identity_index] - grid_accuracy.min() <= MAX_ACCURACY_DROP + 1e-9)  # rounding


def feature_columns(family: str) -> list[str]:
    """The zoo table's columns that hold ``family``'s matrix features."""
    return [f"{family}.{name}" for name in FEATURES]


class Assessor:
    """A random forest on one family's variance-matrix features (scikit-learn's estimator contract).

    Args:
        trees: number of trees.
        random_state: the forest's seed.
    """

    def __init__(self, trees: int = TREES, random_state: int = ASSESSOR_SEED) -> None:
        self.trees = trees
        self.random_state = random_state

    def fit(self, features: np.ndarray, labels: np.ndarray) -> Assessor:
        labels = np.asarray(labels)
        if len(np.unique(labels)) < 2:
            raise ValueError(f"`labels` must hold both verdicts (invariant and not) to train an assessor, got only "
                             f"{np.unique(labels).tolist()} instead: the zoo needs more varied recipes.")
        self.forest_ = RandomForestClassifier(n_estimators=self.trees, random_state=self.random_state,
                                              min_samples_leaf=2).fit(np.asarray(features), labels)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(invariant) for each row of features (N, len(FEATURES))."""
        proba = self.forest_.predict_proba(np.atleast_2d(features))
        return proba[:, list(self.forest_.classes_).index(1)]


@dataclass(frozen=True)
class Verdict:
    """The assessor's answer for one family: ``invariant`` with probability ``probability``, and what it was
    trained on."""

    invariant: bool
    probability: float
    trained_on: str


def load_zoo() -> pd.DataFrame | None:
    """The shipped zoo table, or ``None`` when this installation has none (build it with scripts/build_zoo.py)."""
    path = resources.files("defuse.invariance").joinpath(ZOO_TABLE)
    if not path.is_file():
        return None
    with path.open("r") as handle:
        return pd.read_csv(handle)


@lru_cache(maxsize=8)
def shipped_assessor(family: str) -> tuple[Assessor, str] | None:
    """The assessor of ``family`` fitted on the shipped zoo (deterministic), with a description; ``None``
    without a zoo table or without both verdicts in it."""
    zoo = load_zoo()
    label = f"{family}.invariant"
    if zoo is None or label not in zoo or zoo[label].nunique() < 2:
        return None
    assessor = Assessor().fit(zoo[feature_columns(family)].to_numpy(), zoo[label].to_numpy())
    return assessor, (f"{len(zoo)} zoo models of scripts/build_zoo.py ({int(zoo[label].sum())} invariant to "
                      f"{family}: no grid value costs more than {MAX_ACCURACY_DROP:.0%} accuracy)")


def verdict(family: str, features: dict[str, float]) -> Verdict | None:
    """The shipped assessor's verdict on one matrix's features; ``None`` when there is no assessor."""
    fitted = shipped_assessor(family)
    if fitted is None:
        return None
    assessor, description = fitted
    probability = float(assessor.predict_proba(np.array([[features[name] for name in FEATURES]]))[0])
    return Verdict(probability >= 0.5, round(probability, 3), description)
