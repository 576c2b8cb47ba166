"""Watch a classifier's invariances while it trains: plain Lightning plus defuse's InvarianceMonitor callback.

Run: ``python scripts/example_invariance_monitor.py [--epochs 4] [--rotate 15]``. It trains defuse's small CNN on
scikit-learn's bundled digits (no download), with or without random rotations of up to ``--rotate`` degrees, and
prints the Effective Invariance the callback logged after each validation epoch. With rotations, the +-15-degree
EI (``ei/rotation15``) ends higher than without.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, TensorDataset

from defuse import ClassifierModule, ImageDataModule, InvarianceMonitor, load_config


class EpochTable(pl.Callback):
    """Collects what was logged at each validation epoch end, to print it at the end."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.rows.append({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})


class RotatingModule(ClassifierModule):
    """The classifier, trained on batches rotated by one random angle in [-rotate, rotate] each."""

    def __init__(self, rotate: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rotate = rotate

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.rotate:
            angle = float(torch.empty(()).uniform_(-self.rotate, self.rotate))
            x = TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR)
        return super().training_step((x, y), batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rotate", type=float, default=0.0, help="training rotations up to this many degrees")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    data = ImageDataModule(load_config(None).data, seed=0)
    train, val = data.split("train"), data.split("val")
    loaders = [DataLoader(TensorDataset(s.float_images(), s.labels), batch_size=64, shuffle=shuffle)
               for s, shuffle in ((train, True), (val, False))]
    module = RotatingModule(rotate=args.rotate, in_channels=1, num_classes=len(train.classes), width=16)
    table = EpochTable()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InvarianceMonitor(max_images=256), table])
    trainer.fit(module, *loaders)
    for epoch, row in enumerate(table.rows):
        print(epoch, {k: v for k, v in row.items() if k.startswith(("ei/", "val_acc"))})


if __name__ == "__main__":
    main()
