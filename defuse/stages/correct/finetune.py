"""The fine-tune: a Lightning module over the clean loss, the region batch and the KL hold on the original's
answers, with each epoch's record of the readings the choice needs.

Loss: ``CE(training set, labels as corrected) + lambda * CE(region batch, person's label)
+ keep * KL(original || fine-tuned)``, starting from the classifier's own weights. The training set is the
training split less its label issues, plus, when the person consents (``correct.relabel``), the training images
whose labels the person's answers contradict, under the person's label (``relabelled_repeats`` times each). The
region batch holds fresh decoded samples of the labelled regions whose bug no real image shows (those the
validity judge gives the person's label at least ``min_validity``); lambda = 0 trains without them. The KL term
holds the original model's answers only on images whose label it already gives, so it never pulls a corrected
image back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn

from defuse.data import ImageSet
from defuse.models.classifiers import classifier_head, is_batch_norm
from defuse.models.inference import copy_model, predict_labels, set_requires_grad
from defuse.rundir import atomic_write_json

log = logging.getLogger(__name__)


def drift_box(classifier: nn.Module, held_out: ImageSet, seed: int, max_drop: float = 0.01
              ) -> dict[str, tuple[float, float]]:
    """Each acquisition parameter's tolerated range for ``classifier`` on held-out images (the guard: val and audit,
    never test), for drift-aware repair; parameters tolerated nowhere (a zero-width range) are left out."""
    from defuse.drift.forensics import drift_forensics

    found = drift_forensics(classifier, held_out.float_images(), held_out.labels, max_drop=max_drop, seed=seed)
    box = {}
    for name, p in found["parameters"].items():
        low = p["identity"] if p.get("tolerance_low") is None else p["tolerance_low"]
        high = p["identity"] if p.get("tolerance_high") is None else p["tolerance_high"]
        if high > low:
            box[name] = (float(low), float(high))
    return box


class CorrectionModule(pl.LightningModule):
    """Fine-tunes ``classifier`` on training batches plus ``lam`` times region batches (none when a batch has no
    "regions" entry).

    Args:
        classifier: [0,1] images -> logits; trained in place.
        lam: weight of the region loss.
        lr: Adam learning rate.
        keep: weight of KL(original || fine-tuned) on the training images whose label the original gives.
        layers: "all" trains every weight; "head" only :func:`classifier_head`, on frozen features.
    """

    def __init__(self, classifier: nn.Module, lam: float = 1.0, lr: float = 5e-4, keep: float = 0.0,
                 drift_box: dict[str, tuple[float, float]] | None = None, drift_seed: int = 0,
                 layers: str = "all") -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["classifier"])
        # Drift-aware repair: the random drifts of each step come from their own generator (stream correct.drift).
        self._drift_generator = torch.Generator().manual_seed(drift_seed) if drift_box else None
        # The original model, frozen: on clean batches the fine-tuned one is held to its predictions (weight
        # ``keep``), so fixing the regions reshuffles fewer unrelated decisions. Kept in a list, not as a
        # submodule: it is fixed, so it stays out of checkpoints, optimisers and Lightning's train/eval switches.
        self._teacher = [set_requires_grad(copy_model(classifier).eval(), False)] if keep > 0 else []
        # Checkpoints load in eval mode, frozen.
        self.model = set_requires_grad(classifier.train(), layers == "all")
        if layers == "head":
            set_requires_grad(classifier_head(self.model), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        # Keep batch-norm statistics as trained: region batches are decoded (smoother) images, and letting them
        # move the running means shifts every clean input too (measured: -1.8 points of clean accuracy).
        for module in self.model.modules():
            if is_batch_norm(module):
                module.eval()

    def training_step(self, batch, batch_idx):
        x_clean, y_clean = batch["clean"]
        logits = self(x_clean)
        clean = F.cross_entropy(logits, y_clean)
        loss = clean
        if "regions" in batch and self.hparams.lam > 0:
            x_region, y_region = batch["regions"]
            region = F.cross_entropy(self(x_region), y_region)
            loss = loss + self.hparams.lam * region
            self.log("region_loss", region, on_epoch=True, on_step=False, batch_size=len(y_region))
        if self._teacher:
            teacher = self._teacher[0].to(x_clean.device)
            with torch.no_grad():
                target = F.log_softmax(teacher(x_clean), dim=1)
            # Held only where the original gives the label: a relabelled image is free to change its answer.
            agrees = (target.argmax(dim=1) == y_clean).float()
            kl = F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="none").sum(dim=1)
            drift = (kl * agrees).sum() / len(y_clean)
            loss = loss + self.hparams.keep * drift
            self.log("drift_loss", drift, on_epoch=True, on_step=False, batch_size=len(y_clean))
        if self._drift_generator is not None:
            drifted = F.cross_entropy(self(self._drifted(x_clean)), y_clean)
            loss = loss + drifted
            self.log("drifted_loss", drifted, on_epoch=True, on_step=False, batch_size=len(y_clean))
        self.log("clean_loss", clean, on_epoch=True, on_step=False, batch_size=len(y_clean))
        return loss

    def _drifted(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` re-acquired under one random setting per image, uniform inside the drift box."""
        from defuse.drift.acquisition import SensorNoise, acquire

        g = self._drift_generator
        n = len(x)
        setting = {name: low + (high - low) * torch.rand(n, generator=g)
                   for name, (low, high) in self.hparams.drift_box.items()}
        noise = SensorNoise.draw(x.shape, g)
        with torch.no_grad():
            return acquire(x.cpu(), setting, noise).to(x.device)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class _EpochRecord(Callback):
    """After every training epoch, writes what the choice needs (the model's readings of the guard and bug images,
    its accuracy on the decoded validation samples) to a JSON file, atomically, so the choice survives restarts."""

    def __init__(self, path: Path, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.path, self.sets = path, sets

    def on_train_epoch_end(self, trainer, module) -> None:
        # Runs before ModelCheckpoint (Lightning calls checkpoint callbacks last), so the epoch's checkpoint holds
        # the weights this record describes.
        records = json.loads(self.path.read_text()) if self.path.exists() else []
        records = [r for r in records if r["epoch"] != trainer.current_epoch]
        records.append({"epoch": trainer.current_epoch,
                        **{name: predict_labels(module.model, x).tolist() for name, (x, _) in self.sets.items()}})
        atomic_write_json(self.path, sorted(records, key=lambda r: r["epoch"]))


def candidate_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier weights a candidate checkpoint holds (the fine-tuned model's, without the module's prefix)."""
    state = checkpoint["state_dict"]
    prefix = "model."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
