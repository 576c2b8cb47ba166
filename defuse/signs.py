"""The built-in traffic-sign source (``data.source: signs``): GTSRB-like colour images rendered here, no download.

Every image is a function of one row of a factor table: its sign, a seed, and one named value per nuisance
factor (:data:`FACTORS`). :func:`draw_factors` draws the table from a numpy Generator; :func:`render` turns any
table into images, batch by batch, so an image depends on its own row only, never on the batch it is rendered in
or on the other rows. That is what lets a benchmark render the *same* sign at night and by day, or plant a factor
combination that training barely shows, and grade on freshly rendered images whose factors are known.

The pipeline, in the order light and a camera apply it: the sign's template (drawn once per class with Pillow)
is posed in 3-D (in-plane ``rotation``, ``yaw`` towards the camera, ``scale``, ``offset_x``/``offset_y``) and
projected with a homography (kornia), composited over a ``background`` (sky, foliage or wall texture), partly
covered by an ``occlusion`` (a branch or a pole across the sign), lit (``illumination``: day, dusk, night,
glare), given a ``cast_red``/``cast_blue`` white-balance error, blurred (``defocus``, ``motion`` along
``motion_angle``), and recorded by a noisy sensor (``noise``) and a JPEG encoder (``jpeg``, libjpeg via
torchvision; 0 = stored raw). The textures, the occluder's direction and the glare's place come from the row's
``seed`` through a counter-based hash, so they too depend on the row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

SPEED_LIMITS = (20, 30, 50, 60, 70, 80, 100, 120)
CLASSES = tuple(f"{v}kmh" for v in SPEED_LIMITS) + ("stop", "yield", "no_entry", "priority")
ILLUMINATIONS = ("day", "dusk", "night", "glare")
BACKGROUNDS = ("sky", "foliage", "wall")
JPEG_QUALITIES = (0, 30, 50, 70, 90)  # 0: stored raw
MOTION_LENGTHS = (0, 3, 5, 7)  # pixels at the output size; 0: still
SIZES = (32, 48, 64)
CATEGORICAL_FACTORS = ("background", "illumination")
# The factors, in the order the pipeline applies them; each is a column of the factor table.
FACTORS = ("rotation", "yaw", "scale", "offset_x", "offset_y", "background", "occlusion", "illumination",
           "cast_red", "cast_blue", "defocus", "motion", "motion_angle", "noise", "jpeg")
NUMERIC_FACTORS = tuple(f for f in FACTORS if f not in CATEGORICAL_FACTORS)
# What each illumination does to the scene's linear light: gain, gamma, and a tint (red, green, blue).
_LIGHT = {"day": (1.0, 1.0, (1.0, 1.0, 1.0)), "dusk": (0.62, 1.15, (1.08, 0.95, 0.80)),
          "night": (0.28, 1.35, (0.85, 0.92, 1.15)), "glare": (1.05, 0.85, (1.0, 1.0, 1.0))}
_CAMERA_DISTANCE = 4.0  # in half-widths of the sign: the strength of the perspective that yaw brings
_STREAMS = {"background": 1, "occluder": 2, "glare": 3, "noise": 4}


@dataclass(frozen=True)
class SignSet:
    """Rendered signs: ``images`` uint8 (N, 3, S, S), ``labels`` int64 (N,) into the set's classes, and the factor
    table they were rendered from (one row per image, :func:`draw_factors`'s columns; ``sign`` indexes
    :data:`CLASSES`)."""

    images: torch.Tensor
    labels: torch.Tensor
    factors: pd.DataFrame


@dataclass(frozen=True)
class Rare:
    """A factor combination the labelled pool keeps only ``keep`` of: ``sign`` with ``factor`` among ``values``
    (a categorical factor) or within [low, high] (a numeric one). The test split keeps all of it."""

    sign: str
    factor: str
    values: tuple[str, ...]
    keep: float = 0.03

    def matches(self, factors: pd.DataFrame) -> np.ndarray:
        """(N,) booleans: the rows of ``factors`` in the combination."""
        column = factors[self.factor].to_numpy()
        if self.factor in NUMERIC_FACTORS:
            low, high = (float(v) for v in self.values)
            inside = (column >= low) & (column <= high)
        else:
            inside = np.isin(column, list(self.values))
        return inside & (factors["sign"].to_numpy() == CLASSES.index(self.sign))


def sign_sets(images_per_class: int, test_per_class: int, seed: int = 0, size: int = 32,
              classes: tuple[str, ...] = CLASSES, rare: Rare | None = None) -> tuple[SignSet, SignSet]:
    """The source's labelled pool and its test split: every class of ``classes`` (a subset of :data:`CLASSES`, in
    its order; the labels index it) equally often, each split from its own stream of ``seed`` (the data set's seed,
    not the run's), so the test signs are fresh renders of the same distribution. With ``rare``, the pool keeps
    only ``rare.keep`` of that combination's images (a seeded choice; the class has that many fewer): a natural
    bug no label shows. Kept in memory for the process: every stage of a run reads the same source."""
    unknown = [name for name in classes if name not in CLASSES]
    if unknown or len(set(classes)) < 2:
        raise ValueError(f"Sign classes must be at least 2 of {', '.join(CLASSES)}; got {list(classes)} instead.")
    return _sign_sets(int(images_per_class), int(test_per_class), int(seed), int(size), tuple(classes), rare)


@lru_cache(maxsize=2)
def _sign_sets(images_per_class: int, test_per_class: int, seed: int, size: int, classes: tuple[str, ...],
               rare: Rare | None) -> tuple[SignSet, SignSet]:
    from defuse.seeding import numpy_rng

    kinds = np.array([CLASSES.index(name) for name in classes])
    out = []
    for split, count in (("pool", images_per_class), ("test", test_per_class)):
        rng = numpy_rng(seed, f"signs.{split}")
        labels = rng.permutation(np.repeat(np.arange(len(classes)), count))
        factors = draw_factors(kinds[labels], rng)
        if rare is not None and split == "pool":
            inside = rare.matches(factors)
            dropped = inside & (numpy_rng(seed, "signs.rare").random(len(factors)) >= rare.keep)
            labels, factors = labels[~dropped], factors[~dropped].reset_index(drop=True)
        out.append(SignSet(render(factors, size), torch.from_numpy(labels.astype(np.int64)), factors))
    return out[0], out[1]


def draw_factors(kinds: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """The nuisance factors of one image per entry of ``kinds`` (which sign: indices into :data:`CLASSES`), drawn
    from the default distribution: mostly daylight, moderate viewpoints, some blur, occlusion and compression."""
    n = len(kinds)

    def sometimes(p: float, values: np.ndarray) -> np.ndarray:
        return np.where(rng.random(n) < p, values, 0.0)

    return pd.DataFrame({
        "sign": np.asarray(kinds, dtype=np.int64),
        "seed": rng.integers(0, 2**62, n, dtype=np.int64),
        "rotation": np.clip(rng.normal(0.0, 6.0, n), -15.0, 15.0),
        "yaw": rng.uniform(-45.0, 45.0, n),
        "scale": rng.uniform(0.55, 0.9, n),
        "offset_x": rng.uniform(-0.1, 0.1, n),
        "offset_y": rng.uniform(-0.1, 0.1, n),
        "background": rng.choice(BACKGROUNDS, n),
        "occlusion": sometimes(0.2, rng.uniform(0.05, 0.35, n)),
        "illumination": rng.choice(ILLUMINATIONS, n, p=[0.55, 0.2, 0.15, 0.1]),
        "cast_red": rng.uniform(0.85, 1.15, n),
        "cast_blue": rng.uniform(0.85, 1.15, n),
        "defocus": sometimes(0.4, rng.uniform(0.3, 1.2, n)),
        "motion": rng.choice(MOTION_LENGTHS, n, p=[0.75, 0.1, 0.1, 0.05]).astype(np.int64),
        "motion_angle": rng.uniform(0.0, 180.0, n),
        "noise": rng.uniform(0.0, 0.05, n),
        "jpeg": rng.choice(JPEG_QUALITIES, n, p=[0.5, 0.1, 0.1, 0.15, 0.15]).astype(np.int64),
    })


def render(factors: pd.DataFrame, size: int = 32, batch_size: int = 256) -> torch.Tensor:
    """Images uint8 (N, 3, size, size), one per row of ``factors`` (:func:`draw_factors`'s columns)."""
    return torch.cat([render_layers(factors.iloc[i:i + batch_size], size)[0]
                      for i in range(0, len(factors), batch_size)]) if len(factors) else \
        torch.zeros(0, 3, size, size, dtype=torch.uint8)


def render_layers(factors: pd.DataFrame, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: the images uint8 (B, 3, S, S) and the sign's coverage float (B, 1, S, S) in [0, 1] (after the
    pose, before occlusion): what the property tests and the benchmark's subgroup features read."""
    if size not in SIZES:
        raise ValueError(f"Sign images are rendered at {', '.join(map(str, SIZES))} px, got {size} instead.")
    missing = [c for c in ("sign", "seed", *FACTORS) if c not in factors.columns]
    if missing:
        raise ValueError(f"The factor table lacks column(s) {', '.join(missing)}: draw it with draw_factors.")
    seeds = factors["seed"].to_numpy(np.int64).astype(np.uint64)
    sign, coverage = _posed_signs(factors, size)
    scene = sign + (1.0 - coverage) * _backgrounds(factors["background"].to_numpy(), seeds, size)
    scene = _occlude(scene, factors, seeds, size)
    scene = _light(scene, factors["illumination"].to_numpy(), seeds)
    scene = scene * _cast(factors)
    scene = _blur(scene.clamp(0.0, 1.0), factors)
    noise = torch.from_numpy(_normal(seeds, _STREAMS["noise"], (3, size, size)))
    scene = scene + _column(factors, "noise") * noise
    images = scene.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return _jpeg(images, factors["jpeg"].to_numpy()), coverage


# ----------------------------------------------------------------------------- the sign


@cache
def templates(resolution: int = 128) -> torch.Tensor:
    """Every class's sign, premultiplied RGBA float (K, 4, R, R): drawn by Pillow at 4x and downsampled."""
    return torch.stack([_template(name, resolution) for name in CLASSES])


def _template(name: str, resolution: int) -> torch.Tensor:
    from PIL import Image, ImageDraw

    big = resolution * 4
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    red, white, black, yellow = (200, 16, 30, 255), (245, 245, 245, 255), (15, 15, 15, 255), (250, 190, 0, 255)
    c, r = big / 2, big * 0.48

    def polygon(corners: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(c + radius * math.cos(start + 2 * math.pi * i / corners),
                 c + radius * math.sin(start + 2 * math.pi * i / corners)) for i in range(corners)]

    if name.endswith("kmh"):
        draw.ellipse([c - r, c - r, c + r, c + r], fill=red)
        draw.ellipse([c - 0.78 * r, c - 0.78 * r, c + 0.78 * r, c + 0.78 * r], fill=white)
        _text(draw, name[:-3], (c, c), 1.15 * r, 0.75 * r, black)
    elif name == "stop":
        draw.polygon(polygon(8, r, math.pi / 8), fill=white)
        draw.polygon(polygon(8, 0.9 * r, math.pi / 8), fill=red)
        _text(draw, "STOP", (c, c), 1.45 * r, 0.55 * r, white)
    elif name == "yield":  # a triangle pointing down, its centroid at the centre
        draw.polygon(polygon(3, 1.08 * r, math.pi / 2), fill=red)
        draw.polygon(polygon(3, 0.62 * r, math.pi / 2), fill=white)
    elif name == "no_entry":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=red)
        draw.rectangle([c - 0.68 * r, c - 0.17 * r, c + 0.68 * r, c + 0.17 * r], fill=white)
    else:  # priority road: a yellow diamond in a white one with a thin dark edge
        draw.polygon(polygon(4, 1.02 * r, 0.0), fill=black)
        draw.polygon(polygon(4, 0.97 * r, 0.0), fill=white)
        draw.polygon(polygon(4, 0.68 * r, 0.0), fill=yellow)
    small = canvas.resize((resolution, resolution), Image.LANCZOS)
    rgba = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return torch.cat([rgba[:3] * rgba[3:], rgba[3:]])  # premultiplied: warps blend edges without dark fringes


def _text(draw, text: str, centre: tuple[float, float], width: float, height: float, fill) -> None:
    """``text`` in a bold sans (matplotlib's bundled DejaVu, so every machine draws the same glyphs), as large as
    fits ``width`` x ``height``, centred."""
    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    font = ImageFont.truetype(str(path), size=100)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    size = int(100 * min(width / (right - left), height / (bottom - top)))
    font = ImageFont.truetype(str(path), size=size)
    draw.text(centre, text, font=font, fill=fill, anchor="mm")


def _posed_signs(factors: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The premultiplied sign (B, 3, S, S) and its coverage (B, 1, S, S): each template posed in 3-D, projected,
    warped at twice the size and averaged down (so thin strokes do not alias)."""
    from kornia.geometry.transform import get_perspective_transform, warp_perspective

    sheet = templates()
    resolution, twice = sheet.shape[-1], 2 * size
    roll = torch.from_numpy(np.radians(factors["rotation"].to_numpy(np.float64))).float()[:, None]
    yaw = torch.from_numpy(np.radians(factors["yaw"].to_numpy(np.float64))).float()[:, None]
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    x = corners[:, 0] * torch.cos(roll) - corners[:, 1] * torch.sin(roll)  # in the sign's plane
    y = corners[:, 0] * torch.sin(roll) + corners[:, 1] * torch.cos(roll)
    depth = x * torch.sin(yaw)  # turned about the vertical axis, then seen through a pinhole
    project = _CAMERA_DISTANCE / (_CAMERA_DISTANCE + depth)
    half = _column(factors, "scale").view(-1, 1) * twice / 2
    centre_x = twice / 2 + _column(factors, "offset_x").view(-1, 1) * twice
    centre_y = twice / 2 + _column(factors, "offset_y").view(-1, 1) * twice
    target = torch.stack([centre_x + half * x * torch.cos(yaw) * project, centre_y + half * y * project], dim=-1)
    source = ((corners + 1.0) / 2.0 * (resolution - 1)).expand(len(factors), 4, 2)
    warped = warp_perspective(sheet[torch.tensor(factors["sign"].to_numpy(np.int64))], get_perspective_transform(
        source, target), (twice, twice), align_corners=True)
    warped = F.avg_pool2d(warped, 2)
    return warped[:, :3], warped[:, 3:]


# ----------------------------------------------------------------------------- the scene


def _backgrounds(kinds: np.ndarray, seeds: np.ndarray, size: int) -> torch.Tensor:
    """Sky (a vertical gradient with soft clouds), foliage (two greens in blotches) or a wall (a warm grey texture
    with courses of masonry): (B, 3, S, S) from each image's seed; each kind computed on its own rows only."""
    out = torch.empty(len(kinds), 3, size, size)
    for kind in BACKGROUNDS:
        rows = np.flatnonzero(kinds == kind)
        if len(rows) == 0:
            continue
        texture = _value_noise(seeds[rows], _STREAMS["background"], size)[:, None]  # (b, 1, S, S) in [0, 1]
        tone = torch.from_numpy(_uniform(seeds[rows], _STREAMS["background"] + 16, (1, 1, 1)))  # a shade per image
        if kind == "sky":
            height = torch.linspace(0.0, 1.0, size).view(1, 1, size, 1)
            picture = (torch.tensor([0.35, 0.55, 0.85]).view(1, 3, 1, 1) * (1.0 - 0.35 * height) + 0.35 * height
                       + 0.45 * texture.pow(3)) * (0.8 + 0.3 * tone)
        elif kind == "foliage":
            leaves = (texture > 0.45 + 0.1 * tone).float()
            picture = (leaves * torch.tensor([0.18, 0.42, 0.12]).view(1, 3, 1, 1) + (1 - leaves) * torch.tensor(
                [0.08, 0.22, 0.06]).view(1, 3, 1, 1) + 0.15 * (texture - 0.5))
        else:
            courses = ((torch.arange(size).view(1, 1, size, 1) % max(4, size // 6)) == 0).float()
            picture = (torch.tensor([0.55, 0.47, 0.40]).view(1, 3, 1, 1) * (0.7 + 0.5 * tone)
                       + 0.25 * (texture - 0.5) - 0.2 * courses)
        out[torch.from_numpy(rows)] = picture.clamp(0.0, 1.0)
    return out


def _occlude(scene: torch.Tensor, factors: pd.DataFrame, seeds: np.ndarray, size: int) -> torch.Tensor:
    """Cover the ``occlusion`` fraction of each sign's disc with a dark branch or pole: a half-plane from a
    direction the seed picks, placed so that the chord cuts off that fraction of the disc."""
    rows = np.flatnonzero(factors["occlusion"].to_numpy(np.float64) > 0)
    if len(rows) == 0:
        return scene
    some = factors.iloc[rows]
    draws = _uniform(seeds[rows], _STREAMS["occluder"], (2,))
    angle = torch.from_numpy(draws[:, 0] * 2 * math.pi).view(-1, 1, 1)
    # The chord at distance d (in radii) from the centre cuts off (acos d - d sqrt(1 - d^2)) / pi of the disc.
    d = np.linspace(-1.0, 1.0, 2001)
    cut = (np.arccos(d) - d * np.sqrt(1.0 - d * d)) / np.pi  # decreasing from 1 to 0
    distance = torch.from_numpy(np.interp(some["occlusion"].to_numpy(np.float64), cut[::-1], d[::-1])).float()
    radius = _column(some, "scale").view(-1, 1, 1) * size / 2
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x = grid.view(1, 1, size) - (size / 2 + _column(some, "offset_x").view(-1, 1, 1) * size)
    y = grid.view(1, size, 1) - (size / 2 + _column(some, "offset_y").view(-1, 1, 1) * size)
    along = (x * torch.cos(angle) + y * torch.sin(angle)) / radius
    covered = (along > distance.view(-1, 1, 1)).float()[:, None]
    shade = torch.from_numpy(draws[:, 1:]).view(-1, 1, 1, 1)
    colour = torch.tensor([0.20, 0.16, 0.10]).view(1, 3, 1, 1) * (0.6 + 0.8 * shade)  # bark to dark grey-brown
    index = torch.from_numpy(rows)
    scene[index] = covered * colour + (1.0 - covered) * scene[index]
    return scene


def _light(scene: torch.Tensor, kinds: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
    """Each illumination's gain, gamma and tint; glare adds a bright veil that peaks where the seed puts the sun."""
    table = torch.tensor([[gain, gamma, *tint] for gain, gamma, tint in (_LIGHT[k] for k in ILLUMINATIONS)])
    light = table[torch.from_numpy(pd.Categorical(kinds, categories=ILLUMINATIONS).codes.astype(np.int64))]
    lit = light[:, :1, None, None] * scene.clamp_min(0.0).pow(light[:, 1:2, None, None]) * light[:, 2:, None, None]
    rows = np.flatnonzero(kinds == "glare")
    if len(rows):
        size = scene.shape[-1]
        spot = torch.from_numpy(_uniform(seeds[rows], _STREAMS["glare"], (2,))) * size
        grid = torch.arange(size, dtype=torch.float32)
        distance2 = (grid.view(1, 1, size) - spot[:, 0].view(-1, 1, 1)) ** 2 + (
            grid.view(1, size, 1) - spot[:, 1].view(-1, 1, 1)) ** 2
        veil = 0.75 * torch.exp(-distance2 / (2 * (0.3 * size) ** 2))[:, None]
        index = torch.from_numpy(rows)
        lit[index] = lit[index] + veil * (1.0 - lit[index])
    return lit


def _blur(scene: torch.Tensor, factors: pd.DataFrame) -> torch.Tensor:
    """Defocus (a Gaussian of ``defocus`` pixels) and motion (a line of ``motion`` pixels at ``motion_angle``)."""
    from kornia.filters import gaussian_blur2d, motion_blur

    sigma = factors["defocus"].to_numpy(np.float64)
    rows = np.flatnonzero(sigma > 0)
    if len(rows):
        index = torch.from_numpy(rows)
        scene[index] = gaussian_blur2d(scene[index], (7, 7), torch.from_numpy(sigma[rows]).float()[:, None]
                                       .expand(-1, 2).contiguous(), border_type="replicate")
    lengths = factors["motion"].to_numpy()
    for length in sorted(set(lengths.tolist()) - {0}):  # kornia's kernel size is one per call: a few groups
        rows = torch.from_numpy(np.flatnonzero(lengths == length))
        angles = torch.from_numpy(factors["motion_angle"].to_numpy(np.float64)[rows.numpy()]).float()
        scene[rows] = motion_blur(scene[rows], int(length), angles, torch.zeros_like(angles),
                                  border_type="replicate")
    return scene


def _jpeg(images: torch.Tensor, qualities: np.ndarray) -> torch.Tensor:
    """Each image through libjpeg at its quality (0: left raw); one encode call per quality."""
    from torchvision.io import decode_jpeg, encode_jpeg

    out = images.clone()
    for quality in sorted(set(qualities.tolist()) - {0}):
        rows = np.flatnonzero(qualities == quality).tolist()
        encoded = encode_jpeg([images[i] for i in rows], quality=int(quality))
        out[rows] = torch.stack(decode_jpeg(encoded))
    return out


# ----------------------------------------------------------------------------- per-image randomness


def _column(factors: pd.DataFrame, *names: str) -> torch.Tensor:
    """Float columns as (B, len(names), 1, 1)."""
    return torch.tensor(factors[list(names)].to_numpy(np.float64), dtype=torch.float32)[:, :, None, None]


def _cast(factors: pd.DataFrame) -> torch.Tensor:
    """The white-balance error as channel gains (B, 3, 1, 1): red and blue relative to green."""
    red, blue = _column(factors, "cast_red"), _column(factors, "cast_blue")
    return torch.cat([red, torch.ones_like(red), blue], dim=1)


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seeds: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """Uniforms in [0, 1) as float32, (B, *shape), a function of (seed, stream, position) only: an image's textures
    do not depend on which batch renders it."""
    return _uniform64(seeds, stream, shape).astype(np.float32)


def _uniform64(seeds: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    with np.errstate(over="ignore"):
        key = _hash(seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(stream << 40))
        z = _hash(key[:, None] + np.arange(count, dtype=np.uint64)[None] * np.uint64(0xD1B54A32D192ED03))
    return ((z >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(len(seeds), *shape)


def _normal(seeds: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normals (B, *shape) by Box-Muller from two uniforms in [0, 1) (float64: 1 - u never rounds to 0)."""
    u = _uniform64(seeds, stream, (2, *shape))
    return (np.sqrt(-2.0 * np.log1p(-u[:, 0])) * np.cos(2 * np.pi * u[:, 1])).astype(np.float32)


def _value_noise(seeds: np.ndarray, stream: int, size: int) -> torch.Tensor:
    """Three octaves of smooth noise (B, S, S) in [0, 1]: random grids of 4, 8 and 16 cells, upsampled."""
    total = torch.zeros(len(seeds), 1, size, size)
    for octave, (cells, weight) in enumerate(((4, 0.55), (8, 0.3), (16, 0.15))):
        grid = torch.from_numpy(_uniform(seeds, stream * 8 + octave, (1, cells, cells)))
        total += weight * F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return total[:, 0].clamp(0.0, 1.0)


__all__ = ["BACKGROUNDS", "CATEGORICAL_FACTORS", "CLASSES", "FACTORS", "ILLUMINATIONS", "JPEG_QUALITIES",
           "MOTION_LENGTHS", "NUMERIC_FACTORS", "SIZES", "Rare", "SignSet", "draw_factors", "render", "render_layers",
           "sign_sets", "templates"]
