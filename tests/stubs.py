"""Tiny stand-ins with known geometry: a 2-d latent space whose class boundary is the line z0 = 1."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from defuse.validity import ValidityModel


class LineGenerator(nn.Module):
    """encode: the first two pixels are the latent mean, posterior scale 1; decode: the inverse (a 2x2 image)."""

    latent_dim = 2

    def __init__(self, nan: bool = False, scramble: bool = False) -> None:
        super().__init__()
        self.nan, self.scramble = nan, scramble
        self.dummy = nn.Parameter(torch.zeros(1))  # so Lightning has a device to read

    def encode(self, x):
        mu = x.flatten(1)[:, :2].clone()
        if self.nan:
            mu[0] = float("nan")
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        if self.scramble:
            z = -z
        return torch.cat([z, torch.zeros_like(z)], dim=1).view(-1, 1, 2, 2)


class LineClassifier(nn.Module):
    """Class 1 when pixel 0 > 1, else class 0."""

    def forward(self, x):
        p = x.flatten(1)[:, 0]
        return torch.stack([torch.zeros_like(p), 10 * (p - 1)], dim=1)


def line_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose latents lie left of the boundary (class 0), z0 in [-1, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.stack([torch.rand(n, generator=g) * 1.5 - 1, torch.rand(n, generator=g) * 2 - 1], dim=1)
    return LineGenerator().decode(z), torch.zeros(n, dtype=torch.long)


def line_validity(seed: int = 0) -> ValidityModel:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(400, 2)) * 2
    return ValidityModel.fit(z, (z[:, 0] > 1).astype(int), num_classes=2, seed=seed)


class QuadrantClassifier(nn.Module):
    """On LineGenerator images: class 1 when z0 > 1, else class 2 when z1 > 1, else class 0."""

    def forward(self, x):
        z = x.flatten(1)[:, :2]
        one = 10 * (z[:, 0] - 1)
        two = torch.minimum(10 * (z[:, 1] - 1), -one)
        return torch.stack([torch.zeros_like(one), one, two], dim=1)


def quadrant_validity(seed: int = 0) -> ValidityModel:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2000, 2)) * 2
    labels = np.where(z[:, 0] > 1, 1, np.where(z[:, 1] > 1, 2, 0))
    return ValidityModel.fit(z, labels, num_classes=3, seed=seed)
