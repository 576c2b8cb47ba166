"""Batched inference helpers shared by every stage that runs a model over many images."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) of ``model`` on float images (N, C, H, W) in [0, 1], in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        chunks = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def predict_labels(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class indices (N,)."""
    return predict_logits(model, images, batch_size).argmax(dim=1)


@torch.no_grad()
def reconstruct(generator: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """decode(mu(x)) for float images (N, C, H, W), batch by batch."""
    was_training = generator.training
    generator.eval()
    try:
        out = [generator.decode(generator.encode(images[i : i + batch_size])[0]) for i in range(0, len(images), batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else images[:0]
