"""Colour signs: which generator should the search use? Visibility, reconstruction and sample quality per kind.

Issue 36 asks for the default generator to be chosen by figures. This program takes a kept sign case of
``bench_planted.py --dataset signs --keep DIR`` (its data, seed and classifier under test), trains each generator
variant with the product's own fit-generator stage on the same data and seed (the kept run's own generator is
``shipped``), and reads:

* ``visibility``: of the case's freshly rendered subgroup signs (``bench_planted.fresh_subgroup_figures``' draw)
  that the classifier under test misreads, the share whose reconstruction it misreads the same way (the ceiling of
  any latent search for this bug); ``misread``: the share it misreads at all;
* ``search_reach`` (the kept run's generator only): per fresh subgroup sign, the radius the search would need from
  the nearest audit source of its class (bench_natural_generator's figure), and the share the validity judge lets
  count;
* ``reconstruction_accuracy_val``: the classifier's accuracy on reconstructions of the validation split, and
  ``reconstruction_mse_val``;
* sample quality, in the features of the benchmark's reference classifier (trained on the full distribution with
  a seed of its own; neither the classifier under test nor the perceptual term's network): ``frechet_distance``
  between 1,000 validation images and 1,000 decoded prior samples (FID's formula on 128 penultimate features), and
  ``posterior_sample_accuracy``, the reference's accuracy on one decoded posterior sample of each validation image
  (a class-conditional sample: does a draw near a sign still show that sign?).

Only the test-free splits and fresh renders are read. Run: ``python scripts/bench_generators.py --keep DIR
[--seed 0] [--case night50] [--variant NAME:KEY=VALUE[,KEY=VALUE] ...] [--out FILE]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bench_natural_generator as bng
import bench_planted as bp
import numpy as np
import torch
from _bench import emit, progress  # scripts/_bench.py
from scipy import linalg

from defuse.artifacts import VALIDITY_MODEL
from defuse.data import ImageDataModule
from defuse.models import load_classifier
from defuse.models.generators import prior_latents
from defuse.models.inference import encode, predict_labels, reconstruct
from defuse.models.loading import load_generator
from defuse.pipeline import run_stage, stage_named
from defuse.rundir import RunDir
from defuse.seeding import torch_generator
from defuse.validity import ValidityModel

VARIANTS = {  # the shipped signs setting first; each other changes the kind of generator or its loss
    "shipped": (),
    "vae_conditional": ("generator.conditional=true",),  # the decoder also given the class
    "vae_pixel_loss": ("generator.perceptual=0", "generator.epochs=40"),  # the signs config before the term
    "gan": ("generator.kind=gan", "generator.perceptual=0", "generator.latent_dim=64", "generator.epochs=25"),
}
SAMPLES = 1000


@torch.no_grad()
def penultimate(reference: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """The reference SmallCNN's 128 features before its last layer."""
    normalise, body = reference[0], reference[1]
    return torch.cat([body.head[:-2](body.features(normalise(images[i:i + 512])))
                      for i in range(0, len(images), 512)]).numpy().astype(np.float64)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID's distance between Gaussians fitted to two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    # A ReLU feature that never fires has no variance: a small ridge keeps the product's square root defined.
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


@torch.no_grad()
def figures(generator, model, reference, subgroup: torch.Tensor, source: int, val, seed: int) -> dict:
    read = predict_labels(model, subgroup)
    misread = read != source
    read_recon = predict_labels(model, reconstruct(generator, subgroup, labels=torch.full((len(subgroup),), source)))
    images = val.float_images()
    recon = reconstruct(generator, images, labels=val.labels)
    rng = torch_generator(seed, "bench.generator_samples")
    prior = generator.decode(prior_latents(generator, SAMPLES, rng))
    mu, logvar = encode(generator, images, val.labels)
    posterior = generator.decode(mu + torch.randn(mu.shape, generator=rng) * (0.5 * logvar).exp())
    return {
        "visibility": round(float((read_recon[misread] == read[misread]).float().mean()), 4) if misread.any() else None,
        "misread": round(float(misread.float().mean()), 4), "subgroup_images": len(subgroup),
        "reconstruction_accuracy_val": round(float((predict_labels(model, recon) == val.labels).float().mean()), 4),
        "reconstruction_mse_val": round(float(((recon - images) ** 2).mean()), 5),
        "frechet_distance": round(frechet(penultimate(reference, images[:SAMPLES]), penultimate(reference, prior)), 2),
        "posterior_sample_accuracy": round(float((predict_labels(reference, posterior) == val.labels)
                                                 .float().mean()), 4),
    }


