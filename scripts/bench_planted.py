"""Planted-bug benchmark: can defuse find, and repair, a bug we put into a classifier on purpose?

Every case runs the product as shipped: ``run_pipeline`` (what ``defuse run`` calls) on
``configs/mnist-test-split.yaml``, with the data swapped for an npz of the official MNIST test split
(../shared/data/MNIST/raw; first 8,000 images: train, val and audit; last 2,000: test) whose *training
and validation* labels of one subgroup are switched to another class. The only values that differ from the
shipped config are presentational (listed under ``deviations`` with their reasons); the planted cases of a seed
adopt its clean case's generator.ckpt (the VAE reads images only, and the cases share every image).

Cases (each subgroup is 25% of its class, by a feature computed on the train and val images only):
slant (right-slanted 7s -> 1, geometry), thin (thin-stroke 6s -> 1, stroke), bold (thick-stroke 3s -> 8, stroke),
narrow (horizontally narrow 0s -> 6, shape), short (vertically short 2s -> 7, size); and clean (nothing
poisoned). Fresh cases, designed after the repair's settings were fixed (``--cases``): wide (the widest 1s -> 7),
topheavy (top-heavy 9s -> 4), backslant (left-leaning 4s -> 9), light (the 5s with the least ink -> 3), squat
(the 8s widest for their height -> 0), leftheavy (the 5s with the most ink left of their middle -> 6).

Who labels: a simulated person, a labels file written from an independent clean *reference* classifier (trained on
the clean labels with its own seed stream) by its majority vote on each region's fresh samples ("not-a-bug" where
it agrees with the model under test), never from the planted ground truth. The clean control is labelled and
repaired the same way, so whatever its repair costs is measured. The person consents to relabelling the training
images its answers contradict (``correct.relabel``, the consent ``--relabel`` gives); ``--no-consent`` runs
without it. With ``--review`` the person also reviews, image by image, every label issue `defuse review` would ask
about (answered with what the reference reads on the image; written as the review file ``--reviewed-labels``
reads), before correct.

Measured, reading only the run directories' artifacts, and grading only on the test split (no stage read it):

* visibility: the share of the planted subgroup's test images whose VAE reconstruction the poisoned model
  reads as the planted class (the ceiling for any latent search);
* the rank of the first region with the planted pair, its precision (the share of the fresh samples a person is
  shown of it, its misreadings first, that the reference reads as the source class while the poisoned model reads
  the planted class; ``planted_precision_gaussian``: the same share on plain draws of its Gaussian; reversed, the
  share of the real images shown beside it that are mislabelled images of the bug: its hardest-learnt training
  images (``doubted_nearest``), or, in a run without them, its nearest audit images
  (``planted_precision_reversed_nearest_audit``: that share even where the first are shown);
  ``planted_precision_direct``, ``planted_precision_reversed``: each orientation's first region), its bug score;
* valid failures per 1,000 classifier queries, against random sampling from the prior and against the
  reference search (Beta(50, 50) shift of the mean, 10 samples per source) at equal budget, from the audit split;
* repair: accuracy on the planted subgroup of the test split before/after, clean accuracy outside it, the largest
  per-class drop outside it; the decoded-to-real gap (accuracy on fresh decoded samples of the planted pair's
  regions against accuracy on the real subgroup, before and after); label_issues.csv against the poisoned rows;
* clean control: clean test accuracy before/after the repair its labels lead to.
* over the seeds: mean and worst of every figure, and each acceptance bar of the repair issue, met or not.

Labels as the user has them: train, val *and audit* carry the planted labels (one labelling process made them
all); only the test split, which grades, is clean. ``--clean-audit`` leaves the audit split's labels clean instead:
it stands for a curated gold set a user points defuse at, and its figures are reported separately (``clean_audit``
in the JSON).

Natural cases (``NATURAL_CASES``, ``--cases``): no label is touched. The 15% of one class furthest along a feature
(threshold on the 8,000 labelled images) is thinned out of train, val and audit (3% of it kept, a seeded choice):
a bug that no labelled image shows. The test split keeps every image. Their pair is the class the shipped
classifier read most of the test subgroup as when the case was designed (``scripts/screen_natural.py``). They train
their own generator (the data differ from the clean case's).

``--replay-correct`` (with ``--keep DIR`` of an earlier run) asks the simulated person again and re-runs only the
label, correct and verify stages on the kept runs, with the running code and the shipped config, and grades them as
above: the way to measure a change to the repair without re-training and re-searching every case (of the discovery
figures, only visibility and the planted region's are then given).

``--set correct.KEY=VALUE`` (with ``--replay-correct``) replays the repair with a changed setting: an experiment,
listed under ``deviations``, never the shipped figures.

``--dataset signs``: the rendered traffic signs (configs/signs.yaml) instead of MNIST. Natural cases only
(``SIGN_CASES``: a factor combination kept at 3% in the labelled pool through ``data.signs.rare``); the reference is
trained on the full distribution; the subgroup is graded on the test split and on FRESH_SUBGROUP freshly rendered
signs of the combination (``fresh_subgroup_*``), against issue 36's bars (``SIGN_BARS``).

Run: ``python scripts/bench_planted.py [--dataset mnist|signs] [--seeds 0,1,2] [--cases slant,thin,...] [--no-repair] [--no-consent]
[--review] [--clean-audit] [--keep DIR [--replay-correct [--set correct.KEY=VALUE ...]]] [--out FILE]``. Prints
JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from _bench import emit, progress  # scripts/_bench.py

from defuse.artifacts import FAILURES_TABLE, REGIONS_JSON, VALIDITY_MODEL
from defuse.config import (
    DataConfig,
    RunConfig,
    config_from_mapping,
    load_config,
)
from defuse.data import ImageDataModule, ImageSet, load_source
from defuse.models import inference_copy, load_classifier, load_generator
from defuse.models.generators import prior_latents
from defuse.models.inference import latent_means, predict_labels, reconstruct
from defuse.pipeline import run_pipeline, run_stage, stage_named
from defuse.records import Failures, Regions
from defuse.regions import region_misreadings
from defuse.rundir import RunDir
from defuse.search import make_evaluate, select_sources
from defuse.seeding import int_seed, numpy_rng, torch_generator
from defuse.stages.label.labelling import auto_labels
from defuse.stages.review import (
    label_issues_to_review,
    moved_for_review,
    review_pages_of,
)
from defuse.stats import paired_change
from defuse.validity import ValidityModel

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "mnist-test-split.yaml"
# Values that differ from the shipped config, each with its reason: presentation only.
DEVIATIONS = {
    "distill.umap": (False, "the failure map is a picture for people; no figure here reads it"),
    "trainer.progress_bar": (False, "output is JSON"),
    "check.drift": (False, "the drift forensics grade invariance to acquisition drift, which no figure here reads; "
                           "on (the default) they add about 45 s a case (scripts/bench_drift.py measures them)"),
}
# Not a config value but the same kind of deviation: the planted cases adopt the clean case's generator.ckpt.
SHARED_GENERATOR = ("generator.checkpoint (planted cases)",
                    ("the clean case's generator.ckpt of the same seed: the VAE reads images only, and the cases share "
                    "every image and the seed, so each would train these very weights (checked: the same sha256 in "
                    "all cases when each trained its own)"))
PRECISION_SAMPLES = 256
TOP_SHOWN = 3  # the regions a person sees first: the discovery bar asks for the planted pair among them
VOTE_SAMPLES = 128
GAP_SAMPLES = 256


# ----------------------------------------------------------------------------- subgroups


def slant(images: torch.Tensor) -> torch.Tensor:
    """Shear of the ink from its second-order moments: > 0 leans right (top to the right)."""
    x = images[:, 0].double()
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    mass = x.sum(dim=(1, 2)).clamp_min(1e-9)
    r0 = (x * rows).sum(dim=(1, 2)) / mass
    c0 = (x * cols).sum(dim=(1, 2)) / mass
    dr, dc = rows - r0.view(-1, 1, 1), cols - c0.view(-1, 1, 1)
    mu11 = (x * dr * dc).sum(dim=(1, 2)) / mass
    mu02 = (x * dr * dr).sum(dim=(1, 2)) / mass
    return (-mu11 / mu02.clamp_min(1e-9)).float()  # rows grow downwards: a right lean has negative covariance


def stroke_width(images: torch.Tensor) -> torch.Tensor:
    """Mean stroke width: 2 * ink area / ink perimeter, on the image thresholded at 0.5."""
    ink = (images[:, 0] > 0.5).float()
    padded = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    neighbours = torch.stack([padded[:, 1:-1, :-2], padded[:, 1:-1, 2:], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]])
    boundary = ink * (neighbours.min(dim=0).values == 0).float()
    return 2 * ink.sum(dim=(1, 2)) / boundary.sum(dim=(1, 2)).clamp_min(1)


def _spread(images: torch.Tensor, axis: int) -> torch.Tensor:
    """Standard deviation of the ink's position along ``axis`` (-1: columns, width; -2: rows, height)."""
    x = images[:, 0].double()
    n = x.shape[axis]
    shape = [1, 1, 1]
    shape[axis] = n
    pos = torch.arange(n, dtype=torch.float64).view(shape)
    mass = x.sum(dim=(1, 2)).clamp_min(1e-9)
    mean = (x * pos).sum(dim=(1, 2)) / mass
    var = (x * (pos - mean.view(-1, 1, 1)) ** 2).sum(dim=(1, 2)) / mass
    return var.sqrt().float()


