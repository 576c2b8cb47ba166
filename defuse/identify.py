"""Identification: search the generator's latent space around correctly classified images for failures.

Notation: B sources per batch, d = latent_dim, K classes, M directions per shell.

Sources are images the classifier gets right *and* whose reconstruction decode(mu)
it also gets right, so a failure cannot be a reconstruction artefact. Around each
source's posterior mean we perturb isotropically in units of the encoder's posterior
scale sigma: ``z = mu + r * sigma * u`` with ``u`` a random direction of norm sqrt(d),
so radius r = 1 is about as far as a typical posterior sample. The shell search
(the iterative/hybrid search of Zhao, Dua and Singh 2018) samples M directions in
expanding shells until a prediction flips, then bisects each flipping direction down
to the smallest flipping radius. The gradient mode raises the strongest wrong class
with an L2 penalty that keeps z near its source. Everything is batched over sources
and candidates, and runs as a Lightning ``predict`` so devices are Lightning's business.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defuse.config import IdentifyConfig, TrainerConfig
from defuse.models.inference import predict_labels, reconstruct
from defuse.rundir import RunDir, atomic_write_bytes
from defuse.validity import ValidityModel

FAILURES_TABLE = "failures.parquet"
FAILURES_Z = "failures_z.npy"
VALIDITY_MODEL = "validity.npz"
WEAK_RECONSTRUCTION = 0.5  # below this share of correct images surviving reconstruction, warn

log = logging.getLogger(__name__)

Evaluate = Callable[[torch.Tensor], torch.Tensor]  # latents (N, d) -> logits (N, K)


@dataclass(frozen=True)
class Failures:
    """Failures found by the search.

    ``table`` has one row per failure: ``source_index`` (into the searched split),
    ``source_label``, ``predicted_label``, ``confidence`` (classifier softmax of the
    predicted class), ``source_confidence``, ``radius``, ``validity`` (validity-model
    probability of the source class), ``validity_label``, ``valid`` and ``mode``.
    ``z`` holds the latents, (F, d). ``stats`` counts sources, exclusions and queries.
    """

    table: pd.DataFrame
    z: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    def save(self, run: RunDir) -> None:
        buffer = io.BytesIO()
        self.table.to_parquet(buffer, index=False)
        atomic_write_bytes(run.path(FAILURES_TABLE), buffer.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, self.z.astype(np.float32), allow_pickle=False)
        atomic_write_bytes(run.path(FAILURES_Z), buffer.getvalue())

    @classmethod
    def load(cls, run: RunDir) -> "Failures":
        for name in (FAILURES_TABLE, FAILURES_Z):
            if not run.path(name).exists():
                raise FileNotFoundError(f"{run.path(name)} is missing: run `defuse identify` first.")
        table = pd.read_parquet(run.path(FAILURES_TABLE))
        z = np.load(run.path(FAILURES_Z), allow_pickle=False)
        if len(z) != len(table):
            raise ValueError(
                f"{run.path(FAILURES_Z)} holds {len(z)} latents but {run.path(FAILURES_TABLE)} {len(table)} rows: "
                f"they come from different runs. Re-run `defuse identify --force`."
            )
        return cls(table, z, dict(run.metrics("identify")))


# ----------------------------------------------------------------------------- batched search kernels


def make_evaluate(generator: nn.Module, classifier: nn.Module, chunk: int = 4096) -> Evaluate:
    """decode + classify in chunks of ``chunk`` latents."""

    def evaluate(z: torch.Tensor) -> torch.Tensor:
        if len(z) <= chunk:
            return classifier(generator.decode(z))
        return torch.cat([classifier(generator.decode(z[i : i + chunk])) for i in range(0, len(z), chunk)])

    return evaluate


def shell_radii(min_radius: float, max_radius: float, shells: int) -> torch.Tensor:
    """Geometric shell edges, (shells + 1,): equal effort per octave of radius."""
    return torch.logspace(math.log10(min_radius), math.log10(max_radius), shells + 1)


def shell_search(
    evaluate: Evaluate,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor,
    *,
    directions: int,
    edges: torch.Tensor,
    refine_steps: int,
    per_source: int,
    generator: torch.Generator,
    depth: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Expanding-shell random search, then bisection of each flipping direction.

    Args:
        evaluate: latents (N, d) -> logits (N, K).
        mu, sigma: posterior mean and scale of the sources, (B, d).
        labels: source labels (B,).
        directions: M, directions tried per active source per shell.
        edges: shell edges (S + 1,), increasing.
        refine_steps: bisection steps per failure (radius resolution r / 2**steps).
        per_source: keep at most this many failures per source.
        generator: the random stream (directions and radii are drawn from it first).
        depth: the kept latent lies at (1 + depth) times the smallest flipping radius, when it still flips
            there (one more query per failure): a point inside the failure region, not on its edge, so
            that a Gaussian fitted to such points covers misclassified ground.

    Returns:
        ``source`` (F,) row into the batch, ``z`` (F, d), ``predicted``, ``confidence``, ``radius`` (F,),
        and ``queries``, the number of classifier calls spent.
    """
    b, d = mu.shape
    device = mu.device
    edges = edges.to(device)
    have = torch.zeros(b, dtype=torch.long, device=device)
    found: dict[str, list[torch.Tensor]] = {"source": [], "radius": [], "direction": [], "predicted": [], "confidence": []}
    queries = 0
    for s in range(len(edges) - 1):
        active = torch.nonzero(have < per_source).flatten()
        if len(active) == 0:
            break
        n = len(active)
        u = torch.randn(n, directions, d, generator=generator, device=device)
        u = u * (math.sqrt(d) / u.norm(dim=-1, keepdim=True))
        r = edges[s] + (edges[s + 1] - edges[s]) * torch.rand(n, directions, 1, generator=generator, device=device)
        z = mu[active, None] + r * sigma[active, None] * u
        probs = F.softmax(evaluate(z.reshape(-1, d)).float(), dim=1)
        queries += n * directions
        conf, pred = probs.max(dim=1)
        pred, conf = pred.view(n, directions), conf.view(n, directions)
        flip = pred != labels[active, None]
        room = (per_source - have[active])[:, None]
        keep = flip & (flip.cumsum(dim=1) <= room)
        rows, cols = torch.nonzero(keep, as_tuple=True)
        if len(rows):
            found["source"].append(active[rows])
            found["radius"].append(r[rows, cols, 0])
            found["direction"].append(u[rows, cols])
            found["predicted"].append(pred[rows, cols])
            found["confidence"].append(conf[rows, cols])
            have[active] += keep.sum(dim=1)
    if not found["source"]:
        empty = torch.empty(0, device=device)
        return {"source": empty.long(), "z": torch.empty(0, d, device=device), "predicted": empty.long(),
                "confidence": empty, "radius": empty, "queries": torch.tensor(queries)}
    source = torch.cat(found["source"])
    direction = torch.cat(found["direction"])
    hi = torch.cat(found["radius"])
    predicted = torch.cat(found["predicted"])
    confidence = torch.cat(found["confidence"])
    lo = torch.zeros_like(hi)  # radius 0 is the reconstruction, which the classifier gets right
    for _ in range(refine_steps):
        mid = (lo + hi) / 2
        probs = F.softmax(evaluate(mu[source] + mid[:, None] * sigma[source] * direction).float(), dim=1)
        queries += len(mid)
        conf_mid, pred_mid = probs.max(dim=1)
        flipped = pred_mid != labels[source]
        hi = torch.where(flipped, mid, hi)
        lo = torch.where(flipped, lo, mid)
        predicted = torch.where(flipped, pred_mid, predicted)
        confidence = torch.where(flipped, conf_mid, confidence)
    z = mu[source] + hi[:, None] * sigma[source] * direction
    if depth > 0:
        deep = mu[source] + (hi * (1 + depth))[:, None] * sigma[source] * direction
        probs = F.softmax(evaluate(deep).float(), dim=1)
        queries += len(deep)
        conf_deep, pred_deep = probs.max(dim=1)
        same = pred_deep == predicted  # still the same mistake one step further in
        z = torch.where(same[:, None], deep, z)
        confidence = torch.where(same, conf_deep, confidence)
    return {"source": source, "z": z, "predicted": predicted, "confidence": confidence, "radius": hi,
            "queries": torch.tensor(queries)}


