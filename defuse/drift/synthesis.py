"""Drift synthesis: named physical presets and a grid over each parameter, next to classical post-hoc corruptions.

Per setting: accuracy, Effective Invariance against the clean images (sqrt(p^ * p^_t) when the prediction is
kept, else 0) and mean SSIM to the clean images (kornia, 7-pixel window), which measures the image-space change.

**Post-hoc versus physical.** raw2logit reports that corruptions applied to finished images (ImageNet-C style)
overstate the accuracy cost of physically faithful drift. We measure it at *matched image-space change*: each
physical grid setting of a pair below is matched by the post-hoc corruption strength with the same mean SSIM to
the clean images (bisection on the strength), and

    ratio = sum of post-hoc accuracy drops / sum of physical accuracy drops

over the pair's settings (pooled: a per-setting ratio explodes where the physical drop is near 0). Pairs: sensor
read noise with additive Gaussian noise, optical blur with Gaussian blur, exposure with brightness (an added
offset: negative for under-exposure), tone curve (gamma) with contrast. A ratio above 1 means the post-hoc corruption costs more accuracy than the physical drift
that changes the images as much. The ImageNet-C severities themselves (parameters of Hendrycks and Dietterich
2019, for 224-pixel photographs; ours are small, so blur severities are scaled by the image side / 224) are
reported too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from defuse.drift.acquisition import BY_NAME, acquire, parameters_for
from defuse.drift.forensics import CHUNK, DriftEvaluator
from defuse.models.inference import as_input, is_channels_last

PRESETS: dict[str, dict[str, float]] = {
    "under-exposed": {"exposure_ev": -2.0},
    "over-exposed": {"exposure_ev": 1.5},
    "defocused": {"blur_sigma": 1.5},
    "noisy sensor": {"shot_noise": 0.15, "read_noise": 0.05},
    "low resolution": {"resolution": 0.5},
    "flat tone curve": {"gamma": 1.4},
    "black level off": {"black_level": 0.05},
    "over-sharpened": {"sharpen": 2.0},
    "wrong white balance": {"wb_red": 1.6, "wb_blue": 0.7},
    "desaturated optics": {"saturation": 0.4},
}
GRID_POINTS = 7  # per parameter, from its low to its high bound (the identity among them where it is a bound)


def _noise(x: torch.Tensor, s: float, g: torch.Tensor) -> torch.Tensor:
    return (x + s * g).clamp(0, 1)


def _blur(x: torch.Tensor, s: float, g: torch.Tensor) -> torch.Tensor:
    from kornia.filters import gaussian_blur2d

    if s <= 1e-3:
        return x
    return gaussian_blur2d(x, 2 * int(np.ceil(3 * s)) + 1, (s, s), border_type="reflect").clamp(0, 1)


def _contrast(x: torch.Tensor, s: float, g: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * s + mean).clamp(0, 1)


def _brightness(x: torch.Tensor, s: float, g: torch.Tensor) -> torch.Tensor:
    return (x + s).clamp(0, 1)


# name -> (function, identity strength, strongest strength, ImageNet-C severities 1-5)
POST_HOC: dict[str, tuple[Callable, float, float, tuple[float, ...]]] = {
    "gaussian_noise": (_noise, 0.0, 1.0, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "gaussian_blur": (_blur, 0.0, 8.0, (1, 2, 3, 4, 6)),
    "contrast": (_contrast, 1.0, 0.0, (0.4, 0.3, 0.2, 0.1, 0.05)),
    "brightness": (_brightness, 0.0, 1.0, (0.1, 0.2, 0.3, 0.4, 0.5)),
}
# physical parameter -> the post-hoc corruption it is compared with
PAIRS = {"read_noise": "gaussian_noise", "blur_sigma": "gaussian_blur", "exposure_ev": "brightness",
         "gamma": "contrast"}


class _Measure:
    """Accuracy, EI against the clean predictions and mean SSIM of image sets derived from fixed clean images."""

    def __init__(self, evaluator: DriftEvaluator) -> None:
        self.e = evaluator
        self.clean_probs = self._probs(evaluator.images)
        self.g = evaluator.noise.read  # the post-hoc noise reuses the seeded standard-normal draw

    @torch.no_grad()
    def _probs(self, images: torch.Tensor) -> torch.Tensor:
        fast = is_channels_last(self.e.model)
        return torch.cat([self.e.model(as_input(images[i:i + CHUNK], fast)).softmax(dim=1)
                          for i in range(0, len(images), CHUNK)])

    @torch.no_grad()
    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) mean SSIM of each image to its clean original."""
        from kornia.metrics import ssim

        return torch.cat([ssim(images[i:i + CHUNK], self.e.images[i:i + CHUNK], 7).mean(dim=(1, 2, 3))
                          for i in range(0, len(images), CHUNK)])

    @torch.no_grad()
    def of(self, images: torch.Tensor) -> dict[str, float]:
        probs = self._probs(images)
        clean_conf, clean_pred = self.clean_probs.max(dim=1)
        conf, pred = probs.max(dim=1)
        ei = torch.where(pred == clean_pred, (clean_conf * conf).sqrt(), torch.zeros_like(conf))
        similarity = self.similarity(images)
        return {"accuracy": round(float((pred == self.e.labels).float().mean()), 4),
                "ei": round(float(ei.mean()), 4), "ssim": round(float(similarity.mean()), 4)}

    @torch.no_grad()
    def physical(self, setting: dict[str, float]) -> dict[str, float]:
        x = torch.cat([acquire(self.e.images[i:i + CHUNK], setting,
                               type(self.e.noise)(self.e.noise.shot[i:i + CHUNK], self.e.noise.read[i:i + CHUNK]))
                       for i in range(0, len(self.e.images), CHUNK)])
        return self.of(x)

    def post_hoc(self, name: str, strength: float) -> dict[str, float]:
        function = POST_HOC[name][0]
        return self.of(function(self.e.images, float(strength), self.g))

    @torch.no_grad()
    def matching_strength(self, name: str, target_ssim: float, steps: int = 10, subset: int = 500,
                          sign: float = 1.0) -> float:
        """The post-hoc strength whose mean SSIM to the clean images equals ``target_ssim`` (bisection on the first
        ``subset`` images, to 1/1024 of the strength range; SSIM falls monotonically from the identity strength to
        the strongest). The match is checked on every image afterwards (``post_hoc_ssim``)."""
        function, identity, strongest, _ = POST_HOC[name]
        strongest = identity + sign * (strongest - identity)  # darker brightness for an under-exposure
        images, g = self.e.images[:subset], self.g[:subset]

        def ssim_at(strength: float) -> float:
            return float(self.similarity(function(images, strength, g)).mean())

        low, high = identity, strongest
        if ssim_at(high) > target_ssim:
            return high
        for _ in range(steps):
            middle = (low + high) / 2
            if ssim_at(middle) > target_ssim:
                low = middle
            else:
                high = middle
        return (low + high) / 2


