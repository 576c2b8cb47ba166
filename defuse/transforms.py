"""The image transforms the invariance checks apply: batched over float images (N, C, H, W) in [0, 1].

Every transform is torchvision's transforms v2 functional API (or ``torch.rot90``) applied to a whole batch with
one parameter value, so a check costs one call per value, never one per image. Geometric transforms resample
bilinearly and fill what comes into view with 0 (black: the background of digit images; on natural images
an empty border, which is part of what the check measures).

Two families of checks read them:

* **Effective Invariance** (:mod:`defuse.invariance.ei`) compares each image with a few *views* of it:
  :data:`EI_VIEWS` names them, with their magnitudes.
* **ML4ML variance matrices** (:mod:`defuse.invariance.variance`) sweep a *grid* of 31 values per family:
  :data:`GRIDS`, as in Liao et al. 2021 (rotation -15..+15 degrees in 1-degree steps, brightness and scale
  factors in linspace(0.7, 1.3, 31)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

Images = torch.Tensor  # (N, C, H, W) float in [0, 1]


def rotate(images: Images, degrees: float) -> Images:
    """Rotated counter-clockwise by ``degrees`` about the centre, same size, bilinear, black fill."""
    if degrees == 0:
        return images
    return TF.rotate(images, float(degrees), interpolation=InterpolationMode.BILINEAR, fill=0.0)


def rotate90(images: Images, quarter_turns: int) -> Images:
    """Rotated by ``quarter_turns`` x 90 degrees counter-clockwise: exact, no interpolation (the EI paper's)."""
    return torch.rot90(images, quarter_turns, dims=(-2, -1))


def brighten(images: Images, factor: float) -> Images:
    """Intensities multiplied by ``factor`` and clipped to [0, 1] (torchvision's ``adjust_brightness``)."""
    if factor == 1:
        return images
    return TF.adjust_brightness(images, float(factor))


def rescale(images: Images, factor: float) -> Images:
    """Zoomed by ``factor`` about the centre (< 1 shrinks, with a black border), same size, bilinear."""
    if factor == 1:
        return images
    return TF.affine(images, angle=0.0, translate=[0.0, 0.0], scale=float(factor), shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR, fill=0.0)


def translate(images: Images, dx: int, dy: int) -> Images:
    """Shifted by whole pixels (``dx`` right, ``dy`` down), black fill: exact, no interpolation."""
    return TF.affine(images, angle=0.0, translate=[int(dx), int(dy)], scale=1.0, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.NEAREST, fill=0.0)


def grayscale(images: Images) -> Images:
    """Colour images as three equal channels of their luminance (ITU-R 601-2, torchvision's weights)."""
    return TF.rgb_to_grayscale(images, num_output_channels=3)


def random_augment(images: Images, generator: torch.Generator, rotation: float = 0.0, scale: float = 0.0,
                   brightness: float = 0.0) -> Images:
    """Each image turned by U(-rotation, rotation) degrees, zoomed by U(1 - scale, 1 + scale) and its intensities
    multiplied by U(1 - brightness, 1 + brightness) (clipped to [0, 1]): per image, in one batched resampling
    (``affine_grid`` + ``grid_sample``, bilinear, black fill). ``generator`` (CPU) draws every parameter."""
    n = len(images)

    def uniform(half_width: float) -> torch.Tensor:
        return ((torch.rand(n, generator=generator) * 2 - 1) * half_width).to(images.device, images.dtype)

    out = images
    if rotation or scale:
        angle = torch.deg2rad(uniform(rotation))
        zoom = 1 + uniform(scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)
    if brightness:
        out = (out * (1 + uniform(brightness)).view(-1, 1, 1, 1)).clamp(0, 1)
    return out


@dataclass(frozen=True)
class View:
    """One transformed view of a batch: a name for reports and the function that makes it."""

    name: str
    apply: Callable[[Images], Images]


def translation_pixels(width: int) -> int:
    """The translation magnitude: a tenth of the image width, at least one pixel (3 px at 28 px)."""
    return max(1, round(0.1 * width))


def ei_views(name: str, channels: int, width: int) -> list[View] | None:
    """The views of an EI transform; ``None`` when it does not apply to such images (grayscale on one channel).

    Magnitudes: ``rotation`` the paper's 90, 180 and 270 degrees; ``rotation15`` +-15 degrees; ``brightness``
    factors 0.7 and 1.3; ``scale`` 0.8 and 1.2; ``translation`` +-:func:`translation_pixels` along each axis.
    The EI of an image under a transform is the mean over its views."""
    if name not in EI_TRANSFORMS:
        raise ValueError(f"`transform` must be one of {', '.join(EI_TRANSFORMS)}, got {name!r} instead.")
    if name == "rotation":
        return [View(f"rot{90 * k}", lambda x, k=k: rotate90(x, k)) for k in (1, 2, 3)]
    if name == "grayscale":
        return [View("grayscale", grayscale)] if channels == 3 else None
    if name == "rotation15":
        return [View(f"rotate{d:+d}", lambda x, d=d: rotate(x, d)) for d in (-15, 15)]
    if name == "brightness":
        return [View(f"brightness{f:g}", lambda x, f=f: brighten(x, f)) for f in (0.7, 1.3)]
    if name == "scale":
        return [View(f"scale{f:g}", lambda x, f=f: rescale(x, f)) for f in (0.8, 1.2)]
    shift = translation_pixels(width)
    return [View(f"shift{dx:+d},{dy:+d}", lambda x, dx=dx, dy=dy: translate(x, dx, dy))
            for dx, dy in ((-shift, 0), (shift, 0), (0, -shift), (0, shift))]


EI_TRANSFORMS = ("rotation", "grayscale", "rotation15", "brightness", "scale", "translation")

# ML4ML's grids: 31 values per family, the identity in the middle (index 15).
GRID_SIZE = 31
GRIDS: dict[str, np.ndarray] = {
    "rotation": np.linspace(-15.0, 15.0, GRID_SIZE),
    "brightness": np.linspace(0.7, 1.3, GRID_SIZE),
    "scale": np.linspace(0.7, 1.3, GRID_SIZE),
}
GRID_TRANSFORMS: dict[str, Callable[[Images, float], Images]] = {
    "rotation": rotate, "brightness": brighten, "scale": rescale,
}
IDENTITY_INDEX = GRID_SIZE // 2