def rest_of_class(config, case: str) -> torch.Tensor:
    """bp.FRESH_SUBGROUP fresh signs of the case's class outside its combination (for scale: how far ordinary ones are)."""
    from defuse.seeding import numpy_rng
    from defuse.signs import CLASSES, draw_factors, render

    rare = bp.sign_rare(case)
    factors = draw_factors(np.full(2 * bp.FRESH_SUBGROUP, CLASSES.index(rare.sign)),
                           numpy_rng(config.seed, "bench.fresh_rest_of_class"))
    factors = factors[~rare.matches(factors)].head(bp.FRESH_SUBGROUP).reset_index(drop=True)
    return render(factors, config.data.image_size).float() / 255.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", required=True, help="a kept `bench_planted.py --dataset signs` directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", default=next(iter(bp.SIGN_CASES)), choices=list(bp.SIGN_CASES))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help=f"a generator setting to measure (repeatable); default: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    variants = bng.parse_variants(args.variant, VARIANTS)
    folder = Path(args.keep) / f"seed{args.seed}"
    kept = folder / args.case
    if not (kept / "generator.ckpt").exists() or not (folder / "reference" / "classifier.ckpt").exists():
        parser.error(f"no kept sign case {args.case} under {folder}: run `python scripts/bench_planted.py --dataset "
                     f"signs --cases {args.case} --seeds {args.seed} --keep {args.keep}` first")
    torch.set_num_threads(2)
    bp.DATASET = "signs"
    t0 = time.perf_counter()
    config = bp.sign_case_config(args.case, args.seed)
    model = load_classifier(kept / "classifier.ckpt").model
    reference = load_classifier(folder / "reference" / "classifier.ckpt").model.eval()
    source = bp.case_spec(args.case)[0]
    subgroup = bp.fresh_subgroup_images(config, args.case)
    val = ImageDataModule(config.data, args.seed).split("val")
    out: dict = {"case": args.case, "seed": args.seed, "variants": {}}
    # How far the kept run's search would have to go to reach the subgroup (bench_natural_generator's figure): from
    # the nearest audit source of the class the classifier reads right, in that source's posterior scales.
    audit = ImageDataModule(config.data, args.seed).split(config.identify.split)
    x_audit = audit.float_images()
    sources = x_audit[(audit.labels == source) & (predict_labels(model, x_audit) == source)]
    kept_generator, judge = load_generator(kept / "generator.ckpt"), ValidityModel.load(kept / VALIDITY_MODEL)
    out["search_reach"] = {"subgroup": bng.search_reach(kept_generator, judge, subgroup, sources, source, config),
                           "rest_of_class": bng.search_reach(kept_generator, judge, rest_of_class(config, args.case),
                                                             sources, source, config)}
    progress(f"{args.case} reach", out["search_reach"])
    for name, overrides in variants.items():
        start = time.perf_counter()
        if name == "shipped":
            generator, seconds = load_generator(kept / "generator.ckpt"), RunDir(kept).manifest()["stages"][
                "fit-generator"]["seconds"]
        else:
            run = RunDir(folder / "generators" / args.case / name)
            run_stage(stage_named("fit-generator"), bp.sign_case_config(args.case, args.seed, overrides), run)
            generator, seconds = load_generator(run.path("generator.ckpt")), run.manifest()["stages"][
                "fit-generator"]["seconds"]
        out["variants"][name] = {"overrides": list(overrides), "fit_seconds": seconds,
                                 **figures(generator, model, reference, subgroup, source, val, args.seed),
                                 "seconds": round(time.perf_counter() - start, 1)}
        progress(f"{args.case} {name}", out["variants"][name])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return emit(out, args.out)


if __name__ == "__main__":
    sys.exit(main())