def width(images: torch.Tensor) -> torch.Tensor:
    return _spread(images, -1)


def height(images: torch.Tensor) -> torch.Tensor:
    return _spread(images, -2)


def top_share(images: torch.Tensor) -> torch.Tensor:
    """Share of the ink above the middle row of the ink's own vertical extent (pixels > 0.5): a big-headed 9 is
    top-heavy, a 9 with a long tail is not."""
    x = images[:, 0].double()
    rows = torch.arange(x.shape[-2], dtype=torch.float64).view(1, -1)
    inked = (x > 0.5).any(dim=-1)  # (N, H): rows holding ink
    top = torch.where(inked, rows, torch.inf).min(dim=1).values
    bottom = torch.where(inked, rows, -torch.inf).max(dim=1).values
    middle = ((top + bottom) / 2).view(-1, 1)
    mass = x.sum(dim=-1)  # (N, H)
    return ((mass * (rows < middle)).sum(dim=1) / mass.sum(dim=1).clamp_min(1e-9)).float()


def left_share(images: torch.Tensor) -> torch.Tensor:
    """Share of the ink left of the middle column of the ink's own horizontal extent (``top_share`` on the images
    turned on their diagonal): a 5 whose bowl closes to the left, like a 6's, carries its ink on the left."""
    return top_share(images.transpose(-1, -2))


def aspect(images: torch.Tensor) -> torch.Tensor:
    """Width over height of the ink (their spreads): squat digits are wide for their height, tall ones narrow."""
    return width(images) / height(images).clamp_min(1e-6)


def ink(images: torch.Tensor) -> torch.Tensor:
    """Total ink (the sum of the pixels): small or faint digits have little, big or heavy ones much."""
    return images[:, 0].sum(dim=(1, 2))


CASES = {
    # name: (source class, planted class, feature, take the top (+1) or bottom (-1) quarter)
    "slant": (7, 1, slant, +1),
    "thin": (6, 1, stroke_width, -1),
    "bold": (3, 8, stroke_width, +1),
    "narrow": (0, 6, width, -1),
    "short": (2, 7, height, -1),
    # Fresh cases, added after the repair's design and settings were fixed and never used to choose them: the
    # untuned check the repair issue asks for (`--cases wide,topheavy`).
    "wide": (1, 7, width, +1),
    "topheavy": (9, 4, top_share, +1),
    # Fresh cases of 2026-11-26, designed after the tie rule (ties on the bug images go to bug_confidence) was
    # committed, and never used to choose anything (`--cases backslant,light`): the most left-leaning 4s read as 9
    # (geometry, a new pair) and the 5s with the least ink read as 3 (mass: small or faint 5s).
    "backslant": (4, 9, slant, -1),
    "light": (5, 3, ink, -1),
    # Fresh case of 2026-11-27, designed after a region's pictures began to show its misreadings first (the change
    # backslant's precision miss led to), and never used to choose anything (`--cases squat`): the 8s widest for
    # their height read as 0 (shape: aspect ratio; a new source and a new target class).
    "squat": (8, 0, aspect, +1),
    # Fresh case of 2026-11-27 (later), designed after the correct stage's cache key began to follow the data's
    # content, with nothing changed since in any stage, and never used to choose anything (`--cases leftheavy`):
    # the 5s with the most ink left of their middle read as 6 (position of the ink; a new pair).
    "leftheavy": (5, 6, left_share, +1),
}
# What `--cases` runs by default: the five the repair was developed on (the fresh ones on request, so the default
# run stays about an hour).
DEFAULT_CASES = ("slant", "thin", "bold", "narrow", "short")


# Natural cases: (source class, the class the shipped classifier reads the test subgroup as most, feature, sign).
# Nothing is relabelled: the subgroup (the NATURAL_SHARE of the class furthest along the feature by sign) is thinned
# out of train, val and audit to NATURAL_KEEP of its images. Designed by scripts/screen_natural.py (seed 0, the
# shipped classifier trained without the subgroup, read on the test subgroup) and fixed here before any pipeline
# run on them; never tuned on.
NATURAL_CASES: dict[str, tuple[int, int, object, int]] = {
    # Fixed 2026-12-05 from `scripts/screen_natural.py --confirm ... --seeds 0,1,2` (each subgroup thinned alone, the
    # shipped classifier read on the test subgroup): the vertically shortest 2s, read right 0.754 / 0.702 / 0.702
    # of 57 test images, misread mostly as 7 (at most 0.8 on every seed) ...
    "natural_short2": (2, 7, height, -1),
    # ... and the vertically shortest 0s, read right 0.820 / 0.787 / 0.836 of 61 (misread as 2): above 0.8 on two
    # seeds, kept as the second case because no other class's subgroup with 30 or more test images came closer
    # (squat 2s: 0.88 / 0.88 / 0.73; top-heavy 2s, the same pair as short 2s: 0.82 / 0.79 / 0.76).
    "natural_short0": (0, 2, height, -1),
}
NATURAL_SHARE = 0.15
NATURAL_KEEP = 0.03

# The traffic signs (``--dataset signs``, configs/signs.yaml; defuse.signs renders every image with its factors
# recorded, so a subgroup is a factor combination, not a computed feature). Natural cases only: the combination
# is kept at ``keep`` in the labelled pool (``data.signs.rare``), whole in test. name: (sign, the class the shipped
# classifier read most of the test subgroup as, factor, values, keep).
SIGN_CASES: dict[str, tuple[str, str, str, tuple[str, ...], float]] = {
    # Fixed 2026-12-06 from benchmarks/records/screen_signs_natural.json (seed 0, `scripts/screen_signs_natural.py
    # --only 0,1`), before any pipeline run on it: 50 km/h signs at night, 3% kept (2 of the pool's night 50s);
    # the shipped classifier read 0.32 of the 25 test ones right (a classifier trained on the full pool: 0.64),
    # misread most as 80 km/h (6 of 25; 60 km/h 4, 30 km/h 3): the Defuse paper's own headline pair. The other
    # candidate screened, 50 km/h at yaw 30-45 degrees, read 0.759 right: it failed the 0.7 bar and is no case.
    "night50": ("50kmh", "80kmh", "illumination", ("night",), 0.03),
}
SIGNS_SHIPPED = SHIPPED.parent / "signs.yaml"
FRESH_SUBGROUP = 300  # freshly rendered test images of a sign case's subgroup: the test split holds about 25
DATASET = "mnist"  # or "signs": set by main from --dataset


def case_spec(case: str) -> tuple[int, int, object, int]:
    """(source class, planted or misread class, feature, sign) of a planted or a natural case (a sign case: its
    classes' indices in the shipped config, whose classes are all of defuse.signs.CLASSES; no feature)."""
    if case in SIGN_CASES:
        from defuse.signs import CLASSES

        return CLASSES.index(SIGN_CASES[case][0]), CLASSES.index(SIGN_CASES[case][1]), None, 0
    return CASES[case] if case in CASES else NATURAL_CASES[case]


def sign_rare(case: str):
    from defuse.signs import Rare

    sign, _, factor, values, keep = SIGN_CASES[case]
    return Rare(sign, factor, values, keep)


def sign_case_config(case: str, seed: int, extra: tuple[str, ...] = ()) -> RunConfig:
    """configs/signs.yaml as shipped (with the presentational deviations); a sign case adds its rare combination,
    the clean control and the reference have none."""
    overrides = [f"seed={seed}", *(f"{k}={json.dumps(v)}" for k, (v, _) in DEVIATIONS.items()), *extra]
    if case in SIGN_CASES:
        rare = sign_rare(case)
        overrides += [f"data.signs.rare.sign={rare.sign}", f"data.signs.rare.factor={rare.factor}",
                      f"data.signs.rare.values={json.dumps(list(rare.values))}", f"data.signs.rare.keep={rare.keep}"]
    return load_config(SIGNS_SHIPPED, overrides)


def sign_subgroup(config: RunConfig, case: str) -> torch.Tensor:
    """The test split's rows in the case's combination, read from the factors each test sign was rendered with."""
    from defuse.signs import CLASSES, sign_sets

    signs = config.data.signs
    _, test = sign_sets(signs.images_per_class, signs.test_per_class, signs.seed, config.data.image_size,
                        tuple(signs.classes or CLASSES))
    return torch.from_numpy(sign_rare(case).matches(test.factors))