def drift_synthesis(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0
                    ) -> dict[str, Any]:
    """Accuracy, EI and SSIM of ``model`` under every preset and grid setting that applies to ``images``, the
    ImageNet-C severities, and the post-hoc/physical ratio at matched SSIM (module docstring)."""
    if len(images) == 0:
        raise ValueError("Drift synthesis needs labelled images; got none.")
    evaluator = DriftEvaluator.build(model, images, labels, seed)
    measure = _Measure(evaluator)
    clean = measure.of(evaluator.images)
    applicable = {p.name for p in parameters_for(images.shape[1])}
    presets = {name: {"setting": setting, **measure.physical(setting)} for name, setting in PRESETS.items()
               if set(setting) <= applicable}
    grids: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(applicable, key=list(BY_NAME).index):
        p = BY_NAME[name]
        values = sorted({round(float(v), 4) for v in np.linspace(p.low, p.high, GRID_POINTS)} | {p.identity})
        grids[name] = [{"value": v, **measure.physical({name: v})} for v in values]
    severities = {name: [{"severity": k + 1, "strength": s, **measure.post_hoc(name, s)}
                         for k, s in enumerate(_scaled(name, spec[3], images.shape[-1]))]
                  for name, spec in POST_HOC.items()}
    comparison = {}
    total_post = total_physical = 0.0
    for parameter, corruption in PAIRS.items():
        if parameter not in applicable:
            continue
        rows = []
        for point in grids[parameter]:
            if point["value"] == BY_NAME[parameter].identity or point["ssim"] >= 0.999:
                continue
            # Under-exposure is matched with a darkening (negative brightness), over-exposure with a brightening.
            sign = -1.0 if parameter == "exposure_ev" and point["value"] < BY_NAME[parameter].identity else 1.0
            strength = measure.matching_strength(corruption, point["ssim"], sign=sign)
            matched = measure.post_hoc(corruption, strength)
            rows.append({"value": point["value"], "ssim": point["ssim"], "physical_drop": _drop(clean, point),
                         "post_hoc_strength": round(strength, 4), "post_hoc_ssim": matched["ssim"],
                         "post_hoc_drop": _drop(clean, matched)})
        physical = sum(max(r["physical_drop"], 0.0) for r in rows)
        post = sum(max(r["post_hoc_drop"], 0.0) for r in rows)
        total_physical += physical
        total_post += post
        comparison[parameter] = {"post_hoc": corruption, "settings": rows,
                                 "ratio": round(post / physical, 3) if physical > 0 else None}
    return {"clean": clean, "images": int(len(images)), "presets": presets, "grids": grids,
            "post_hoc_severities": severities, "post_hoc_vs_physical": comparison,
            "ratio": round(total_post / total_physical, 3) if total_physical > 0 else None,
            "ratio_definition": "sum of post-hoc accuracy drops / sum of physical accuracy drops, over the paired "
                                "grid settings, each post-hoc corruption at the strength with the same mean SSIM "
                                "to the clean images (drops below 0 count as 0)"}


