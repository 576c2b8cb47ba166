"""The validity model: how likely a latent still belongs to a class, judged without the classifier.

A multinomial logistic regression on standardised encoder means of the training
images. It is deliberately low-capacity: a linear model cannot carve out a small
mislabelled subgroup of the training data, so it keeps calling a slanted 7 a 7
even when the training labels of such 7s were poisoned, while the classifier under
test learned the poison. Its argmax is also the suggested label of a region.

Stored as ``validity.npz`` (plain arrays, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from defuse.rundir import atomic_write_bytes


@dataclass(frozen=True)
class ValidityModel:
    """``predict_proba(z)``: (N, latent_dim) -> (N, K) class probabilities."""

    mean: np.ndarray  # (latent_dim,)
    scale: np.ndarray  # (latent_dim,)
    coef: np.ndarray  # (K, latent_dim)
    intercept: np.ndarray  # (K,)
    train_accuracy: float

    @classmethod
    def fit(cls, latents: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0) -> "ValidityModel":
        """Fit on encoder means (N, latent_dim) and labels (N,)."""
        if not np.isfinite(latents).all():
            raise ValueError("Training latents contain NaN or infinite values: the generator's encoder is broken.")
        mean = latents.mean(axis=0)
        scale = latents.std(axis=0) + 1e-6
        model = LogisticRegression(C=1.0, max_iter=500, random_state=seed)
        model.fit((latents - mean) / scale, labels)
        coef = np.zeros((num_classes, latents.shape[1]))
        intercept = np.full(num_classes, -1e9)  # a class absent from training gets probability 0
        coef[model.classes_] = model.coef_ if len(model.classes_) > 2 else np.vstack([-model.coef_, model.coef_]) / 2
        intercept[model.classes_] = (
            model.intercept_ if len(model.classes_) > 2 else np.array([-model.intercept_[0], model.intercept_[0]]) / 2
        )
        out = cls(mean, scale, coef, intercept, 0.0)
        accuracy = float((out.predict_proba(latents).argmax(1) == labels).mean())
        return cls(mean, scale, coef, intercept, accuracy)

    def predict_proba(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        z = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
        logits = ((z - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept,
                 train_accuracy=np.array(self.train_accuracy))
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "ValidityModel":
        with np.load(path, allow_pickle=False) as f:
            return cls(f["mean"], f["scale"], f["coef"], f["intercept"], float(f["train_accuracy"]))
