"""identify: fit the validity judge on the audit split, then search the generator's latent space around the audit
images the classifier gets right (:func:`defuse.search.identify`) for natural failures."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defuse.artifacts import FAILURES_TABLE, VALIDITY_MODEL
from defuse.config import IdentifyConfig, TrainerConfig
from defuse.data import ImageSet
from defuse.models.inference import BATCH, latent_means
from defuse.records import Failures
from defuse.search import identify
from defuse.seeding import int_seed, torch_generator
from defuse.validity import ValidityModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Discovery:
    """What the identify stage leaves: the failures found and the validity judge that screened and scored them.

    Saved as failures.parquet + failures_z.npy (:class:`Failures`) and validity.npz (:class:`ValidityModel`).
    """

    failures: Failures
    judge: ValidityModel
    judge_reads_class: bool = False  # a class-conditional generator: the judge sees each sample's class dimensions

    def save(self, folder: str | Path) -> None:
        """Write failures.parquet, failures_z.npy and validity.npz into ``folder`` (a run directory)."""
        self.failures.save(Path(folder) / FAILURES_TABLE)
        self.judge.save(Path(folder) / VALIDITY_MODEL)

    @property
    def metrics(self) -> dict[str, Any]:
        return {**self.failures.stats, "validity_model_train_accuracy": round(self.judge.train_accuracy, 4),
                **({"validity_judge_reads_class": True} if self.judge_reads_class else {})}


def discover(
    classifier: nn.Module,
    generator: nn.Module,
    searched: ImageSet,
    judged: ImageSet,
    config: IdentifyConfig,
    *,
    seed: int = 0,
    trainer: TrainerConfig | None = None,
) -> Discovery:
    """The identify stage: fit the validity judge on ``judged``, then search around the eligible images of ``searched``.

    Both are the audit split by default (``identify.split``, ``identify.validity_split``); never the test split,
    which grades the repair. The judge learns the labels of held-out images, not the classifier's training
    labels, whose errors are among the bugs to find.

    Args:
        classifier: [0,1] images (N, C, H, W) -> logits (N, K).
        generator: encode / decode / latent_dim.
        searched: the images the search starts from (their correctly classified, well reconstructed ones).
        judged: labelled images the validity judge is fitted on.
        config: the identify section of the run config.
        seed: the run's seed (streams ``identify.judge``, ``identify.sources``, ``identify.search``).
        trainer: accelerator settings for Lightning's predict.
    """
    if len(judged) == 0 or len(searched) == 0:
        raise ValueError(
            f"The split identify {'fits its judge on' if len(judged) == 0 else 'searches'} holds no images: "
            f"set data.audit_size > 0 (a fraction, or a count of images), or point identify.split and "
            f"identify.validity_split at a non-empty split."
        )
    judge = ValidityModel.fit(latent_means(generator, judged.float_images(), labels=judged.labels).numpy(), judged.labels.numpy(),
                              len(judged.classes), seed=int_seed(seed, "identify.judge"))
    reads_class = bool(getattr(generator, "num_classes", 0))
    if reads_class:
        # Measured on the signs (docs/benchmarks.md, "Colour signs"): no judge fitted on the labelled data, on the
        # learned dimensions or the decoded image, told the night 50s the data lacks from garbled drawings.
        log.warning(
            "The generator is class-conditional: the validity judge reads each sample's class from its class "
            "dimensions (train accuracy %.2f), so it keeps every failure the search finds, garbled drawings "
            "included. Which regions are bugs rests on your labels.", judge.train_accuracy)
    images, labels = searched.float_images(), searched.labels
    origin = torch.arange(len(labels))
    if config.transport:
        moved, moved_labels, moved_origin = transported_sources(generator, images, labels, len(searched.classes),
                                                                config.transport, seed)
        images, labels = torch.cat([images, moved]), torch.cat([labels, moved_labels])
        origin = torch.cat([origin, moved_origin])
    failures = identify(classifier, generator, images, labels, judge, config,
                        seed=seed, trainer=trainer, classes=searched.classes)
    if config.transport:
        # A transported source is not a row of the split: its failures name the real image it was drawn from.
        rows = failures.table["source_index"].to_numpy()
        failures.table["transported"] = rows >= len(searched)
        failures.table["source_index"] = origin.numpy()[rows]
        failures.stats["transported_sources"] = int(len(origin) - len(searched))
    return Discovery(failures, judge, judge_reads_class=reads_class)


def transported_sources(generator: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class transport: for every class c, up to ``per_class`` images of other classes (a seeded draw, stream
    ``identify.transport``), encoded with their own class and decoded with c's one-hot. Returns the decoded images,
    their class c, and the row of the image each came from.

    Only a class-conditional generator (``num_classes`` > 0) separates what an image shows besides its class (its
    learned dimensions) from the class, so only it can draw a 50 km/h sign in the light of a 30 km/h one."""
    conditional = int(getattr(generator, "num_classes", 0))
    if not conditional:
        raise ValueError("identify.transport needs a class-conditional generator: set generator.conditional: true "
                         "(and re-fit the generator), or identify.transport: 0.")
    rng = torch_generator(seed, "identify.transport")
    picked, targets = [], []
    for c in range(num_classes):
        others = torch.nonzero(labels != c).flatten()
        chosen = others[torch.randperm(len(others), generator=rng)[:per_class]]
        picked.append(chosen)
        targets.append(torch.full((len(chosen),), c, dtype=labels.dtype))
    rows, target = torch.cat(picked), torch.cat(targets)
    z = latent_means(generator, images[rows], labels=labels[rows])
    z[:, z.shape[1] - conditional:] = F.one_hot(target, conditional).to(z.dtype)
    with torch.no_grad():
        decoded = torch.cat([generator.decode(chunk) for chunk in z.split(BATCH)]) if len(z) else images[:0]
    return decoded, target, rows