def fresh_subgroup_images(config: RunConfig, case: str) -> torch.Tensor:
    """FRESH_SUBGROUP freshly rendered signs of the case's combination, float in [0, 1] (stream
    bench.fresh_subgroup: drawn from the renderer's own distribution, kept where they match): the test split holds
    too few of them for a grade to the point."""
    from defuse.signs import CLASSES, draw_factors, render

    rare = sign_rare(case)
    factors = draw_factors(np.full(40 * FRESH_SUBGROUP, CLASSES.index(rare.sign)),
                           numpy_rng(config.seed, "bench.fresh_subgroup"))
    factors = factors[rare.matches(factors)].head(FRESH_SUBGROUP).reset_index(drop=True)
    return render(factors, config.data.image_size).float() / 255.0


@torch.no_grad()
def fresh_subgroup_figures(run: RunDir, config: RunConfig, case: str, models: dict[str, torch.nn.Module],
                           generator: torch.nn.Module | None = None) -> dict:
    """Each model's accuracy (and reading as the case's pair) on :func:`fresh_subgroup_images`; with ``generator``,
    ``fresh_subgroup_visibility``: of those the "before" model misreads, the share whose reconstruction it misreads
    the same way (the ceiling of any latent search for this bug)."""
    source, planted = case_spec(case)[:2]
    x = fresh_subgroup_images(config, case)
    out: dict = {"fresh_subgroup_size": len(x)}
    if generator is not None:
        read, read_recon = predict_labels(models["before"], x), predict_labels(models["before"], reconstruct(
            generator, x, labels=torch.full((len(x),), source)))
        misread = read != source
        out["fresh_subgroup_visibility"] = (round(float((read_recon[misread] == read[misread]).float().mean()), 4)
                                            if misread.any() else None)
    for name, model in models.items():
        read = predict_labels(model, x)
        out[f"fresh_subgroup_accuracy_{name}"] = round(float((read == source).float().mean()), 4)
        out[f"fresh_subgroup_read_as_planted_{name}"] = round(float((read == planted).float().mean()), 4)
    if "before" in models and "after" in models:
        out["fresh_subgroup_gain"] = round(out["fresh_subgroup_accuracy_after"] - out["fresh_subgroup_accuracy_before"], 4)
    return out


def subgroup(images: ImageSet, case: str, threshold: float) -> torch.Tensor:
    source, _, feature, sign = case_spec(case)
    return (images.labels == source) & (feature(images.float_images()) * sign >= threshold)


def thin_out(x: np.ndarray, y: np.ndarray, labelled: int, groups: list[tuple[int, object, int]], seed: int,
             share: float = NATURAL_SHARE, keep: float = NATURAL_KEEP) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """``x``, ``y`` less most of each group's images among the first ``labelled`` rows (the labelled pool: train,
    val and audit); the rows after them (test) are kept whole. A group (source class, feature, sign) is the
    ``share`` of the class's labelled images furthest along ``feature * sign`` (threshold on the labelled pool);
    ``keep`` of them stay (a seeded choice, stream ``bench.natural_keep``). Returns the arrays and, per group, its
    threshold and counts."""
    images = torch.from_numpy(x[:, None]).float() / (255.0 if x.dtype == np.uint8 else 1.0)
    drop = np.zeros(len(y), dtype=bool)
    rng = numpy_rng(seed, "bench.natural_keep")
    info = []
    for source, feature, sign in groups:
        of_class = np.flatnonzero(y[:labelled] == source)
        values = (feature(images[of_class]) * sign).numpy()
        threshold = float(np.quantile(values, 1 - share))
        members = of_class[values >= threshold]
        kept = rng.choice(members, size=int(round(keep * len(members))), replace=False)
        drop[np.setdiff1d(members, kept)] = True
        info.append({"threshold": threshold, "subgroup_labelled": int(len(members)),
                     "subgroup_kept": int(len(kept))})
    return x[~drop], y[~drop], info


# ----------------------------------------------------------------------------- data and config


def case_config(npz: Path, seed: int, generator: Path | None = None, extra: tuple[str, ...] = ()) -> RunConfig:
    overrides = ["data.source=npz", f"data.root={npz}", f"seed={seed}",
                 *(f"{k}={json.dumps(v)}" for k, (v, _) in DEVIATIONS.items()), *extra]
    if generator is not None:
        overrides.append(f"generator.checkpoint={generator}")
    return load_config(SHIPPED, overrides)


def write_case_data(folder: Path, case: str, seed: int, clean_audit: bool = False) -> tuple[Path, dict, np.ndarray]:
    """The MNIST test split as an npz, with the case's subgroup relabelled in train, val and audit (train and val
    only with ``clean_audit``), or, for a natural case, thinned out of them (:func:`thin_out`).

    Which rows are train, val and audit is read from the product's own split of the clean file, so the poison
    lands exactly where the run will train and select. Returns the file, its figures and the poisoned rows.

    The signs (``--dataset signs``) have no file: the source renders them, and a case's combination is thinned by
    its config (:func:`sign_case_config`); returns no file, the case's counts, and no poisoned row."""
    if DATASET == "signs":
        if case == "clean":
            return None, {}, np.zeros(0, dtype=np.int64)
        config = sign_case_config(case, seed)
        test_group = sign_subgroup(config, case)
        pool = ImageDataModule(config.data, seed).split("train")  # loads the thinned pool (and caches it)
        return None, {"natural": True, "rare": {"sign": SIGN_CASES[case][0], "factor": SIGN_CASES[case][2],
                                                "values": list(SIGN_CASES[case][3]), "keep": SIGN_CASES[case][4]},
                      "test_subgroup_in_split": int(test_group.sum()), "train_images": len(pool)}, np.zeros(0, dtype=np.int64)
    clean = folder / "clean.npz"
    pool = load_source(DataConfig(source="idx")).pool
    x, y = pool.images[:, 0].numpy(), pool.labels.numpy().copy()
    if not clean.exists():
        np.savez(clean, x=x, y=y)
    if case == "clean":
        return clean, {}, np.zeros(0, dtype=np.int64)
    path = folder / f"{case}.npz"
    if case in NATURAL_CASES:
        source, _, feature, sign = NATURAL_CASES[case]
        labelled = len(y) - int(case_config(clean, seed).data.test_size)
        x_thin, y_thin, (info,) = thin_out(x, y, labelled, [(source, feature, sign)], seed)
        np.savez(path, x=x_thin, y=y_thin)
        return path, {**info, "natural": True}, np.zeros(0, dtype=np.int64)
    data = ImageDataModule(case_config(clean, seed).data, seed)
    poisoned_splits = ("train", "val") if clean_audit else ("train", "val", "audit")
    rows = torch.cat([data.indices(name) for name in ("train", "val")])
    source, planted, feature, sign = CASES[case]
    fitted = ImageSet(pool.images[rows], pool.labels[rows], pool.classes)  # the threshold: train and val only
    values = feature(fitted.float_images()[fitted.labels == source]) * sign
    threshold = float(torch.quantile(values, 0.75))
    poisoned: dict[str, int] = {}
    hit_rows = []
    for name in poisoned_splits:
        index = data.indices(name)
        hit = subgroup(ImageSet(pool.images[index], pool.labels[index], pool.classes), case, threshold).numpy()
        y[index.numpy()[hit]] = planted
        hit_rows.append(index.numpy()[hit])
        poisoned[name] = int(hit.sum())
    np.savez(path, x=x, y=y)
    return path, {"threshold": round(threshold, 4), "poisoned_labels": poisoned}, np.concatenate(hit_rows)


# ----------------------------------------------------------------------------- the person


def train_reference(folder: Path, clean_npz: Path, seed: int) -> torch.nn.Module:
    """The person's eyes: a classifier trained on the clean labels by the product's own fit-classifier stage, with
    a seed of its own (so it is not the clean control's classifier, whose regions it judges)."""
    reference_seed = int_seed(seed, "bench.reference") % 100_000
    # The signs' reference is trained on the full distribution (no rare combination): it judges region precision.
    config = sign_case_config("clean", reference_seed) if DATASET == "signs" else case_config(clean_npz, reference_seed)
    run = RunDir(folder / "reference")
    run_stage(stage_named("fit-classifier"), config, run)
    return load_classifier(run.path("classifier.ckpt")).model


@torch.no_grad()
def simulated_person(run: RunDir, config: RunConfig, reference: torch.nn.Module) -> Path:
    """A labels file: each region is what the clean reference reads on most of the samples a person is shown of it
    (``region_misreadings``: the classifier's misreadings of the region first). Where that is the model's own
    reading, the person looks at the real images shown beside the region (its nearest audit images labelled as
    its source class, ``Region.real_nearest``, as the report shows them): if the reference reads most of them as
    the model does too, the answer is that class (the model is right here and those labels are suspect: the bug
    seen from its labels' side when every split carries it); else "not-a-bug". Read by the pipeline through
    `--labels FILE`, as a person's file would be."""
    regions, generator = Regions.load(run.path(REGIONS_JSON)), load_generator(run.path("generator.ckpt"))
    model = load_classifier(run.path("classifier.ckpt")).model
    audit = ImageDataModule(config.data, config.seed).split(config.identify.validity_split).float_images()
    rng = numpy_rng(config.seed, "bench.person")
    answers = {}
    for region in regions.regions:
        shown = region_misreadings(region, VOTE_SAMPLES, config.distill.tau, rng, generator, model)
        majority = int(torch.bincount(predict_labels(reference, shown), minlength=len(regions.classes)).argmax())
        answers[region.id] = majority
        if majority == region.predicted_label:
            beside = torch.as_tensor(region.real_nearest, dtype=torch.long)
            read = predict_labels(reference, audit[beside]) if len(beside) else torch.zeros(0, dtype=torch.long)
            answers[region.id] = majority if 2 * int((read == majority).sum()) > len(read) > 0 else "not-a-bug"
    path = run.path("person.yaml")
    path.write_text(yaml.safe_dump(answers))
    return path


