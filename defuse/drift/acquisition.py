"""A differentiable image-acquisition model: processed images are "unprocessed" to linear light, then re-acquired
under physically named parameters (after raw2logit, Oala et al. 2023, and unprocessing, Brooks et al. 2019).

Notation: x is a batch of processed images (N, C, H, W) in [0, 1]; every parameter is a tensor of shape (N,) (one
setting per image, so many settings run in one batch) or a float. The forward pipeline, in the order light meets
it:

1. unprocess: linear = x ** 2.2 (the display gamma the images were stored with; the camera's colour matrix is
   unknown, so it is taken as the identity and nothing is inverted for it: an approximation);
2. ``blur_sigma``: the optics' point-spread function, a Gaussian of that many pixels (kornia gaussian_blur2d with a
   tensor sigma; 0 is no blur);
3. ``resolution``: the sensor's sampling, down to that fraction of the side (area average) and back up (bilinear);
   1 is the native resolution. The output size is an integer, so this parameter is piecewise constant: its
   gradient is 0 and only the tolerance search (bisection) measures it;
4. ``exposure_ev``: exposure in stops, linear * 2 ** ev;
5. ``shot_noise``, ``read_noise``: sensor noise, linear + shot * sqrt(linear) * e1 + read * e2 with e1, e2 ~ N(0, 1)
   drawn once from a seeded generator (reparameterised: the same draw for every setting, so settings differ only
   by their parameters and gradients flow through them). Two Gaussians stand in for Poisson shot noise, whose
   variance (shot^2 * signal) they match: the usual approximation at these signal levels;
6. ``black_level``: a mis-calibrated black level, (linear - b) / (1 - b);
7. ``mosaic`` (RGB): the share of bilinear demosaicing artefacts, blending in kornia's rgb_to_raw -> raw_to_rgb
   (Bayer BG); 0 is none (bilinear demosaicing is not invertible, so it cannot be part of the identity path);
8. ``wb_red``, ``wb_blue`` (RGB): white-balance gains of the red and blue channels relative to green;
9. ``saturation`` (RGB): the colour-correction matrix s * I + (1 - s) * luma, 1 is the identity matrix;
10. ``sharpen``: unsharp masking on all channels, out + a * (out - blur_1px(out));
11. clip to [0, 1], then ``gamma``: out ** (1 / gamma); 2.2 gives back the stored encoding.

At the identity (``IDENTITY``) the pipeline returns its input up to float rounding (max error below 1e-6; a test).
Parameters carry physical bounds (``PARAMETERS``); nothing outside them is ever applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STORED_GAMMA = 2.2
EPS = 1e-8  # keeps pow() and its gradients finite at black pixels
BLACK = EPS ** STORED_GAMMA  # the linear value of a black pixel: the floor that gives EPS back after the gamma
BLUR_KERNEL = 13  # covers 2 sigma of the largest optical blur (3 px)
SHARPEN_SIGMA = 1.0


@dataclass(frozen=True)
class Parameter:
    """One physical parameter: its identity value, its bounds, its unit and whether it applies to gray images."""

    name: str
    identity: float
    low: float
    high: float
    unit: str
    rgb_only: bool = False
    differentiable: bool = True

    @property
    def span(self) -> float:
        return self.high - self.low


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("exposure_ev", 0.0, -3.0, 3.0, "stops"),
    Parameter("black_level", 0.0, -0.2, 0.2, "fraction of full scale"),
    Parameter("gamma", STORED_GAMMA, 1.0, 4.0, "exponent"),
    Parameter("blur_sigma", 0.0, 0.0, 3.0, "pixels (Gaussian PSF)"),
    Parameter("sharpen", 0.0, 0.0, 3.0, "unsharp-mask amount"),
    Parameter("shot_noise", 0.0, 0.0, 0.3, "std at full scale (sqrt of signal)"),
    Parameter("read_noise", 0.0, 0.0, 0.3, "std, fraction of full scale"),
    Parameter("resolution", 1.0, 0.2, 1.0, "fraction of the side", differentiable=False),
    Parameter("mosaic", 0.0, 0.0, 1.0, "share of demosaicing artefacts", rgb_only=True),
    Parameter("wb_red", 1.0, 0.5, 2.0, "gain", rgb_only=True),
    Parameter("wb_blue", 1.0, 0.5, 2.0, "gain", rgb_only=True),
    Parameter("saturation", 1.0, 0.0, 2.0, "colour-matrix saturation", rgb_only=True),
)
BY_NAME = {p.name: p for p in PARAMETERS}
IDENTITY = {p.name: p.identity for p in PARAMETERS}


def parameters_for(channels: int) -> tuple[Parameter, ...]:
    """The parameters that act on images with ``channels`` channels (colour ones need 3)."""
    return tuple(p for p in PARAMETERS if channels == 3 or not p.rgb_only)


def check_setting(setting: dict[str, float], channels: int) -> None:
    """Raise ValueError for an unknown parameter, a colour parameter on gray images, or a value out of bounds."""
    for name, value in setting.items():
        if name not in BY_NAME:
            known = ", ".join(BY_NAME)
            raise ValueError(f"Unknown drift parameter {name!r}; the parameters are: {known}.")
        p = BY_NAME[name]
        if p.rgb_only and channels != 3:
            raise ValueError(f"Drift parameter `{name}` acts on colour images only; these have {channels} channel(s).")
        if not p.low <= float(value) <= p.high:
            raise ValueError(f"Drift parameter `{name}` must be in [{p.low}, {p.high}] ({p.unit}), got {value} "
                             f"instead.")


@dataclass(frozen=True)
class SensorNoise:
    """The standard-normal draws of the noise terms, (N, C, H, W) each, drawn once per image set."""

    shot: torch.Tensor
    read: torch.Tensor

    @classmethod
    def draw(cls, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> SensorNoise:
        return cls(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))

    def repeat(self, times: int) -> SensorNoise:
        """The same draws for ``times`` copies of the image set (settings x images in one batch)."""
        return SensorNoise(self.shot.repeat(times, 1, 1, 1), self.read.repeat(times, 1, 1, 1))


def acquire(images: torch.Tensor, setting: dict[str, torch.Tensor | float], noise: SensorNoise | None = None
            ) -> torch.Tensor:
    """Re-acquire ``images`` (N, C, H, W) in [0, 1] under ``setting`` (parameter name -> (N,) tensor or float;
    missing parameters at their identity); returns (N, C, H, W) in [0, 1], differentiable in every parameter
    but ``resolution``. ``noise`` holds the standard-normal draws (required when a noise parameter is set)."""
    n, channels = images.shape[0], images.shape[1]

    def value(name: str) -> torch.Tensor:
        v = setting.get(name, IDENTITY[name])
        v = torch.as_tensor(v, dtype=images.dtype, device=images.device)
        return (v.expand(n) if v.dim() == 0 else v).view(n, 1, 1, 1)

    def given(name: str) -> bool:
        v = setting.get(name)
        return v is not None and (torch.is_tensor(v) and v.requires_grad or bool(
            (torch.as_tensor(v) != IDENTITY[name]).any()))

    linear = images.clamp_min(EPS) ** STORED_GAMMA
    if given("blur_sigma"):
        sigma = value("blur_sigma").view(n, 1).clamp_min(1e-3).expand(n, 2)
        linear = _blur(linear, sigma)
    if given("resolution"):
        linear = _resample(linear, value("resolution").view(n))
    if given("exposure_ev"):
        linear = linear * 2.0 ** value("exposure_ev")
    if given("shot_noise") or given("read_noise"):
        if noise is None:
            raise ValueError("Sensor noise needs its draws: pass `noise=SensorNoise.draw(images.shape, generator)`.")
        linear = linear + value("shot_noise") * linear.clamp_min(0).add(EPS).sqrt() * noise.shot \
            + value("read_noise") * noise.read
    if given("black_level"):
        b = value("black_level")
        linear = (linear - b) / (1 - b)
    if channels == 3:
        if given("mosaic"):
            from kornia.color import CFA, raw_to_rgb, rgb_to_raw

            m = value("mosaic")
            linear = linear + m * (raw_to_rgb(rgb_to_raw(linear, CFA.BG), CFA.BG) - linear)
        if given("wb_red") or given("wb_blue"):
            gains = torch.cat([value("wb_red"), torch.ones_like(value("wb_red")), value("wb_blue")], dim=1)
            linear = linear * gains
        if given("saturation"):
            luma = (linear * torch.tensor([0.299, 0.587, 0.114], dtype=linear.dtype, device=linear.device
                                          ).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
            s = value("saturation")
            linear = s * linear + (1 - s) * luma
    if given("sharpen"):
        soft = _blur(linear, torch.full((n, 2), SHARPEN_SIGMA, dtype=linear.dtype, device=linear.device))
        linear = linear + value("sharpen") * (linear - soft)
    # At the identity, (x^2.2)^(1/2.2) is x up to float rounding; black pixels come back as EPS (1e-8).
    return linear.clamp(BLACK, 1.0) ** (1.0 / value("gamma"))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    from kornia.filters import gaussian_blur2d

    return gaussian_blur2d(x, BLUR_KERNEL, sigma, border_type="reflect")


def _resample(x: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Down to ``fraction`` of the side (area average), back up (bilinear); per image, grouped by output size."""
    out = x.clone()
    size = x.shape[-1]
    targets = (fraction * size).round().clamp(2, size).long()
    for target in targets.unique().tolist():
        if target >= size:
            continue
        rows = (targets == target).nonzero().view(-1)
        low = F.interpolate(x[rows], size=(target, target), mode="area")
        out[rows] = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out