def gradient_search(
    evaluate: Evaluate,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    penalty: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Raise the strongest wrong class of each source by Adam on ``delta`` (z = mu + sigma * delta).

    Loss per source: ``-log p(target | decode(z)) + penalty * |delta|^2 / d``; a source stops
    counting once its prediction flips, and the first flipping iterate is kept. Each step costs
    one forward and one backward pass per source (counted as one query).
    """
    b, d = mu.shape
    with torch.inference_mode(False), torch.enable_grad():
        mu, sigma, labels = mu.clone(), sigma.clone(), labels.clone()
        with torch.no_grad():
            start = evaluate(mu).float()
            start[torch.arange(b), labels] = -float("inf")
            target = start.argmax(dim=1)
        delta = (0.01 * torch.randn(b, d, generator=generator, device=mu.device)).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        done = torch.zeros(b, dtype=torch.bool, device=mu.device)
        z_out = torch.zeros(b, d, device=mu.device)
        pred_out = torch.zeros(b, dtype=torch.long, device=mu.device)
        conf_out = torch.zeros(b, device=mu.device)
        radius_out = torch.zeros(b, device=mu.device)
        queries = 0
        for _ in range(steps):
            z = mu + sigma * delta
            log_probs = F.log_softmax(evaluate(z).float(), dim=1)
            queries += int((~done).sum())
            with torch.no_grad():
                conf, pred = log_probs.exp().max(dim=1)
                newly = (pred != labels) & ~done
                z_out[newly] = z[newly].detach()
                pred_out[newly] = pred[newly]
                conf_out[newly] = conf[newly]
                radius_out[newly] = delta[newly].norm(dim=1) / math.sqrt(d)
                done |= newly
            if bool(done.all()):
                break
            loss = -log_probs[torch.arange(b), target] + penalty * delta.pow(2).sum(dim=1) / d
            optimizer.zero_grad()
            (loss * (~done)).sum().backward()
            optimizer.step()
    source = torch.nonzero(done).flatten()
    return {"source": source, "z": z_out[source], "predicted": pred_out[source], "confidence": conf_out[source],
            "radius": radius_out[source], "queries": torch.tensor(queries)}


# ----------------------------------------------------------------------------- Lightning wrapper


class _Sources(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        self.images, self.labels, self.index = images, labels, index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.index[i]

    def __getitems__(self, indices: list[int]):
        i = torch.as_tensor(indices, dtype=torch.long)
        return self.images[i], self.labels[i], self.index[i]


def _whole_batch(batch):
    return batch


class SearchModule(pl.LightningModule):
    """Runs the latent search over a dataset of sources with ``Trainer.predict``.

    Args:
        classifier: [0,1] images -> logits.
        generator: a :class:`defuse.models.Generator`.
        config: the identify section of the run config.
        seed: each batch draws from ``Generator(seed, first source index)``, so the result does not
            depend on how Lightning spreads batches over devices.
    """

    def __init__(self, classifier: nn.Module, generator: nn.Module, config: IdentifyConfig, seed: int) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.generator = generator.eval().requires_grad_(False)
        self.config = config
        self.seed = seed

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        x, labels, index = batch
        cfg = self.config
        rng = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + int(index[0]))
        mu, logvar = self.generator.encode(x)
        sigma = torch.exp(0.5 * logvar)
        evaluate = make_evaluate(self.generator, self.classifier)
        if cfg.mode == "gradient":
            out = gradient_search(evaluate, mu, sigma, labels, steps=cfg.gradient_steps, lr=cfg.gradient_lr,
                                  penalty=cfg.gradient_penalty, generator=rng)
        else:
            per_failure = cfg.refine_steps + (1 if cfg.depth > 0 else 0)
            directions = max(1, (cfg.budget - cfg.failures_per_source * per_failure) // cfg.shells)
            out = shell_search(evaluate, mu, sigma, labels, directions=directions,
                               edges=shell_radii(cfg.min_radius, cfg.max_radius, cfg.shells),
                               refine_steps=cfg.refine_steps, per_source=cfg.failures_per_source, generator=rng,
                               depth=cfg.depth)
        with torch.no_grad():
            source_probs = F.softmax(self.classifier(x).float(), dim=1)
        source = out["source"]
        return {
            "source_index": index[source].cpu(),
            "source_label": labels[source].cpu(),
            "source_confidence": source_probs[source, labels[source]].cpu(),
            "predicted_label": out["predicted"].cpu(),
            "confidence": out["confidence"].cpu(),
            "radius": out["radius"].cpu(),
            "z": out["z"].cpu(),
            "queries": out["queries"].reshape(1).cpu(),
        }


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class SourceSelection:
    """Which images of the split the search starts from, and why the others were left out."""

    index: torch.Tensor  # (S,) rows of the split
    stats: dict[str, int]


def select_sources(
    classifier: nn.Module, generator: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    max_sources: int | None = None, seed: int = 0,
) -> SourceSelection:
    """Images the classifier gets right whose reconstruction decode(mu) it also gets right.

    With ``max_sources`` a seeded random subset of those is kept (sorted, for stable output).
    """
    pred = predict_labels(classifier, images)
    pred_recon = predict_labels(classifier, reconstruct(generator, images))
    correct = pred == labels
    eligible = correct & (pred_recon == labels)
    index = torch.nonzero(eligible).flatten()
    if max_sources is not None and len(index) > max_sources:
        keep = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))[:max_sources]
        index = index[keep].sort().values
    stats = {
        "images": int(len(labels)),
        "excluded_misclassified": int((~correct).sum()),
        "excluded_reconstruction_misclassified": int((correct & ~eligible).sum()),
        "eligible": int(eligible.sum()),
        "sources": int(len(index)),
    }
    return SourceSelection(index, stats)


def latent_means(generator: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([generator.encode(images[i : i + batch_size])[0] for i in range(0, len(images), batch_size)])


def identify(
    classifier: nn.Module,
    generator: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    validity: ValidityModel,
    config: IdentifyConfig,
    *,
    seed: int = 0,
    trainer: TrainerConfig | None = None,
) -> Failures:
    """Search for failures around the eligible images of one split.

    Args:
        classifier: [0,1] images (N, C, H, W) -> logits (N, K).
        generator: encode / decode / latent_dim.
        images, labels: the split searched, (N, C, H, W) floats in [0, 1] and (N,).
        validity: scores each failure's chance of still being its source class.
        config: search settings (budget in classifier queries per source, mode, radii...).
        seed: the search's random stream.
        trainer: accelerator settings for Lightning's predict.
    """
    # Work on copies: the search freezes and switches modules to eval mode, which must not leak to the caller.
    classifier, generator = copy.deepcopy(classifier).eval(), copy.deepcopy(generator).eval()
    selection = select_sources(classifier, generator, images, labels, config.max_sources, seed)
    stats: dict[str, Any] = dict(selection.stats)
    correct = stats["images"] - stats["excluded_misclassified"]
    if correct and stats["eligible"] / correct < WEAK_RECONSTRUCTION:
        log.warning(
            "Only %d of %d correctly classified images keep their class through the generator's reconstruction: "
            "the generator is too weak to search with. Train it longer or larger.", stats["eligible"], correct,
        )
    d = int(generator.latent_dim)
    if len(selection.index) == 0:
        log.warning("No eligible source images: nothing to search.")
        return _assemble([], validity, d, stats, config)
    mu = latent_means(generator, images[selection.index])
    if not torch.isfinite(mu).all():
        raise ValueError("The generator's encoder returned NaN or infinite latents for some sources: "
                         "its weights are broken. Re-train it with `defuse fit-generator --force`.")
    trainer_config = trainer or TrainerConfig(progress_bar=False)
    module = SearchModule(classifier, generator, config, seed)
    loader = DataLoader(
        _Sources(images[selection.index], labels[selection.index], selection.index),
        batch_size=config.batch_sources, shuffle=False, collate_fn=_whole_batch,
    )
    runner = pl.Trainer(
        accelerator=trainer_config.accelerator, devices="auto", logger=False,
        enable_progress_bar=trainer_config.progress_bar, enable_model_summary=False,
        inference_mode=config.mode != "gradient",
    )
    outputs = runner.predict(module, dataloaders=loader)
    return _assemble(outputs, validity, d, stats, config)


def _assemble(
    outputs: list[dict[str, torch.Tensor]], validity: ValidityModel, d: int, stats: dict[str, Any], config: IdentifyConfig
) -> Failures:
    keys = ("source_index", "source_label", "source_confidence", "predicted_label", "confidence", "radius", "z")
    cat = {k: torch.cat([o[k] for o in outputs]) if outputs else torch.empty(0) for k in keys}
    z = cat["z"].reshape(-1, d).numpy().astype(np.float32)
    queries = int(sum(int(o["queries"].sum()) for o in outputs))
    if len(z) and not np.isfinite(z).all():
        raise ValueError("The search produced NaN or infinite latents; lower identify.max_radius.")
    source_label = cat["source_label"].long().numpy()
    probs = validity.scores(z) if len(z) else np.zeros((0, len(validity.intercept)))
    valid_p = probs[np.arange(len(z)), source_label] if len(z) else np.zeros(0)
    table = pd.DataFrame({
        "source_index": cat["source_index"].long().numpy(),
        "source_label": source_label,
        "predicted_label": cat["predicted_label"].long().numpy(),
        "confidence": cat["confidence"].float().numpy(),
        "source_confidence": cat["source_confidence"].float().numpy(),
        "radius": cat["radius"].float().numpy(),
        "validity": valid_p.astype(np.float32),
        "validity_label": probs.argmax(axis=1).astype(np.int64) if len(z) else np.zeros(0, np.int64),
        "valid": valid_p >= config.validity_threshold,
        "mode": [config.mode] * len(z),
    })
    stats.update({
        "failures": int(len(table)),
        "valid_failures": int(table["valid"].sum()),
        "sources_with_failure": int(table["source_index"].nunique()),
        "queries": queries,
        "valid_failures_per_1000_queries": round(1000 * float(table["valid"].sum()) / max(queries, 1), 3),
    })
    return Failures(table, z, stats)