# ----------------------------------------------------------------------------- baselines


@torch.no_grad()
def random_prior_yield(classifier, generator, judge, queries: int, threshold: float, seed: int,
                       screened: bool = False) -> float:
    """Valid failures per 1,000 decoded prior samples: the judge is sure of a class the classifier denies.

    ``screened``: give random sampling the search's screening too: draw prior samples until ``queries`` of them
    have a class the judge is sure of, and query only those (the rest cost no classifier query)."""
    rng = torch_generator(seed, "bench.random_prior")
    kept = []
    # A judge sure of almost no prior sample (a weak generator: the GAN on the signs) would make the screened draw
    # endless: at most 50 rounds, and the yield is then over the samples that passed.
    for _ in range(50):
        if sum(len(z) for z in kept) >= queries:
            break
        z = prior_latents(generator, queries, rng)
        if screened:
            z = z[torch.from_numpy(judge.scores(z).max(axis=1) >= threshold)]
        kept.append(z)
    z = torch.cat(kept)[:queries]
    if len(z) == 0:
        return 0.0
    logits = make_evaluate(generator, classifier)(z)
    probs = judge.scores(z)
    valid_fail = (logits.argmax(dim=1).numpy() != probs.argmax(axis=1)) & (probs.max(axis=1) >= threshold)
    return 1000 * float(valid_fail.sum()) / len(z)


@torch.no_grad()
def reference_yield(classifier, generator, judge, images, labels, queries: int, threshold: float, seed: int,
                    samples_per_source: int = 10) -> float:
    """The reference implementation's search: z = mu + Beta(50, 50) noise, 10 samples per source, repeated
    over the sources until ``queries`` are spent. A failure counts when our judge calls it valid. A
    class-conditional generator's class dimensions are given, not searched: they get no noise."""
    mu = latent_means(generator, images, labels=labels)
    searched = int(generator.latent_dim) - int(getattr(generator, "num_classes", 0))
    torch.manual_seed(int(numpy_rng(seed, "bench.reference_search").integers(2**31)))
    beta = torch.distributions.Beta(torch.tensor(50.0), torch.tensor(50.0))
    evaluate = make_evaluate(generator, classifier)
    spent, valid = 0, 0
    while spent < queries:
        noise = beta.sample((len(mu), samples_per_source, mu.shape[1]))
        noise[..., searched:] = 0.0
        z = (mu[:, None] + noise).reshape(-1, mu.shape[1])
        source = labels.repeat_interleave(samples_per_source)
        take = min(len(z), queries - spent)
        z, source = z[:take], source[:take]
        pred = evaluate(z).argmax(dim=1)
        valid += int(((pred != source).numpy() & (judge.validity(z, source.numpy()) >= threshold)).sum())
        spent += take
    return 1000 * valid / queries


# ----------------------------------------------------------------------------- one case


@torch.no_grad()
def discovery_figures(run: RunDir, config: RunConfig, case: str, reference, group: torch.Tensor | None) -> dict:
    model = inference_copy(load_classifier(run.path("classifier.ckpt")).model)  # as the search queries it
    generator = load_generator(run.path("generator.ckpt"))
    failures = Failures.load(run.path(FAILURES_TABLE), run.metrics("identify"))
    regions = Regions.load(run.path(REGIONS_JSON))
    judge = ValidityModel.load(run.path(VALIDITY_MODEL))
    data = ImageDataModule(config.data, config.seed)
    test, audit = data.split("test"), data.split("audit")
    stats = failures.stats
    out: dict = {
        "clean_test_accuracy": round(float((predict_labels(model, test.float_images()) == test.labels)
                                           .float().mean()), 4),
        "sources": stats["sources"], "failures": stats["failures"], "queries": stats["queries"],
        "valid_failures_per_1000_queries": stats["valid_failures_per_1000_queries"],
        "sources_with_valid_failure": int(failures.table.loc[failures.table["valid"], "source_index"].nunique()),
        "regions": len(regions),
        "top_regions": [f"{r.pair} ({r.bug_score:.3f}, real {r.real_misread}/{r.real_neighbours})"
                        for r in regions.regions[:8]],
        "max_bug_score": max((r.bug_score for r in regions.regions), default=0.0),
        "auto_would_label_bug": sum(a.is_bug for a in auto_labels(regions, regions.classes,
                                    min_real_misread=config.label.auto_min_real_misread).values()),
    }
    budget = min(stats["queries"], 20_000)  # rates per 1,000 queries: 20k samples pin them to about +-10%
    threshold = config.identify.validity_threshold
    out["random_prior_yield"] = round(random_prior_yield(model, generator, judge, budget, threshold, config.seed), 3)
    out["random_prior_screened_yield"] = round(random_prior_yield(model, generator, judge, budget, threshold,
                                                                  config.seed, screened=True), 3)
    searched = select_sources(model, generator, audit.float_images(), audit.labels, config.identify.max_sources,
                              config.seed).index  # the sources the search started from
    out["reference_search_yield"] = round(reference_yield(model, generator, judge, audit.float_images()[searched],
                                                          audit.labels[searched], budget, threshold, config.seed), 3)
    ours = stats["valid_failures_per_1000_queries"]
    for name in ("random_prior", "random_prior_screened", "reference_search"):
        out[f"yield_vs_{name}"] = round(ours / max(out[f"{name}_yield"], 1e-9), 2)
    if case == "clean":
        return out
    source, planted = case_spec(case)[:2]
    x = test.float_images()[group]
    out.update({
        "test_subgroup_size": int(group.sum()),
        "subgroup_read_as_planted": round(float((predict_labels(model, x) == planted).float().mean()), 4),
        "visibility": round(float((predict_labels(model, reconstruct(generator, x, labels=test.labels[group]))
                                   == planted).float().mean()), 4),
    })
    return {**out, **planted_region_figures(run, config, case, reference)}


@torch.no_grad()
def planted_region_figures(run: RunDir, config: RunConfig, case: str, reference, pairs_first: bool = False) -> dict:
    """The first region of the planted pair, in either orientation: *direct* (source -> planted: the planted
    images' look-alikes read as the planted class) or *reversed* (planted -> source: where every split carries
    the planted labels, the search starts from the mislabelled images, whose labels the model agrees with, and
    finds their neighbours read as the source class; the bug seen from its labels' side). Its rank, orientation,
    precision and bug score. Precision, direct: the share of the samples a person is shown of it
    (``region_misreadings``) that the reference reads as the source class while the model reads the planted class
    (``planted_precision_gaussian``: the same share on plain draws of its Gaussian). Reversed: the share of the
    real images shown beside it (its nearest audit images labelled as the planted class) that the reference reads
    as the source class, i.e. mislabelled images of the bug (Gaussian: None).

    Beside the first region, ``planted_top3``: every region of the pair among the three a person sees first, with
    its rank, orientation and precision (the same rule), and ``planted_best_precision_top3``, the best of them: the
    pair's first region may be its hybrids with the planted class while the next is the bug itself (seen on squat,
    seed 1), and the person labels all three.

    ``pairs_first``: grade the kept regions in the order ``distill.order: pairs_first`` shows them (each pair's
    best first), for runs distilled before that order existed (bug score alone); ranks become that order's."""
    model = inference_copy(load_classifier(run.path("classifier.ckpt")).model)
    generator, regions = load_generator(run.path("generator.ckpt")), Regions.load(run.path(REGIONS_JSON))
    if pairs_first:
        from defuse.stages.distill.mixture import pairs_first as reorder

        shown = reorder(regions.regions, lambda r: (r.source_label, r.predicted_label))
        regions = Regions([dataclasses.replace(r, id=rank) for rank, r in enumerate(shown, start=1)],
                          regions.stats, regions.classes)
    source, planted = case_spec(case)[:2]
    out: dict = {"planted_rank": None, "planted_orientation": None, "planted_rank_direct": None,
                 "planted_rank_reversed": None, "planted_precision": None, "planted_precision_gaussian": None,
                 "planted_precision_direct": None, "planted_precision_reversed": None, "planted_bug_score": None,
                 "planted_top3": [], "planted_best_precision_top3": None}
    auto = auto_labels(regions, regions.classes, min_real_misread=config.label.auto_min_real_misread)
    data = ImageDataModule(config.data, config.seed)
    audit = data.split(config.identify.validity_split).float_images()
    train = data.split("train").float_images()
    for region in regions.regions:
        pair = (region.source_label, region.predicted_label)
        orientation = "direct" if pair == (source, planted) else "reversed" if pair == (planted, source) else None
        if orientation is None:
            continue
        if region.id <= TOP_SHOWN and out[f"planted_rank_{orientation}"] is not None:  # a later one of the top 3
            out["planted_top3"].append({"rank": region.id, "orientation": orientation, "precision": _precision(
                region, orientation, model, reference, generator, audit, config, source, planted, train=train)})
            continue
        if out[f"planted_rank_{orientation}"] is not None:
            continue
        out[f"planted_rank_{orientation}"] = region.id
        precision = {"planted_precision": _precision(region, orientation, model, reference, generator, audit, config,
                                                     source, planted, train=train),
                     "planted_precision_gaussian": _precision(region, orientation, None, reference, generator, audit,
                                                              config, source, planted, judged_by=model)
                     if orientation == "direct" else None}
        if region.id <= TOP_SHOWN:
            out["planted_top3"].append({"rank": region.id, "orientation": orientation,
                                        "precision": precision["planted_precision"]})
        # Each orientation's first region has its precision (a reversed first region may sit among genuine images
        # of the planted class while the direct one, a rank below, is the bug itself); the headline is the first.
        out[f"planted_precision_{orientation}"] = precision["planted_precision"]
        if orientation == "reversed":  # the nearest audit images' share: what the row showed before doubted_nearest
            out["planted_precision_reversed_nearest_audit"] = _precision(region, orientation, model, reference,
                                                                         generator, audit, config, source, planted)
        if out["planted_rank"] is not None:
            continue
        out.update({"planted_rank": region.id, "planted_orientation": orientation, **precision,
                    "planted_bug_score": region.bug_score,
                    "planted_real_misread": f"{region.real_misread}/{region.real_neighbours}",
                    "planted_auto_label": auto[region.id].label})
    found = [entry["precision"] for entry in out["planted_top3"] if entry["precision"] is not None]
    out["planted_best_precision_top3"] = max(found) if found else None
    return out