def _drop(clean: dict[str, float], other: dict[str, float]) -> float:
    return round(clean["accuracy"] - other["accuracy"], 4)


def _scaled(name: str, severities: tuple[float, ...], side: int) -> tuple[float, ...]:
    return tuple(s * side / 224 for s in severities) if name == "gaussian_blur" else severities


def preset_strip(images: torch.Tensor, *, seed: int = 0, count: int = 4) -> bytes:
    """PNG: ``count`` of the images (a seeded choice, stream ``drift.strip``) clean and under each preset that
    applies to them, one column per preset, for the report."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from defuse.drift.acquisition import SensorNoise
    from defuse.seeding import int_seed, numpy_rng

    chosen = torch.from_numpy(np.sort(numpy_rng(seed, "drift.strip").choice(len(images), size=min(count, len(images)),
                                                                           replace=False)))
    x = images[chosen].float()
    noise = SensorNoise.draw(x.shape, torch.Generator().manual_seed(int_seed(seed, "drift.strip.noise")))
    applicable = {p.name for p in parameters_for(x.shape[1])}
    columns = [("clean", x)] + [(name, acquire(x, setting, noise)) for name, setting in PRESETS.items()
                                if set(setting) <= applicable]
    fig, axes = plt.subplots(len(x), len(columns), figsize=(1.1 * len(columns), 1.15 * len(x)), dpi=100,
                             squeeze=False)
    for j, (name, batch) in enumerate(columns):
        for i in range(len(x)):
            image = batch[i].detach().clamp(0, 1).permute(1, 2, 0).numpy()
            axes[i, j].imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
        axes[0, j].set_title(name, fontsize=6)
    fig.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
