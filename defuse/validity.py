"""The validity model: how likely a latent still belongs to a class, judged without the classifier.

Two parts, both fitted on standardised encoder means of held-out labelled images (the
``identify.validity_split``, by default the audit split the search starts from; never the test
split, which grades the repair, and never the classifier's training labels, whose errors are among
the bugs to find):

* a multinomial logistic regression, P(class | z). It is deliberately low-capacity: a linear model cannot carve out a small
mislabelled subgroup of the training data, so it keeps calling a slanted 7 a 7
even when the training labels of such 7s were poisoned, while the classifier under
test learned the poison. Its argmax is also the suggested label of a region.
* a support term per class: a Ledoit-Wolf Gaussian of the class's training latents and the
  99th percentile of their squared Mahalanobis distances. Inside that ellipsoid the support
  is 1; outside it decays like the Gaussian's density ratio. A linear model is confident far
  from any data, so without this an off-manifold blob would count as "valid".

``validity(z, k) = P(k | z) * support_k(z)``.

Stored as ``validity.npz`` (plain arrays, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from torch import nn

from defuse.rundir import atomic_write_bytes


@dataclass(frozen=True)
class ValidityModel:
    """``predict_proba(z)``: (N, latent_dim) -> (N, K) class probabilities."""

    mean: np.ndarray  # (latent_dim,)
    scale: np.ndarray  # (latent_dim,)
    coef: np.ndarray  # (K, latent_dim)
    intercept: np.ndarray  # (K,)
    class_means: np.ndarray  # (K, latent_dim), standardised space
    class_precisions: np.ndarray  # (K, latent_dim, latent_dim)
    class_thresholds: np.ndarray  # (K,), 99th percentile of training squared Mahalanobis distances
    train_accuracy: float

    @classmethod
    def fit(cls, latents: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0) -> ValidityModel:
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
        d = latents.shape[1]
        standard = (latents - mean) / scale
        class_means = np.zeros((num_classes, d))
        precisions = np.tile(np.eye(d), (num_classes, 1, 1))
        thresholds = np.full(num_classes, np.inf)
        for k in np.unique(labels):
            members = standard[labels == k]
            if len(members) <= d:  # too few to estimate a covariance: no support restriction for this class
                class_means[k] = members.mean(axis=0)
                continue
            estimate = LedoitWolf().fit(members)
            class_means[k], precisions[k] = estimate.location_, estimate.precision_
            diff = members - estimate.location_
            thresholds[k] = np.quantile(np.einsum("nd,de,ne->n", diff, estimate.precision_, diff), 0.99)
        out = cls(mean, scale, coef, intercept, class_means, precisions, thresholds, 0.0)
        accuracy = float((out.predict_proba(latents).argmax(1) == labels).mean())
        return replace(out, train_accuracy=accuracy)

    def predict_proba(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        z = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
        logits = ((z - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def support(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, K) in [0, 1]: 1 inside each class's 99% training ellipsoid, decaying outside it."""
        z = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
        standard = (z - self.mean) / self.scale
        diff = standard[:, None, :] - self.class_means[None]  # (N, K, d)
        m2 = np.einsum("nkd,kde,nke->nk", diff, self.class_precisions, diff)
        excess = np.maximum(m2 - self.class_thresholds[None], 0.0)
        return np.exp(-0.5 * excess)

    def scores(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, K): validity of every class, P(k | z) * support_k(z)."""
        return self.predict_proba(latents) * self.support(latents)

    def validity(self, latents: np.ndarray | torch.Tensor, labels: np.ndarray) -> np.ndarray:
        """(N,): validity of each latent's own class ``labels``."""
        labels = np.asarray(labels, dtype=np.int64)
        return self.scores(latents)[np.arange(len(labels)), labels]

    def judge(self) -> LatentJudge:
        """The same validity as a torch module, for screening candidates inside the search on any device."""
        return LatentJudge(self)

    def save(self, path: str | Path) -> None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept,
                 class_means=self.class_means, class_precisions=self.class_precisions,
                 class_thresholds=self.class_thresholds, train_accuracy=np.array(self.train_accuracy))
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ValidityModel:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["mean"], f["scale"], f["coef"], f["intercept"], f["class_means"], f["class_precisions"],
                       f["class_thresholds"], float(f["train_accuracy"]))


class LatentJudge(nn.Module):
    """``forward(z, labels)`` -> (N,) validity of each latent's own class, as :meth:`ValidityModel.validity`.

    Costs two small matrix products per latent and no classifier query, so the search can screen many
    candidates for each one it asks the classifier about.
    """

    def __init__(self, model: ValidityModel) -> None:
        super().__init__()
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.register_buffer("mean", as_tensor(model.mean))
        self.register_buffer("scale", as_tensor(model.scale))
        self.register_buffer("coef", as_tensor(model.coef))
        self.register_buffer("intercept", as_tensor(model.intercept))
        self.register_buffer("class_means", as_tensor(model.class_means))
        self.register_buffer("class_precisions", as_tensor(model.class_precisions))
        self.register_buffer("class_thresholds", as_tensor(model.class_thresholds))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        standard = (z.float() - self.mean) / self.scale
        probability = torch.softmax(standard @ self.coef.T + self.intercept, dim=1).gather(1, labels[:, None])[:, 0]
        diff = standard - self.class_means[labels]
        m2 = torch.einsum("nd,nde,ne->n", diff, self.class_precisions[labels], diff)
        return probability * torch.exp(-0.5 * (m2 - self.class_thresholds[labels]).clamp_min(0.0))


def standardised_distance(z: np.ndarray, validity: ValidityModel, centre: np.ndarray) -> np.ndarray:
    """Euclidean distances (N,) of latents ``z`` (N, d) to ``centre`` in the validity model's standardised space."""
    return np.linalg.norm((z - validity.mean) / validity.scale - (centre - validity.mean) / validity.scale, axis=1)


def nearest_of_class(z: np.ndarray, labels: np.ndarray, label: int, centre: np.ndarray, validity: ValidityModel,
                     k: int) -> np.ndarray:
    """Positions of the ``k`` latents ``z`` with ``labels == label`` nearest ``centre`` in the validity model's
    standardised latent space, nearest first: the rule behind a region's real evidence (audit split, distill) and
    its real test images (verify)."""
    of_label = np.nonzero(labels == label)[0]
    distance = standardised_distance(z[of_label], validity, centre)
    return of_label[np.argsort(distance, kind="stable")[:k]]