def _precision(region, orientation: str, shown_by, reference, generator, audit: torch.Tensor, config: RunConfig,
               source: int, planted: int, judged_by=None, train: torch.Tensor | None = None) -> float | None:
    """A region of the planted pair's precision (:func:`planted_region_figures`): direct, the share of its shown
    samples (``shown_by`` orders its misreadings first; None: plain draws) that the reference reads as the source
    class while the model (``shown_by``, else ``judged_by``) reads the planted class; reversed, the share of the real
    images shown beside it that the reference reads as the source class: with ``train`` (the train split's images)
    and a region that has them, the hardest-learnt training images the person is shown (``doubted_nearest``), else
    its nearest audit images labelled as the planted class."""
    if orientation == "direct":
        model = shown_by if shown_by is not None else judged_by
        decoded = region_misreadings(region, PRECISION_SAMPLES, config.distill.tau,
                                     numpy_rng(config.seed, "bench.precision"), generator, shown_by)
        hit = (predict_labels(reference, decoded) == source) & (predict_labels(model, decoded) == planted)
        return round(float(hit.float().mean()), 4)
    doubted = train is not None and bool(getattr(region, "doubted_nearest", None))
    images = train if doubted else audit
    beside = torch.as_tensor(region.doubted_nearest if doubted else region.real_nearest, dtype=torch.long)
    return round(float((predict_labels(reference, images[beside]) == source).float().mean()), 4) if len(beside) else None


@torch.no_grad()
def decoded_accuracy(run: RunDir, config: RunConfig, case: str, models: dict[str, torch.nn.Module]) -> dict:
    """Accuracy (reading the source class) on fresh decoded samples of the regions of the planted pair that the
    person labelled with the source class: what the repair's own validation sees of the bug."""
    source, planted = case_spec(case)[:2]
    answers = yaml.safe_load(run.path("person.yaml").read_text())
    regions, generator = Regions.load(run.path(REGIONS_JSON)), load_generator(run.path("generator.ckpt"))
    rng = numpy_rng(config.seed, "bench.decoded_gap")
    z = [region.sample(GAP_SAMPLES, config.distill.tau, rng) for region in regions.regions
         if (region.source_label, region.predicted_label) == (source, planted) and answers.get(region.id) == source]
    if not z:
        return {name: None for name in models}
    decoded = generator.decode(torch.from_numpy(np.concatenate(z)))
    return {name: round(float((predict_labels(model, decoded) == source).float().mean()), 4)
            for name, model in models.items()}


def label_issue_figures(run: RunDir, poisoned_rows: np.ndarray) -> dict:
    """label_issues.csv against the rows the benchmark poisoned: overall, per kind and per region, as precision
    (the share of listed rows that are poisoned) and recall (the share of poisoned rows listed), for what is listed
    and for what is relabelled."""
    path = run.path("label_issues.csv")
    if not path.exists():
        return {"label_issues_listed": None}
    listed = pd.read_csv(path)
    hit = listed["image"].isin(poisoned_rows)
    total = max(len(poisoned_rows), 1)

    def share(part: int, whole: int) -> float | None:
        return round(part / whole, 4) if whole else None

    relabelled = listed["relabelled"].astype(bool) if "relabelled" in listed else pd.Series(False, index=listed.index)
    out = {"label_issues_listed": len(listed), "label_issues_poisoned": int(hit.sum()),
           "label_issues_not_poisoned": int((~hit).sum()), "poisoned_rows": len(poisoned_rows),
           "label_issues_relabelled": int(relabelled.sum()),
           "label_issues_precision": share(int(hit.sum()), len(listed)),
           "label_issues_recall": share(int(hit.sum()), len(poisoned_rows)) if len(poisoned_rows) else None,
           "relabelled_poisoned": int((relabelled & hit).sum()),
           "relabelled_precision": share(int((relabelled & hit).sum()), int(relabelled.sum())),
           "relabelled_recall": share(int((relabelled & hit).sum()), total) if len(poisoned_rows) else None}
    if "label_bug" in listed:  # the rows of pairs judged labelling bugs (left out or relabelled; the rest stand)
        bug = listed["label_bug"].astype(bool)
        out["labelling_bug_poisoned"], out["labelling_bug_not_poisoned"] = int((bug & hit).sum()), int((bug & ~hit).sum())
    if "kind" in listed:
        for kind in ("contradicted", "doubted", "neighbour"):
            mine = listed["kind"] == kind
            out[f"{kind}_poisoned"], out[f"{kind}_not_poisoned"] = int((mine & hit).sum()), int((mine & ~hit).sum())
    if "region" in listed:
        out["label_issues_by_region"] = {
            str(int(region)): {"listed": len(rows), "poisoned": int(rows["image"].isin(poisoned_rows).sum()),
                               "precision": share(int(rows["image"].isin(poisoned_rows).sum()), len(rows)),
                               "recall": share(int(rows["image"].isin(poisoned_rows).sum()), len(poisoned_rows)),
                               "relabelled": int(rows["relabelled"].astype(bool).sum()) if "relabelled" in rows else 0}
            for region, rows in listed.groupby("region") if int(region) >= 0}
    return out


