"""defuse on a model you already have, from Python: ``defuse.scan(model, datasets, ...)``.

Run: ``python examples/scan_my_model.py [--labels later|auto|FILE] [--run-dir runs/scan-digits]``. The model here is
a plain ``nn.Module`` trained with a plain loop (no Lightning), on torch datasets of ``(image, label)``; yours can be
any classifier whose ``forward`` maps float images in [0, 1] to logits. ``defuse.scan`` runs the pipeline of
``defuse run`` on them (the model is traced to TorchScript inside the run directory, the datasets written as an npz)
and returns what it found. Call it again with labels (a file, or ``--labels auto`` for the conservative
suggestions) and it resumes: only the repair, its verification and the report run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import defuse


def digits_datasets(seed: int = 0) -> dict[str, TensorDataset]:
    """scikit-learn's digits at 28 px in [0, 1]: train, val and test datasets (70/10/20%)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = F.interpolate(torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0, size=28,
                           mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = [int(0.7 * len(order)), int(0.8 * len(order))]
    parts = {"train": order[:cut[0]], "val": order[cut[0]:cut[1]], "test": order[cut[1]:]}
    return {name: TensorDataset(images[index], labels[index]) for name, index in parts.items()}


def train_model(train: TensorDataset, epochs: int = 30) -> nn.Module:
    """A two-layer perceptron, trained full-batch: a stand-in for the model you already have."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = train.tensors
    for _ in range(epochs):
        optimiser.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimiser.step()
    return model.eval()


def main(argv: list[str] | None = None) -> defuse.ScanResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="later", help="later (default), prompt, auto or a labels file")
    parser.add_argument("--run-dir", default="runs/scan-digits")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the stand-in model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a defuse config key, e.g. generator.epochs=30 (repeatable)")
    args = parser.parse_args(argv)

    datasets = digits_datasets()
    model = train_model(datasets["train"], args.epochs)
    result = defuse.scan(model, datasets, run_dir=args.run_dir, labels=args.labels, overrides=args.overrides,
                         classes=[str(k) for k in range(10)])
    accuracy = result.summary["clean_accuracy"] or {}
    print(f"status: {result.status}; {len(result.regions)} regions; clean test accuracy {accuracy.get('before')} -> "
          f"{accuracy.get('after')}; report: {result.report}")
    return result


if __name__ == "__main__":
    main()
