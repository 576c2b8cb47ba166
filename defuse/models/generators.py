"""Generators whose latent space is searched, and the beta-VAE that implements one.

A generator maps images ``(N, C, H, W)`` in [0, 1] to a Gaussian posterior
``(mu, logvar)``, each ``(N, latent_dim)``, and latents back to images in [0, 1].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from defuse.models.inference import as_input, encode, is_channels_last

# The class dimensions' posterior log-variance: a scale of exp(-6) = 0.0025, so a search step of r posterior
# scales (r <= a few tens) moves the one-hot class by under a tenth of a unit: the class stays the source's.
CLASS_LOGVAR = -12.0
_DOWNSAMPLINGS = {28: 2, 32: 2, 64: 3}


@runtime_checkable
class Generator(Protocol):
    """What the search needs of a generative model."""

    latent_dim: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W) in [0, 1] -> posterior mean and log-variance, each (N, latent_dim). A
        class-conditional generator (``num_classes`` > 0) also takes the images' labels: ``encode(x, labels)``
        (:func:`defuse.models.inference.encode` passes them where it must)."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, latent_dim) -> images (N, C, H, W) in [0, 1]."""
        ...


class ConvVAE(nn.Module):
    """A convolutional VAE for 1 or 3 channels at 28, 32 or 64 px.

    Args:
        in_channels: C, 1 or 3.
        image_size: H = W, one of 28, 32, 64.
        latent_dim: size of z.
        width: channels after the first stride-2 conv; doubled at each further one.
        num_classes: K > 0 makes it class-conditional: the latent ends with the image's class as K one-hot
            dimensions (``latent_dim`` counts them), which :meth:`encode` takes from the labels given to it, with a
            posterior scale so small that no search step changes the class. The decoder reads them as it reads
            the rest, so the class's parts (a sign's digits) need no room in the learned dimensions, and light,
            pose or background seen with other classes carry over to a class whose labelled images rarely show them.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 16, width: int = 32,
                 num_classes: int = 0) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"`in_channels` must be 1 or 3, got {in_channels} instead.")
        if image_size not in _DOWNSAMPLINGS:
            raise ValueError(f"`image_size` must be one of 28, 32, 64; got {image_size} instead.")
        self.num_classes = num_classes
        self.style_dim = latent_dim  # the learned dimensions; the class's one-hot ones follow them
        self.latent_dim = latent_dim + num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        n = _DOWNSAMPLINGS[image_size]
        channels = [in_channels] + [width * 2**i for i in range(n)]
        self._base = image_size // 2**n
        self._top = channels[-1]
        flat = self._top * self._base * self._base
        hidden = 256

        down: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, hidden), nn.LeakyReLU(0.2))
        self.to_mu = nn.Linear(hidden, latent_dim)
        self.to_logvar = nn.Linear(hidden, latent_dim)

        up: list[nn.Module] = []
        reversed_channels = channels[::-1]
        for i, (c_in, c_out) in enumerate(zip(reversed_channels[:-1], reversed_channels[1:])):
            up.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < n - 1:
                up += [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.decoder_fc = nn.Sequential(
            nn.Linear(self.latent_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, flat), nn.LeakyReLU(0.2)
        )
        self.decoder_conv = nn.Sequential(*up)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, (N, latent_dim) each; a conditional VAE needs the images' ``labels``."""
        h = self.encoder(x)
        mu, logvar = self.to_mu(h), self.to_logvar(h).clamp(-12.0, 8.0)
        if not self.num_classes:
            return mu, logvar
        if labels is None:
            raise ValueError("This generator is class-conditional (generator.conditional): encoding an image needs "
                             "its label.")
        code = F.one_hot(labels.to(mu.device).long(), self.num_classes).to(mu.dtype)
        return torch.cat([mu, code], dim=1), torch.cat([logvar, torch.full_like(code, CLASS_LOGVAR)], dim=1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_fc(z).view(-1, self._top, self._base, self._base)
        return self.decoder_conv(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """decode(mu): the deterministic reconstruction used to vet search sources."""
        return self.decode(self.encode(x, labels)[0])


def prior_latents(generator: nn.Module, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
    """``n`` latents from the generator's prior: standard normal, and for a class-conditional generator a class
    drawn uniformly in its one-hot dimensions (for baselines and sample-quality figures; the search starts from
    real images instead)."""
    classes = int(getattr(generator, "num_classes", 0))
    z = torch.randn(n, int(generator.latent_dim) - classes, generator=rng)
    if not classes:
        return z
    drawn = torch.randint(classes, (n,), generator=rng)
    return torch.cat([z, F.one_hot(drawn, classes).to(z.dtype)], dim=1)


def elbo_terms(
    vae: ConvVAE, x: torch.Tensor, generator: torch.Generator | None = None, return_reconstruction: bool = False,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-batch mean reconstruction loss and KL divergence of a Bernoulli-decoder VAE.

    Both are summed over pixels / latent dims and averaged over the batch, so
    ``recon + beta * kl`` is the negative beta-ELBO per image. The sample uses the
    reparameterisation trick, so both terms carry gradient to the encoder. ``return_reconstruction`` adds the
    decoded sample as a third value. A conditional VAE's class dimensions are given, not inferred: they are
    decoded as they are and carry no KL term.
    """
    mu, logvar = encode(vae, x, labels)
    style = getattr(vae, "style_dim", mu.shape[1])
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    eps[:, style:] = 0.0
    z = mu + eps * torch.exp(0.5 * logvar)
    logits = vae.decode_logits(z)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    mu, logvar = mu[:, :style], logvar[:, :style]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    if return_reconstruction:  # the sampled reconstruction in [0, 1], for losses on top of the ELBO
        return recon, kl, torch.sigmoid(logits)
    return recon, kl


class VAEModule(pl.LightningModule):
    """Trains a :class:`ConvVAE` on the negative beta-ELBO, plus an optional perceptual term.

    Args:
        in_channels, image_size, latent_dim, width: see :class:`ConvVAE`.
        beta: weight of the KL term.
        lr: Adam learning rate (cosine-annealed to zero).
        perceptual: weight of ``|f(x) - f(x_hat)|^2`` (mean over features, times H*W so it weighs like one
            channel's pixel loss) for the frozen ``features`` network f; 0 or no network: off.
        features: images in [0, 1] -> feature maps; frozen and kept in eval mode, never saved with the VAE.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        latent_dim: int = 16,
        width: int = 32,
        beta: float = 1.0,
        lr: float = 2e-3,
        perceptual: float = 0.0,
        features: nn.Module | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["features"])
        self.vae = ConvVAE(in_channels, image_size, latent_dim, width, num_classes)
        # A plain attribute in a tuple, not a submodule: Lightning's train() must not switch its batch norms to
        # training mode, and the optimiser and the checkpoint must not see it.
        self._features = (features.eval().requires_grad_(False),) if features is not None and perceptual else ()

    def _common_step(self, batch, stage: str) -> torch.Tensor:
        x = as_input(batch[0], is_channels_last(self.vae))  # trained channels-last: see defuse.models.training.train_vae
        recon, kl, x_hat = elbo_terms(self.vae, x, return_reconstruction=True,
                                      labels=batch[1] if self.vae.num_classes else None)
        loss = recon + self.hparams.beta * kl
        if self._features:
            features = self._features[0]
            with torch.no_grad():
                target = features(x)
            perceptual = (features(x_hat) - target).pow(2).mean() * x.shape[-1] * x.shape[-2]
            loss = loss + self.hparams.perceptual * perceptual
            self.log(f"{stage}_perceptual", perceptual, on_epoch=True, on_step=False)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        self.log(f"{stage}_recon", recon, on_epoch=True, on_step=False)
        self.log(f"{stage}_kl", kl, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": schedule}