@torch.no_grad()
def repair_figures(run: RunDir, config: RunConfig, case: str, group: torch.Tensor | None,
                   poisoned_rows: np.ndarray) -> dict:
    stages = run.manifest()["stages"]
    verified = json.loads(run.path("verify.json").read_text())
    test = ImageDataModule(config.data, config.seed).split("test")
    x, y = test.float_images(), test.labels
    models = {"before": load_classifier(run.path("classifier.ckpt")).model,
              "after": load_classifier(run.path("repaired.ckpt")).model}
    before, after = (predict_labels(models[k], x) for k in ("before", "after"))
    correct = stages["correct"]["metrics"]
    out = {
        "labelled_bug_regions": stages["label"]["metrics"]["bugs"],
        "chosen": correct.get("chosen"),
        "reason": correct.get("reason"),
        **{k: correct[k] for k in ("train_excluded_contradicting", "val_excluded_contradicting", "guard")
           if k in correct},
        "clean_accuracy": {k: verified["clean_accuracy"][k] for k in ("before", "after", "change", "change_ci95")},
        "correct_seconds": stages["correct"]["seconds"], "verify_seconds": stages["verify"]["seconds"],
        **label_issue_figures(run, poisoned_rows),
    }
    outside = torch.ones_like(y, dtype=torch.bool) if group is None else ~group
    drops = [float((before[outside & (y == k)] == k).float().mean() - (after[outside & (y == k)] == k).float().mean())
             for k in range(int(y.max()) + 1)]
    acc_out = [float((p[outside] == y[outside]).float().mean()) for p in (before, after)]
    # The worst class's drop with its paired bootstrap 95% interval: ~200 test images a class make one image half a
    # point, so whether a drop exceeds a 2-point bar is only decided where the interval is.
    worst = int(np.argmax(drops))
    in_worst = (outside & (y == worst)).numpy()
    _, low, high = paired_change((before.numpy() == worst)[in_worst], (after.numpy() == worst)[in_worst],
                                 numpy_rng(config.seed, "bench.class_drop"))
    out.update({
        "clean_accuracy_outside_subgroup_before": round(acc_out[0], 4),
        "clean_accuracy_outside_subgroup_after": round(acc_out[1], 4),
        "clean_accuracy_outside_subgroup_change": round(acc_out[1] - acc_out[0], 4),
        "largest_per_class_drop_outside_subgroup": round(max(drops), 4),
        "largest_per_class_drop_class": worst,
        "largest_per_class_drop_ci95": [round(-high, 4) + 0.0, round(-low, 4) + 0.0],  # + 0.0: no "-0.0"
        "largest_per_class_drop_images": {"lost": int(((before == worst) & (after != worst))[outside & (y == worst)].sum()),
                                          "gained": int(((before != worst) & (after == worst))[outside & (y == worst)].sum()),
                                          "of": int(in_worst.sum())},
    })
    if case != "clean":
        source, planted = case_spec(case)[:2]
        searched = "failures_by_pair" in verified  # not when the original was kept: verify.json says why
        pair = verified.get("failures_by_pair", {}).get(f"{source} -> {planted}", {})
        decoded = decoded_accuracy(run, config, case, models)
        real = {k: round(float((p[group] == source).float().mean()), 4) for k, p in (("before", before),
                                                                                    ("after", after))}
        # What a model trained on the right labels reads on the subgroup (the clean control's classifier, same
        # seed and images): the repair's ceiling, short of which a bar of 0.90 may sit for a hard subgroup.
        clean_model = run.root.parent / "clean" / "classifier.ckpt"
        ceiling = (round(float((predict_labels(load_classifier(clean_model).model, x[group]) == source)
                               .float().mean()), 4) if clean_model.exists() else None)
        out.update({
            "subgroup_accuracy_before": real["before"],
            "subgroup_accuracy_after": real["after"],
            "subgroup_gain": round(real["after"] - real["before"], 4),
            "subgroup_accuracy_clean_model": ceiling,
            "decoded_accuracy_before": decoded["before"],
            "decoded_accuracy_after": decoded["after"],
            "decoded_to_real_gap_after": None if decoded["after"] is None else round(decoded["after"] - real["after"], 4),
            "planted_pair_failures_on_test_before": pair.get("failures_before", 0) if searched else None,
            "planted_pair_failures_on_test_after": pair.get("failures_after", 0) if searched else None,
        })
    return out


@torch.no_grad()
def simulated_review(run: RunDir, config: RunConfig, reference: torch.nn.Module) -> Path:
    """A review file: every label issue `defuse review` would ask about (``label_issues_to_review``), answered with
    what the clean reference reads on the image, as a person looking at it would. Read by the pipeline through
    ``--reviewed-labels``."""
    run_stage(stage_named("label"), config, run)  # the person's region labels, which the review starts from
    todo = label_issues_to_review(config, run)
    data = ImageDataModule(config.data, config.seed)
    answers = [pd.DataFrame({"image": rows["image"].to_numpy(), "label": predict_labels(
                   reference, data.split(name).float_images()[torch.as_tensor(rows["position"].to_numpy())]).numpy()})
               for name, rows in todo.groupby("split")]
    path = run.path("review.csv")
    (pd.concat(answers) if answers else pd.DataFrame(columns=["image", "label"])).to_csv(path, index=False)
    _record_pages(path, todo, first=True)
    return path


def _record_pages(review: Path, todo: pd.DataFrame, first: bool = False) -> None:
    """How many answers the person gave at this look: `defuse review` asks a page of up to 16 images at a time
    (:func:`review_pages_of`), one answer a page; kept beside the review file, one entry a look."""
    record = review.with_name(REVIEW_PAGES)
    looks = [] if first or not record.exists() else json.loads(record.read_text())
    record.write_text(json.dumps([*looks, len(review_pages_of(todo)) if len(todo) else 0]))


# The simulated person looks at what the repair moves after each correct stage until it moves nothing unanswered,
# at most this many times (a safety bound: each look after training answers retrains). Seed-0 records before
# 2026-12-05 21:00 stopped after 3 looks.
REVIEW_ROUNDS = 8
REVIEW_PAGES = "review_pages.json"  # beside the review file: the person's answers (pages) at each look


@torch.no_grad()
def review_moved(run: RunDir, config: RunConfig, reference: torch.nn.Module) -> int:
    """The person's second look, after a correct stage: the held-out images its candidates move to a person's label
    under a mistaken label (`defuse review` lists them, :func:`defuse.stages.review.moved_for_review`), answered with what
    the clean reference reads and appended to the review file. Returns how many (where any, the repair then
    re-grades the same candidates)."""
    path = Path(config.correct.reviewed_labels)
    earlier = pd.read_csv(path)
    todo = moved_for_review(run, set(earlier["image"].tolist()))
    if todo.empty:
        return 0
    data = ImageDataModule(config.data, config.seed)
    answers = [pd.DataFrame({"image": rows["image"].to_numpy(), "label": predict_labels(
                   reference, data.split(name).float_images()[torch.as_tensor(rows["position"].to_numpy())]).numpy()})
               for name, rows in todo.groupby("split")]
    pd.concat([earlier, *answers]).to_csv(path, index=False)
    _record_pages(path, todo)
    return len(todo)


def review_figures(review: Path, clean_labels: np.ndarray, given_labels: np.ndarray) -> dict:
    """The simulated review against the planted truth: images reviewed, answers that change the given label, of
    them the poisoned ones, and answers that differ from the clean label (the reference's mistakes)."""
    answers = pd.read_csv(review)
    image, label = answers["image"].to_numpy(dtype=np.int64), answers["label"].to_numpy(dtype=np.int64)
    changed, poisoned = label != given_labels[image], clean_labels[image] != given_labels[image]
    pages = review.with_name(REVIEW_PAGES)
    looks = json.loads(pages.read_text()) if pages.exists() else None
    return {"reviewed": len(answers), **({"review_pages": sum(looks), "review_pages_by_look": looks} if looks else {}),
            "review_changed": int(changed.sum()),
            "review_changed_poisoned": int((changed & poisoned).sum()), "reviewed_poisoned": int(poisoned.sum()),
            "review_wrong_answers": int((label != clean_labels[image]).sum())}


def reviewed_config(config: RunConfig, review: Path) -> RunConfig:
    """``config`` with the simulated person's review file (what `defuse run --reviewed-labels` sets)."""
    return config_from_mapping(config.to_dict(), [f"correct.reviewed_labels={review}"])


def labelled_config(config: RunConfig, labels: Path, consent: bool) -> RunConfig:
    """``config`` with the simulated person's labels file, and their consent to relabel when given."""
    return config_from_mapping(config.to_dict(), [f"label.mode={labels}", *(["correct.relabel=true"] if consent else [])])


