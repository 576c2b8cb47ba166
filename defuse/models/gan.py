"""A DCGAN with an inverter: the generator kind ``gan`` (``generator.kind: gan``) behind the Generator protocol.

A VAE trained on the pixel likelihood blurs what matters most on a colour sign (the digits of a speed limit), and
then the search finds the blur, not the classifier's bugs. A GAN's samples stay sharp, but the search needs an
encoder: it starts from real images. So beside the generator G (z -> image, z ~ N(0, I)) and its discriminator D
(kept in the training module, not in generator.ckpt), an inverter E (image -> z) is trained alongside, on two
losses: the latent of a drawn sample (||E(G(z)) - z||^2, the post-hoc inversion of Zhu et al. 2016 and of the
Defuse paper's own appendix) and the reconstruction of a real image through the frozen G (||G(E(x)) - x||^2, so real
images, not only G's own samples, land where G draws them).

``encode`` returns (E(x), log sigma^2), where sigma (per latent dimension) is the inverter's error on drawn latents,
measured once training ends: the uncertainty of where an image lies in z, which the search's shells and the validity
judge read as a VAE's posterior width.
"""

from __future__ import annotations

from itertools import pairwise

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from defuse.models.inference import as_input, is_channels_last

_UPSAMPLINGS = {28: 2, 32: 3, 64: 4}  # 7 -> 14 -> 28; 4 -> 8 -> 16 -> 32; 4 -> ... -> 64
_SIGMA_SAMPLES = 2048


class InvertedGAN(nn.Module):
    """The generator and its inverter, for 1 or 3 channels at 28, 32 or 64 px.

    Args:
        in_channels: C, 1 or 3.
        image_size: H = W, one of 28, 32, 64.
        latent_dim: size of z.
        width: channels of the generator's last hidden layer and the inverter's first; doubled per resolution.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, latent_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"`in_channels` must be 1 or 3, got {in_channels} instead.")
        if image_size not in _UPSAMPLINGS:
            raise ValueError(f"`image_size` must be one of 28, 32, 64; got {image_size} instead.")
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        n = _UPSAMPLINGS[image_size]
        self._base = image_size // 2**n
        channels = [width * 2**i for i in range(n)][::-1]  # e.g. 128, 64, 32 at 32 px
        self._top = channels[0]
        self.project = nn.Sequential(nn.Linear(latent_dim, self._top * self._base**2), nn.ReLU())
        up: list[nn.Module] = [nn.BatchNorm2d(self._top)]
        for c_in, c_out in pairwise(channels):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        up.append(nn.ConvTranspose2d(channels[-1], in_channels, 4, stride=2, padding=1))
        self.generator = nn.Sequential(*up)
        self.inverter = _conv_stack(in_channels, channels[::-1], latent_dim, normalise=nn.BatchNorm2d)
        # The inverter's error per latent dimension on drawn latents (set by GANModule when training ends).
        self.register_buffer("log_sigma2", torch.zeros(latent_dim))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(self.project(z).view(-1, self._top, self._base, self._base))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.inverter(x)
        return mu, self.log_sigma2.expand_as(mu)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


def _conv_stack(in_channels: int, channels: list[int], out: int, normalise=None, wrap=lambda m: m) -> nn.Sequential:
    """Stride-2 convolutions through ``channels``, then a linear map of the flattened features to ``out``."""
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip([in_channels, *channels[:-1]], channels)):
        layers.append(wrap(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)))
        if normalise is not None and i > 0:
            layers.append(normalise(c_out))
        layers.append(nn.LeakyReLU(0.2))
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), wrap(nn.Linear(channels[-1] * 16, out))]
    return nn.Sequential(*layers)


class GANModule(pl.LightningModule):
    """Trains an :class:`InvertedGAN`: the non-saturating GAN loss against a spectrally normalised discriminator,
    and the inverter on its two losses, one step each per batch (manual optimisation).

    Args:
        in_channels, image_size, latent_dim, width: see :class:`InvertedGAN`.
        lr: Adam learning rate of the generator and the discriminator (betas 0.5, 0.999, as DCGAN's).
        inverter_lr: Adam learning rate of the inverter.
        reconstruction_weight: weight of the real images' reconstruction in the inverter's loss.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, latent_dim: int = 64, width: int = 32,
                 lr: float = 2e-4, inverter_lr: float = 1e-3, reconstruction_weight: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.gan = InvertedGAN(in_channels, image_size, latent_dim, width)
        n = _UPSAMPLINGS[image_size]
        self.discriminator = _conv_stack(in_channels, [width * 2**i for i in range(n)], 1, wrap=spectral_norm)

    def _latents(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, device=like.device, dtype=like.dtype)

    def training_step(self, batch, batch_idx):
        x = as_input(batch[0], is_channels_last(self.gan))
        opt_g, opt_d, opt_e = self.optimizers()
        g = self.gan
        fake = g.decode(self._latents(len(x), x))
        loss_d = F.softplus(-self.discriminator(x)).mean() + F.softplus(self.discriminator(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = F.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        # The inverter: latents of drawn samples, and real images through the generator (whose weights stay).
        z = self._latents(len(x), x)
        with torch.no_grad():
            drawn = g.decode(z)
        latent_loss = F.mse_loss(g.inverter(drawn), z)
        image_loss = F.binary_cross_entropy_with_logits(g.decode_logits(g.inverter(x)), x)
        loss_e = latent_loss + self.hparams.reconstruction_weight * image_loss
        opt_e.zero_grad()
        self.manual_backward(loss_e)
        opt_e.step()  # the generator's gradients from this loss are cleared before its next step
        self.log_dict({"loss_d": loss_d, "loss_g": loss_g, "latent_loss": latent_loss, "image_loss": image_loss},
                      prog_bar=True, on_epoch=True, on_step=False)

    def on_train_end(self) -> None:
        """The inverter's error per latent dimension on fresh drawn latents: encode's posterior width."""
        g = self.gan
        was_training = g.training
        g.eval()
        with torch.no_grad():
            z = self._latents(_SIGMA_SAMPLES, g.log_sigma2)
            error = g.inverter(g.decode(z)) - z
            g.log_sigma2.copy_(error.pow(2).mean(dim=0).clamp_min(1e-4).log())
        g.train(was_training)

    def configure_optimizers(self):
        g = self.gan
        return (torch.optim.Adam([*g.project.parameters(), *g.generator.parameters()], lr=self.hparams.lr,
                                 betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=(0.5, 0.999)),
                torch.optim.Adam(g.inverter.parameters(), lr=self.hparams.inverter_lr))


__all__ = ["GANModule", "InvertedGAN"]
