"""Drift optimisation: the worst-case acquisition setting inside a box (projected gradient ascent on the loss).

One setting for the whole image set (a drifted environment, not a per-image attack): every differentiable
parameter may move at most ``budget`` of its physical range from the identity, within its bounds. Signed gradient
steps of ``budget / 5`` of the range, ``steps`` of them, each projected back into the box, from the identity and
from ``restarts`` random points of the box (streams ``drift.restarts``); the setting with the highest loss seen is
kept. Its accuracy is reported next to the mean accuracy of random settings drawn uniformly
from the same box (stream ``drift.random``), so a reader sees how much worse the worst case is than chance drift.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defuse.drift.acquisition import SensorNoise, acquire, parameters_for
from defuse.drift.forensics import CHUNK, DriftEvaluator
from defuse.seeding import numpy_rng


def worst_case_drift(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, budget: float = 0.25,
                     steps: int = 10, restarts: int = 3, random_settings: int = 16, seed: int = 0) -> dict[str, Any]:
    """The loss-maximising setting in the box (module docstring), its accuracy, and random settings' accuracy."""
    if not 0 < budget <= 1:
        raise ValueError(f"`budget` must be a fraction of each parameter's range in (0, 1], got {budget} instead.")
    evaluator = DriftEvaluator.build(model, images, labels, seed)
    model = evaluator.model
    parameters = [p for p in parameters_for(images.shape[1]) if p.differentiable]
    low = torch.tensor([max(p.low, p.identity - budget * p.span) for p in parameters], dtype=torch.float64)
    high = torch.tensor([min(p.high, p.identity + budget * p.span) for p in parameters], dtype=torch.float64)
    span = torch.tensor([p.span for p in parameters], dtype=torch.float64)
    theta = torch.tensor([p.identity for p in parameters], dtype=torch.float64)

    def loss_and_grad(values: torch.Tensor) -> tuple[float, torch.Tensor]:
        values = values.clone().float().requires_grad_(True)
        setting = {p.name: values[i] for i, p in enumerate(parameters)}
        total = torch.zeros(())
        for i in range(0, len(images), CHUNK):
            part = slice(i, i + CHUNK)
            x = acquire(evaluator.images[part], setting,
                        SensorNoise(evaluator.noise.shot[part], evaluator.noise.read[part]))
            total = total + F.cross_entropy(model(x), evaluator.labels[part], reduction="sum")
        total = total / len(images)
        (grad,) = torch.autograd.grad(total, values)
        return float(total.detach()), grad.double()

    # Restarts: at the identity several gradients vanish (blur acts at second order; pixels clipped at black pass
    # no gradient to the black level), so ascent from there alone can miss drifts that random ones find.
    rng = numpy_rng(seed, "drift.restarts")
    starts = [theta] + [torch.from_numpy(rng.uniform(low.numpy(), high.numpy())) for _ in range(restarts)]
    best_loss, best = -np.inf, theta.clone()
    trace = []
    for start in starts:
        theta, path = start.clone(), []
        for _ in range(steps):
            loss, grad = loss_and_grad(theta)
            path.append(round(loss, 5))
            if loss > best_loss:
                best_loss, best = loss, theta.clone()
            theta = torch.minimum(torch.maximum(theta + budget / 5 * span * grad.sign(), low), high)
        loss, _ = loss_and_grad(theta)
        path.append(round(loss, 5))
        if loss > best_loss:
            best_loss, best = loss, theta.clone()
        trace.append(path)
    worst = {p.name: round(float(best[i]), 5) for i, p in enumerate(parameters)}
    rng = numpy_rng(seed, "drift.random")
    random_accuracy = [evaluator.accuracy({p.name: float(rng.uniform(low[i], high[i]))
                                           for i, p in enumerate(parameters)}) for _ in range(random_settings)]
    return {"budget": budget, "box": {p.name: [float(low[i]), float(high[i])] for i, p in enumerate(parameters)},
            "clean_accuracy": round(evaluator.accuracy({}), 4), "worst_setting": worst,
            "worst_loss": round(best_loss, 5), "worst_accuracy": round(evaluator.accuracy(worst), 4),
            "random_accuracy_mean": round(float(np.mean(random_accuracy)), 4),
            "random_accuracy_min": round(float(np.min(random_accuracy)), 4), "loss_trace": trace}