def run_case(case: str, folder: Path, seed: int, reference, do_repair: bool, consent: bool,
             clean_audit: bool, review: bool = False, replay: bool = False, experiment: tuple[str, ...] = (),
             rechoose: bool = False) -> dict:
    start = time.perf_counter()
    npz, info, poisoned_rows = write_case_data(folder, case, seed, clean_audit)
    # Planted cases share every image with the clean case, and so its generator; a natural case's images differ.
    shared = None if case == "clean" or case in NATURAL_CASES else folder / "clean" / "generator.ckpt"
    config = (sign_case_config(case, seed, experiment) if DATASET == "signs"
              else case_config(npz, seed, shared, experiment))
    run = RunDir(folder / case)
    if replay:
        return replay_correct(run, config, case, info, poisoned_rows, reference, consent, review, start, rechoose)
    # A directory kept from an earlier run (--keep) holds the simulated person's answers already: an unlabelled first
    # call would go on to repair without the consent to relabel, and the labelled call would repair again.
    answered = do_repair and run.path("person.yaml").exists()
    first = labelled_config(config, run.path("person.yaml"), consent) if answered else config
    if answered and review:  # ... and the review those answers lead to: else correct would run twice
        first = reviewed_config(first, simulated_review(run, first, reference))
    run_pipeline(first, run)
    stages = run.manifest()["stages"]
    out: dict = {**info, "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
                 "reconstruction_accuracy": stages["identify"]["metrics"]["reconstruction_accuracy"]}
    test = ImageDataModule(config.data, config.seed).split("test")
    if case == "clean":
        group = None
    else:
        group = sign_subgroup(config, case) if DATASET == "signs" else subgroup(test, case, info["threshold"])
    out.update(discovery_figures(run, config, case, reference, group))
    if DATASET == "signs" and case != "clean":
        out.update(fresh_subgroup_figures(run, config, case, {"before": load_classifier(
            run.path("classifier.ckpt")).model, "reference": reference}, load_generator(run.path("generator.ckpt"))))
    if do_repair:
        labelled = labelled_config(config, simulated_person(run, config, reference), consent)
        reviewed = {}
        if review:
            answers = simulated_review(run, labelled, reference)
            labelled = reviewed_config(labelled, answers)
            given = np.load(npz)["y"]
            reviewed = review_figures(answers, np.load(folder / "clean.npz")["y"], given)
        run_pipeline(labelled, run)
        if review:
            moved = []
            while len(moved) < REVIEW_ROUNDS and (count := review_moved(run, labelled, reference)):
                moved.append(count)
                run_pipeline(labelled, run)
            reviewed = {**review_figures(answers, np.load(folder / "clean.npz")["y"], given), "moved_reviewed": moved}
        out["repair"] = {"labels": "simulated person (independent clean reference's vote)",
                         "relabel_consent": labelled.correct.relabel, **reviewed,
                         **repair_figures(run, labelled, case, group, poisoned_rows)}
        if DATASET == "signs" and case != "clean" and run.path("repaired.ckpt").exists():
            out["repair"].update(fresh_subgroup_figures(run, labelled, case, {
                name: load_classifier(run.path(ckpt)).model
                for name, ckpt in (("before", "classifier.ckpt"), ("after", "repaired.ckpt"))}))
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def replay_correct(run: RunDir, config: RunConfig, case: str, info: dict, poisoned_rows: np.ndarray, reference,
                   consent: bool, review: bool, start: float, rechoose: bool = False) -> dict:
    """``--replay-correct``: the simulated person asked again (the running code's pictures of the kept regions), then
    the label, correct and verify stages again, forced, on a kept run (and a fresh simulated review, which the
    running code's rules decide), graded as :func:`run_case` grades, with the planted region's figures.

    ``rechoose`` (``--rechoose``): no new review; the kept run's review file as its person left it (their answers
    after the last look), label, correct and verify once. The fine-tune's checkpoints stand wherever what it trains
    on is unchanged (only settings that choose among candidates differ: ``stages.correct.stage.CHOICE_ONLY``), so
    an experiment on the choice re-grades the same candidates in about a minute a case. It leaves out what the
    changed choice would have moved for the person's next look."""
    if not run.path("person.yaml").exists() or not run.path("regions.json").exists():
        raise SystemExit(f"{run.root} holds no finished run with the simulated person's labels to replay: run "
                         f"`python scripts/bench_planted.py --keep {run.root.parent.parent}` first.")
    if rechoose and review and not run.path("review.csv").exists():
        raise SystemExit(f"{run.root} holds no review file to re-choose with: replay it with --review first.")
    labelled = labelled_config(config, simulated_person(run, config, reference), consent)
    reviewed = {}
    if rechoose:
        if review:
            labelled = reviewed_config(labelled, run.path("review.csv"))
            reviewed = review_figures(run.path("review.csv"), np.load(run.root.parent / "clean.npz")["y"],
                                      np.load(labelled.data.root)["y"])
        for name in ("label", "correct", "verify"):
            run_stage(stage_named(name), labelled, run, force=True)
        review = False  # the kept answers stand; nobody looks again
    elif review:
        answers = simulated_review(run, labelled, reference)
        labelled = reviewed_config(labelled, answers)
        reviewed = review_figures(answers, np.load(run.root.parent / "clean.npz")["y"],
                                  np.load(labelled.data.root)["y"])
    if not rechoose:
        for name in ("label", "correct", "verify"):
            run_stage(stage_named(name), labelled, run, force=True)
    if review:
        moved = []
        while len(moved) < REVIEW_ROUNDS and (count := review_moved(run, labelled, reference)):
            moved.append(count)
            for name in ("correct", "verify"):
                run_stage(stage_named(name), labelled, run, force=True)
        reviewed = {**review_figures(answers, np.load(run.root.parent / "clean.npz")["y"],
                                     np.load(labelled.data.root)["y"]), "moved_reviewed": moved}
    test = ImageDataModule(config.data, config.seed).split("test")
    group = subgroup(test, case, info["threshold"]) if case != "clean" else None
    discovery = {}
    if case != "clean":
        model = load_classifier(run.path("classifier.ckpt")).model
        x = reconstruct(load_generator(run.path("generator.ckpt")), test.float_images()[group], labels=test.labels[group])
        discovery = {"visibility": round(float((predict_labels(model, x) == case_spec(case)[1]).float().mean()), 4),
                     **planted_region_figures(run, config, case, reference)}
    return {**info, "replayed": ["label", "correct", "verify"], **({"rechosen": True} if rechoose else {}), **discovery,
            "repair": {"labels": "simulated person (independent clean reference's vote)",
                       "relabel_consent": labelled.correct.relabel, **reviewed,
                       **repair_figures(run, labelled, case, group, poisoned_rows)},
            "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- over seeds

# Figure -> (which end is worse, the acceptance bar of the repair issue or None)
# (the bars of the issue about bugs the labels do not show; the per-class drop is the repair issue's).
BARS = {
    "planted_rank": ("max", 3), "planted_precision": ("min", 0.8),
    "subgroup_accuracy_after": ("min", 0.85), "clean_accuracy_outside_subgroup_change": ("min", -0.003),
    "largest_per_class_drop_outside_subgroup": ("max", 0.02),
}
# Natural cases: no label to relabel, the region's decoded samples are the only evidence.
NATURAL_BARS = {"planted_rank": ("max", 5), "subgroup_gain": ("min", 0.15),
                "clean_accuracy_outside_subgroup_change": ("min", -0.003)}

# The signs' natural case: issue 36's bars (its pair among the 3 regions shown first with precision >= 0.8, the
# subgroup raised by 20 points on fresh renders, clean accuracy outside it within -0.5 points).
SIGN_BARS = {"planted_rank": ("max", 3), "planted_precision": ("min", 0.8), "fresh_subgroup_gain": ("min", 0.20),
             "clean_accuracy_outside_subgroup_change": ("min", -0.005)}


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean and worst of each figure per case over the seeds, and whether each bar holds on the worst seed."""
    figures = ("visibility", "planted_rank", "planted_precision", "planted_precision_gaussian",
               "planted_precision_direct", "planted_precision_reversed", "planted_best_precision_top3",
               "planted_bug_score", "valid_failures_per_1000_queries", "yield_vs_random_prior", "yield_vs_reference_search", "clean_test_accuracy")
    repair = ("subgroup_accuracy_before", "subgroup_accuracy_after", "subgroup_gain", "subgroup_accuracy_clean_model",
              "decoded_accuracy_before", "decoded_accuracy_after",
              "decoded_to_real_gap_after", "clean_accuracy_outside_subgroup_change",
              "largest_per_class_drop_outside_subgroup", "label_issues_poisoned", "label_issues_not_poisoned",
              "contradicted_poisoned", "contradicted_not_poisoned", "doubted_poisoned", "doubted_not_poisoned",
              "neighbour_poisoned", "neighbour_not_poisoned", "label_issues_precision", "label_issues_recall",
              "relabelled_precision", "relabelled_recall", "poisoned_rows",
              "fresh_subgroup_accuracy_before", "fresh_subgroup_accuracy_after", "fresh_subgroup_gain",
              "fresh_subgroup_visibility")
    out: dict = {}
    cases = next(iter(per_seed.values())).keys()
    for case in cases:
        rows = [per_seed[s][case] for s in per_seed]
        table: dict = {}
        for name in figures + repair:
            # The discovery bar holds where the generator can show the bug at all (visibility >= 0.5: the direct
            # pair's reconstructions), or where the bug was found from its labels' side (the reversed pair).
            # A sign case's bars (issue 36) count on every seed: its grade is the whole chain, generator included.
            counted = [r for r in rows if name not in ("planted_rank", "planted_precision", "planted_precision_gaussian",
                                                       "planted_best_precision_top3")
                       or (r.get("visibility") or 0) >= 0.5 or r.get("planted_orientation") == "reversed"
                       or case in SIGN_CASES]
            values = [r.get(name, r.get("repair", {}).get(name)) for r in counted]
            values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(values) < len(counted):
                values_note = f"{len(counted) - len(values)} seed(s) without it"
            else:
                values_note = None
            if not values:
                table[name] = {"mean": None, "worst": None, "missing": values_note}
                continue
            bars = SIGN_BARS if case in SIGN_CASES else NATURAL_BARS if case in NATURAL_CASES else BARS
            side = bars.get(name, BARS.get(name, ("min",)))[0]
            worst = max(values) if side == "max" else min(values)
            table[name] = {"mean": round(float(np.mean(values)), 4), "worst": worst, "values": values,
                           **({"missing": values_note} if values_note else {})}
            if name in bars and case != "clean":
                bar = bars[name][1]
                table[name]["bar"] = bar
                table[name]["met"] = (values_note is None) and (worst <= bar if side == "max" else worst >= bar)
        if case == "clean":
            changes = [r["repair"]["clean_accuracy"]["change"] for r in rows if "repair" in r]
            if changes:
                table["clean_test_accuracy_change"] = {"mean": round(float(np.mean(changes)), 4),
                                                       "worst": min(changes), "values": changes,
                                                       "bar": -0.002, "met": min(changes) >= -0.002}
        out[case] = table
    return out


REGRADED = ("planted_rank", "planted_orientation", "planted_precision", "planted_precision_direct",
            "planted_precision_reversed", "planted_precision_reversed_nearest_audit", "planted_bug_score",
            "planted_top3", "planted_best_precision_top3")


def regrade(keep: Path, seeds: list[int], cases: list[str], pairs_first: bool = False,
            redistill: bool = False) -> dict:
    """The discovery figures of kept runs (``--keep DIR`` of an earlier run), graded again by
    :func:`planted_region_figures` with each seed's kept reference; nothing is trained, run or written, except with
    ``redistill``: the distill stage runs again first (the running code, the kept config), as `defuse run --force
    distill` would, and rewrites regions.json and its pictures (the later stages' artifacts go stale). A kept run
    made before a config key was retired still reads: the retired keys touch no stage that discovery depends on."""
    from defuse.config import RETIRED_KEYS, config_from_mapping

    out: dict = {"regraded": str(keep), "pairs_first": pairs_first, "redistilled": redistill, "cases": {}}
    for seed in seeds:
        folder = keep / f"seed{seed}"
        reference = load_classifier(folder / "reference" / "classifier.ckpt").model
        for case in cases:
            run = RunDir(folder / case)
            if not run.path(REGIONS_JSON).exists():
                out["cases"].setdefault(str(seed), {})[case] = None  # not kept (or not distilled) for this seed
                continue
            raw = run.manifest()["config"]
            for key in RETIRED_KEYS:
                section, _, name = key.partition(".")
                if name and isinstance(raw.get(section), dict):
                    raw[section].pop(name, None)
            config = config_from_mapping(raw, [])
            if redistill:
                run_stage(stage_named("distill"), config, run, force=True)
            figures = planted_region_figures(run, config, case, reference, pairs_first)
            out["cases"].setdefault(str(seed), {})[case] = {k: figures.get(k) for k in REGRADED}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="planted cases to run (the clean control "
                        f"always runs); default: {', '.join(DEFAULT_CASES)}; also: "
                        f"{', '.join(c for c in CASES if c not in DEFAULT_CASES)} (fresh, never tuned on); natural (no label "
                        f"touched, the subgroup thinned out): {', '.join(NATURAL_CASES)}")
    parser.add_argument("--dataset", choices=("mnist", "signs"), default="mnist",
                        help="mnist (default): the MNIST test split as an npz, configs/mnist-test-split.yaml; signs: "
                        f"the rendered traffic signs, configs/signs.yaml, natural cases {', '.join(SIGN_CASES)} "
                        "(the default there)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default 0,1,2)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the run directories here (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--no-repair", action="store_true", help="discovery only: no labels, correct or verify")
    parser.add_argument("--no-consent", action="store_true", help="the person does not consent to relabelling")
    parser.add_argument("--clean-audit", action="store_true", help="leave the audit split's labels clean: a "
                        "curated gold set (default: every split but test carries the planted labels)")
    parser.add_argument("--replay-correct", action="store_true", help="with --keep DIR of an earlier run: re-run "
                        "only correct and verify on its kept runs (the running code, the shipped config) and grade "
                        "them; no discovery figures")
    parser.add_argument("--without-control", action="store_true", help="with --replay-correct: replay only the "
                        "named cases, not the clean control's repair (its figures stand from the kept run)")
    parser.add_argument("--review", action="store_true", help="the person also reviews each label issue image by "
                        "image (answered with the reference's reading), as `defuse review` asks")
    parser.add_argument("--set", action="append", default=[], metavar="correct.KEY=VALUE", dest="experiment",
                        help="with --replay-correct: an experiment on the repair, not the product as shipped (listed "
                        "under deviations); repeatable, correct.* keys only, e.g. --set correct.epochs=10")
    parser.add_argument("--rechoose", action="store_true", help="with --replay-correct (and --review): no new "
                        "review; each kept run's review file as its person left it, then label, correct and verify "
                        "once: an experiment on how candidates are chosen (--set correct.layers=[all], "
                        "correct.lambdas=[0], ...) re-grades the kept checkpoints in about a "
                        "minute a case")
    parser.add_argument("--regrade", action="store_true",
                        help="with --keep DIR of an earlier run: re-grade only the discovery of its kept runs (the "
                             "planted pair's regions, their ranks and precision, by this script's grader); runs and "
                             "trains nothing, changes no file (but see --redistill)")
    parser.add_argument("--redistill", action="store_true",
                        help="with --regrade: run the distill stage again on each kept run first (this code, the "
                             "kept config; about 20 s a run), then grade: a change to distill measured on the same "
                             "failures")
    parser.add_argument("--pairs-first", action="store_true",
                        help="with --regrade: grade the kept regions in the order distill.order: pairs_first shows "
                             "them (each confusion pair's best region first), for runs distilled before that order "
                             "existed")
    args = parser.parse_args(argv)
    global DATASET
    DATASET = args.dataset
    if args.dataset == "signs":
        if args.cases == ",".join(DEFAULT_CASES):
            args.cases = ",".join(SIGN_CASES)
        if args.review or args.clean_audit or args.replay_correct or args.regrade:
            parser.error("--dataset signs runs natural cases only (no label is touched): --review, --clean-audit, "
                         "--replay-correct and --regrade are for the planted MNIST cases")
    if args.pairs_first and not args.regrade:
        parser.error("--pairs-first re-orders kept regions for --regrade; a fresh run distills in the shipped order")
    if args.redistill and not args.regrade:
        parser.error("--redistill re-runs distill on kept runs before grading them: it goes with --regrade --keep DIR")
    if args.regrade:
        if not args.keep:
            parser.error("--regrade reads kept runs: give --keep DIR (an earlier run's directory)")
        return emit(regrade(Path(args.keep), [int(s) for s in args.seeds.split(",") if s.strip()],
                            [c.strip() for c in args.cases.split(",") if c.strip() and c.strip() != "clean"],
                            args.pairs_first, args.redistill), args.out)
    bad = [item for item in args.experiment if not item.startswith("correct.") or "=" not in item]
    if bad or (args.experiment and not args.replay_correct):
        parser.error("--set takes correct.KEY=VALUE and goes with --replay-correct (an experiment on the repair of "
                     f"kept runs, whose discovery it leaves alone); got {', '.join(bad or args.experiment)}")
    try:  # a misspelt key or a bad value fails here, not after the first seed's reference is trained
        case_config(Path("unused.npz"), 0, extra=tuple(args.experiment))
    except ValueError as error:
        parser.error(f"--set: {error}")
    if args.rechoose and not args.replay_correct:
        parser.error("--rechoose re-grades the kept candidates of a replay: it goes with --replay-correct --keep DIR")
    if args.replay_correct and (not args.keep or args.no_repair):
        parser.error("--replay-correct re-runs the repair of kept runs: give --keep DIR (an earlier run's "
                     "directory), and not --no-repair")
    torch.set_num_threads(2)
    if args.without_control and not args.replay_correct:
        parser.error("--without-control goes with --replay-correct: a fresh run needs its clean control")
    cases = [*([] if args.without_control else ["clean"]),
             *(c.strip() for c in args.cases.split(",") if c.strip() and c.strip() != "clean")]
    known = SIGN_CASES if args.dataset == "signs" else [*CASES, *NATURAL_CASES]
    unknown = [c for c in cases if c != "clean" and c not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} for --dataset {args.dataset}; the cases are "
                     f"{', '.join(known)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    t0 = time.perf_counter()
    deviations = {k: {"value": v, "reason": r} for k, (v, r) in DEVIATIONS.items()}
    if args.dataset == "mnist":
        deviations[SHARED_GENERATOR[0]] = {"value": "clean/generator.ckpt", "reason": SHARED_GENERATOR[1]}
    for item in args.experiment:
        key, value = item.split("=", 1)
        deviations[key] = {"value": value, "reason": "an experiment (--set): not the product as shipped"}
    result: dict = {"config": str((SIGNS_SHIPPED if args.dataset == "signs" else SHIPPED).name),
                    "dataset": args.dataset, "deviations": deviations, "seeds": seeds,
                    "clean_audit": args.clean_audit, "consent": not args.no_consent, "review": args.review,
                    "replay_correct": args.replay_correct, "rechoose": args.rechoose,
                    "cases": {}}
    per_seed: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            folder = root / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            clean_npz, _, _ = write_case_data(folder, "clean", seed, args.clean_audit)
            reference = train_reference(folder, clean_npz, seed)
            per_seed[seed] = {}
            clean_max = 0.0
            for case in cases:
                out = run_case(case, folder, seed, reference, not args.no_repair, not args.no_consent,
                               args.clean_audit, args.review, args.replay_correct, tuple(args.experiment),
                               args.rechoose)
                if args.replay_correct:
                    pass  # no discovery figures to compare with the clean control
                elif case == "clean":
                    clean_max = out["max_bug_score"]
                    result.setdefault("splits", RunDir(folder / "clean").metrics("fit-classifier").get("split_sizes"))
                else:
                    score = out.get("planted_bug_score")
                    out["beats_clean_control"] = bool(score is not None and score > clean_max)
                per_seed[seed][case] = out
                progress(f"seed {seed} {case}", out)
    result["cases"] = {str(seed): cases_out for seed, cases_out in per_seed.items()}
    result["summary"] = summarise(per_seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
