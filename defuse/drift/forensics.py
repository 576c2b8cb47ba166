"""Drift forensics: how sensitive a classifier is to each acquisition parameter, and how far each may drift.

For a model and labelled images (the test split in the pipeline: this only grades):

* **sensitivity**: d(mean cross-entropy)/d(parameter) at the identity, by autograd through the acquisition model,
  also per unit of the parameter's physical range (``sensitivity_per_range``) so parameters compare;
* **tolerance**: per parameter and direction, the largest deviation from the identity whose accuracy drop stays
  within ``max_drop`` (1 point). A grid of ``GRID`` points from the identity to the physical bound is evaluated
  first; the tolerance lies before its first point beyond the allowed drop, and ``BISECTION`` steps narrow it
  between that point and the one before. Because the grid is scanned from the identity out and bisection keeps
  "allowed" below "not allowed", widening ``max_drop`` can only move a tolerance outwards (a property test holds
  it to that). A parameter whose drop never exceeds ``max_drop`` up to its bound is tolerated to the bound.
* **worst direction**: the same search along the loss gradient (in range-normalised units, projected onto the
  directions the bounds allow), the drift that costs accuracy fastest.

The noise parameters use one seeded draw of standard-normal noise for every setting, so accuracy is a
deterministic function of the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defuse.drift.acquisition import (
    BY_NAME,
    IDENTITY,
    Parameter,
    SensorNoise,
    acquire,
    parameters_for,
)
from defuse.models.inference import as_input, inference_copy, is_channels_last

GRID = 8  # grid points from the identity to each bound
BISECTION = 6  # steps between the last allowed grid point and the first refused one: 1/64 of a grid step
CHUNK = 500  # images per forward pass under one setting
EARLY_CHUNK = 128  # ... when a search may stop early (as fast per image as 500 on this CPU)


@dataclass
class DriftEvaluator:
    """Accuracy of one classifier on fixed images under any acquisition setting, batched, with fixed noise."""

    model: nn.Module
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # (N,)
    noise: SensorNoise
    evaluations: int = field(default=0, init=False)
    images_read: int = field(default=0, init=False)  # images forwarded by the evaluations: what they cost

    @classmethod
    def build(cls, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> DriftEvaluator:
        """The evaluator of ``model`` on ``images``, which it holds least sure first: ordered by the model's margin
        at the identity (its logit for the label minus the largest other), each image with its own noise draw.
        A refused search point then meets most of its misread images in its first chunks, so
        :meth:`accuracy_unless_below` stops sooner; an accuracy is a count, so the order changes no decision and no
        allowed accuracy (up to float rounding: a batch's composition can move a logit by 1e-6). On the MNIST test
        split (2,000 images, 95 evaluations; 2026-12-07, alone on the 2-core machine): 134,000 images read against
        169,000 in the given order, 13.3 s against 17.5."""
        from defuse.seeding import int_seed

        generator = torch.Generator().manual_seed(int_seed(seed, "drift.noise"))
        noise = SensorNoise.draw(images.shape, generator)  # drawn in the caller's order: one draw per image
        evaluator = cls(inference_copy(model), images.float(), labels, noise)
        order = torch.argsort(evaluator._margins(), stable=True)
        return cls(evaluator.model, evaluator.images[order], labels[order],
                   SensorNoise(noise.shot[order], noise.read[order]))

    @torch.no_grad()
    def _margins(self) -> torch.Tensor:
        """(N,) the model's margin on each image at the identity (noise-free)."""
        fast = is_channels_last(self.model)
        out = []
        for i in range(0, len(self.images), CHUNK):
            logits = self.model(as_input(acquire(self.images[i : i + CHUNK], {}), fast)).float()
            rows = torch.arange(len(logits))
            given = logits[rows, self.labels[i : i + CHUNK]].clone()
            logits[rows, self.labels[i : i + CHUNK]] = -torch.inf
            out.append(given - logits.max(dim=1).values)
        return torch.cat(out)

    @torch.no_grad()
    def correct(self, setting: dict[str, float]) -> torch.Tensor:
        """(N,) booleans: which images the model reads right under ``setting``."""
        self.evaluations += 1
        fast = is_channels_last(self.model)
        out = []
        for i in range(0, len(self.images), CHUNK):
            part = slice(i, i + CHUNK)
            x = acquire(self.images[part], setting, SensorNoise(self.noise.shot[part], self.noise.read[part]))
            self.images_read += len(x)
            out.append(self.model(as_input(x, fast)).argmax(dim=1) == self.labels[part])
        return torch.cat(out)

    def accuracy(self, setting: dict[str, float]) -> float:
        return float(self.correct(setting).float().mean())

    @torch.no_grad()
    def accuracy_unless_below(self, setting: dict[str, float], floor: float) -> float:
        """:meth:`accuracy` under ``setting``, except that it stops reading images once the accuracy is certain to
        end below ``floor`` (too many already misread) and then returns a value below ``floor``, not the accuracy.

        The tolerance search only needs "refused" at a refused point, and about half its points are refused, so
        this reads a quarter fewer images with the same decisions and the same accuracies at every allowed point."""
        self.evaluations += 1
        fast = is_channels_last(self.model)
        n, wrong, out = len(self.images), 0, []
        for i in range(0, n, EARLY_CHUNK):
            part = slice(i, i + EARLY_CHUNK)
            x = acquire(self.images[part], setting, SensorNoise(self.noise.shot[part], self.noise.read[part]))
            self.images_read += len(x)
            right = self.model(as_input(x, fast)).argmax(dim=1) == self.labels[part]
            out.append(right)
            wrong += int((~right).sum())
            if (n - wrong) / n < floor - 1e-9 and i + EARLY_CHUNK < n:  # the best the rest could do is too little
                return (n - wrong) / n
        return float(torch.cat(out).float().mean())


def sensitivities(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise: SensorNoise,
                  parameters: tuple[Parameter, ...]) -> dict[str, float]:
    """d(mean cross-entropy)/d(parameter) at the identity, for every differentiable parameter (autograd)."""
    model = inference_copy(model)
    setting = {p.name: torch.tensor(p.identity, requires_grad=True) for p in parameters if p.differentiable}
    total = {name: 0.0 for name in setting}
    for i in range(0, len(images), CHUNK):
        part = slice(i, i + CHUNK)
        x = acquire(images[part].float(), setting, SensorNoise(noise.shot[part], noise.read[part]))
        loss = F.cross_entropy(model(x), labels[part], reduction="sum") / len(images)
        grads = torch.autograd.grad(loss, list(setting.values()))
        for name, g in zip(setting, grads):
            total[name] += float(g)
    return total


def tolerance_along(evaluator: DriftEvaluator, endpoint: dict[str, float], clean: float, max_drop: float
                    ) -> tuple[float, float]:
    """How far (a fraction t of the way from the identity to ``endpoint``) the accuracy drop stays within
    ``max_drop``; returns (t, accuracy at t). Grid scan from the identity out, then bisection (module docstring)."""
    def at(t: float) -> dict[str, float]:
        return {name: IDENTITY[name] + t * (value - IDENTITY[name]) for name, value in endpoint.items()}

    allowed, allowed_accuracy = 0.0, clean
    floor = clean - max_drop  # refused below this (up to float rounding, which the comparisons below decide)
    for k in range(1, GRID + 1):
        t = k / GRID
        accuracy = evaluator.accuracy_unless_below(at(t), floor)
        if clean - accuracy > max_drop:
            low, high = allowed, t
            for _ in range(BISECTION):
                middle = (low + high) / 2
                accuracy = evaluator.accuracy_unless_below(at(middle), floor)
                if clean - accuracy > max_drop:
                    high = middle
                else:
                    low, allowed_accuracy = middle, accuracy
            return low, allowed_accuracy
        allowed, allowed_accuracy = t, accuracy
    return 1.0, allowed_accuracy


def drift_forensics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, max_drop: float = 0.01,
                    seed: int = 0, parameters: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Sensitivity and tolerance of ``model`` to every acquisition parameter that applies to ``images``.

    Args:
        model: a classifier mapping (N, C, H, W) images in [0, 1] to logits.
        images, labels: labelled images (N, C, H, W) in [0, 1] and (N,).
        max_drop: the allowed accuracy drop (0.01: one point).
        seed: the run's seed (stream ``drift.noise``: the sensor-noise draw).
        parameters: a subset of parameter names (default: all that apply).

    Returns: the "acceptable data environment" of the model: clean accuracy, per parameter its identity, bounds,
    unit, sensitivity and tolerance in each direction (the value reached and the accuracy there), and the worst
    direction.
    """
    if not 0 <= max_drop < 1:
        raise ValueError(f"`max_drop` must be a fraction in [0, 1), got {max_drop} instead.")
    if len(images) == 0:
        raise ValueError("Drift forensics needs labelled images; got none.")
    applicable = parameters_for(images.shape[1])
    if parameters is not None:
        unknown = [name for name in parameters if name not in BY_NAME]
        if unknown:
            raise ValueError(f"Unknown drift parameter(s) {unknown}; the parameters are: {', '.join(BY_NAME)}.")
        applicable = tuple(p for p in applicable if p.name in parameters)
    evaluator = DriftEvaluator.build(model, images, labels, seed)
    clean = evaluator.accuracy({})
    grads = sensitivities(model, evaluator.images, evaluator.labels, evaluator.noise, applicable)
    table: dict[str, Any] = {}
    for p in applicable:
        entry: dict[str, Any] = {"identity": p.identity, "low": p.low, "high": p.high, "unit": p.unit,
                                 "sensitivity": _round(grads.get(p.name)),
                                 "sensitivity_per_range": _round(grads[p.name] * p.span) if p.name in grads else None,
                                 "differentiable": p.differentiable}
        for side, bound in (("low", p.low), ("high", p.high)):
            if bound == p.identity:
                entry[f"tolerance_{side}"] = None  # nothing to drift towards: the identity is the bound
                continue
            t, accuracy = tolerance_along(evaluator, {p.name: bound}, clean, max_drop)
            entry[f"tolerance_{side}"] = round(p.identity + t * (bound - p.identity), 5)
            entry[f"accuracy_at_tolerance_{side}"] = round(accuracy, 4)
            entry[f"reaches_bound_{side}"] = t == 1.0
        table[p.name] = entry
    return {"clean_accuracy": round(clean, 4), "max_drop": max_drop, "images": int(len(images)),
            "parameters": table, "worst_direction": _worst_direction(evaluator, applicable, grads, clean, max_drop),
            "evaluations": evaluator.evaluations, "images_read": evaluator.images_read}


def _worst_direction(evaluator: DriftEvaluator, parameters: tuple[Parameter, ...], grads: dict[str, float],
                     clean: float, max_drop: float) -> dict[str, Any] | None:
    """The tolerance along the loss gradient (range-normalised, projected onto the allowed directions)."""
    direction = {}
    for p in parameters:
        if p.name not in grads:
            continue
        g = grads[p.name] * p.span  # d loss / d (parameter in units of its range)
        if (g > 0 and p.high == p.identity) or (g < 0 and p.low == p.identity):
            g = 0.0  # the bound allows no drift that way
        direction[p.name] = g
    norm = math.sqrt(sum(g * g for g in direction.values()))
    if norm == 0:
        return None
    # Walk until the first parameter reaches its bound.
    steps = {name: g / norm for name, g in direction.items() if g != 0}
    reach = min((BY_NAME[n].high - BY_NAME[n].identity) / (s * BY_NAME[n].span) if s > 0 else
                (BY_NAME[n].low - BY_NAME[n].identity) / (s * BY_NAME[n].span) for n, s in steps.items())
    endpoint = {n: BY_NAME[n].identity + reach * s * BY_NAME[n].span for n, s in steps.items()}
    t, accuracy = tolerance_along(evaluator, endpoint, clean, max_drop)
    return {"direction": {n: round(s, 5) for n, s in steps.items()},
            "tolerance": {n: round(IDENTITY[n] + t * (v - IDENTITY[n]), 5) for n, v in endpoint.items()},
            "distance": round(t * reach, 5), "accuracy_at_tolerance": round(accuracy, 4)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)
