"""Your own Lightning training script, with defuse scanning the trained model for bugs at the end of ``fit``.

Run: ``python examples/train_with_defuse.py [--epochs 8] [--run-dir runs/lightning-digits]``. It trains a small
LightningModule on a LightningDataModule of scikit-learn's bundled digits (no download), with
:class:`defuse.DefuseCallback` in the Trainer: when ``fit`` ends, defuse trains its generator on the same data,
searches for the model's natural failures and groups them into ranked regions, logs what it found to the Trainer's
logger (here a CSV logger) and writes a report. Nothing is repaired during training: label the regions afterwards
(``defuse label --run-dir DIR``), then ``defuse run --run-dir DIR`` repairs the model and verifies the repair.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from defuse import DefuseCallback


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 digits at 28 px, float in [0, 1]: train, val and test (70/10/20%), split with a seed."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.classes = [str(k) for k in range(10)]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=28, mode="bilinear", align_corners=False).clamp(0, 1)
        full = TensorDataset(images, torch.tensor(digits.target))
        sizes = [int(0.7 * len(full)), int(0.1 * len(full))]
        sizes.append(len(full) - sum(sizes))
        self.train_set, self.val_set, self.test_set = random_split(
            full, sizes, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


class DigitClassifier(pl.LightningModule):
    """A small CNN; ``forward`` maps [0, 1] images to logits, which is all defuse needs of a model."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(32 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> DefuseCallback:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--run-dir", default="runs/lightning-digits", help="defuse's run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a defuse config key for the scan, e.g. generator.epochs=30 (repeatable)")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    defuse = DefuseCallback(run_dir=args.run_dir, overrides=args.overrides)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[defuse], enable_progress_bar=False,
                         logger=CSVLogger(Path(args.run_dir).parent, name=Path(args.run_dir).name + "-logs"))
    trainer.fit(DigitClassifier(), datamodule=DigitsDataModule())

    result = defuse.result
    print(f"{len(result.regions)} regions found; status: {result.status}; report: {result.report}")
    for region in result.regions[:5]:
        print(f"  region {region['id']}: {region['pair']} ({region['n_failures']} failures, bug score "
              f"{region['bug_score']:.3f})")
    if result.awaiting_labels:
        print(f"Label them with `defuse label --run-dir {result.run_dir}`, then `defuse run --run-dir "
              f"{result.run_dir}` repairs the model.")
    return defuse


if __name__ == "__main__":
    main()
