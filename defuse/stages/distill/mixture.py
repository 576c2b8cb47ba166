"""Distillation: group failures into a few coherent, ranked misclassification regions.

One Dirichlet-process Gaussian mixture (scikit-learn's ``BayesianGaussianMixture``)
is fitted per (source -> predicted) pair, so no region mixes confusion pairs; the
process switches off the components it does not need.

Search failures lie around their sources in every direction that flips, so a Gaussian
fitted to them straddles the decision boundary and covers the sources too. Each
component is therefore *refined* on its own fresh samples (``refine_steps`` rounds of
the cross-entropy method): draw from N(mean, cov), weight each sample by "the classifier
reads it as the predicted class" times its validity, refit mean and covariance to the
weighted samples. The region then describes where that mistake is made on inputs that
still look like the source class. It is scored on other, independent fresh samples.

Bug score (in [0, 1], comparable across models and datasets):

    bug_score = error_rate * validity * confidence * evidence
    evidence  = 1 - (1 - real_error_rate) * (1 - label_doubt)

(evidence from real held-out images *or* from contested training labels: either one can say "bug")

* ``error_rate``: share of fresh samples the classifier reads as the region's predicted
  class. A region that is not consistently misclassified is not one bug.
* ``validity``: mean probability, under the validity model (independent of the
  classifier), that a fresh sample is still of the source class.
* ``confidence``: the classifier's mean softmax on the predicted class over the
  misread fresh samples. A bug is a confident mistake, not a coin flip at a boundary.
* ``real_error_rate``: evidence from *real* held-out images (the validity split). Of the
  ``real_neighbours`` real images of the source class nearest the region's centre (``distill.real_neighbours``,
  distance in the validity model's standardised latent space), ``real_misread`` are read as the
  predicted class; the rate is smoothed with half a misread in five. A real bug is a place where real
  images of the source class are misread the same way; a natural boundary confusion is a place
  whose nearest real images the classifier reads right (it is 99% accurate on real data).
  Measured on the planted-bug benchmark: the planted 7 -> 1 region's 20 nearest real 7s held 10
  misreads, while no clean-control region's held more than 2. The nearest real images, not those
  inside the region's ellipsoid, because the search's regions are tight (a walk through one failure
  region) and rarely contain a real image; the median distance (``real_distance``, in standardised
  latent units) says how near they are. The validity model alone cannot separate bugs from
  hybrids: it is confidently wrong on some, e.g. an 8/6 hybrid it calls 8.
* ``label_doubt``: evidence that does not trust the labels' *consistency*. real_error_rate reads the audit
  split's labels, and where train, val and audit all carry one labelling error the audit images around the bug carry
  it too, so the model "reads them right" (issue 33). The classifier's training margins see it anyway: an image
  whose label disagrees with what similar images teach is learnt late and with a small margin (its area under the
  margin, AUM; Pleiss et al. 2020), however consistently the error was made. ``label_aum`` is the mean AUM of the
  ``real_neighbours`` training images of the region's two classes nearest its centre; ``label_doubt`` = max(0, 1 -
  label_aum / the median AUM of those two classes' training images): 0 where the labels around it were learnt as
  easily as their classes' typical image, towards 1 where they were fought over. Measured before it was adopted
  (scripts/probe_training_margins.py, 16 planted runs on seeds 0-2, every split but test poisoned): the planted
  pair's region had the lowest label_aum of its run in all 16 and lay below every region of the clean controls.
  Without recorded margins (a classifier the user brought) it is 0 and evidence is real_error_rate alone.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture
from torch import nn

from defuse.artifacts import REGIONS_DIR, UMAP_PNG
from defuse.config import DistillConfig
from defuse.models.inference import BATCH, inference_copy, latent_means, predict_labels
from defuse.records import REAL_PRIOR, Failures, Region, Regions, inside_ellipsoid
from defuse.regions import region_grids
from defuse.rundir import RunDir, atomic_write_bytes
from defuse.search import make_evaluate
from defuse.seeding import int_seed, numpy_rng
from defuse.validity import ValidityModel, nearest_of_class, standardised_distance

if TYPE_CHECKING:
    from defuse.data import ImageSet

REAL_SHOWN = 8  # nearest real images per region recorded in regions.json and drawn for the report
# The training images of a region's source class nearest its centre among which the hardest-learnt REAL_SHOWN are
# shown (``doubted_nearest``): five times as many as are shown, so the row can pass over the genuine images that
# crowd a labelling bug's neighbourhood and still stay near the region.
DOUBTED_POOL = 40

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealEvidence:
    """Real held-out images as seen by the generator and the classifier: encoder means (N, d), labels and
    the classifier's predictions (N,). Used to ask of a region: do real images of its source class live here,
    and does the classifier misread them the same way?"""

    z: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    images: torch.Tensor | None = field(default=None, repr=False)  # (N, C, H, W), for the report's pictures

    @classmethod
    def observe(cls, classifier: nn.Module, generator: nn.Module, images: ImageSet) -> RealEvidence:
        """Encode and classify real labelled images (the audit split in the pipeline; never the test split)."""
        x = images.float_images()
        return cls(latent_means(generator, x, labels=images.labels).numpy(), images.labels.numpy(), predict_labels(classifier, x).numpy(), x)


@dataclass(frozen=True)
class LabelMargins:
    """The training images as the generator sees them (encoder means (N, d)), their given labels and their area
    under the margin (mean over epochs of fit-classifier's training margins): where the training labels were
    fought over (module docstring, ``label_doubt``)."""

    z: np.ndarray
    labels: np.ndarray
    aum: np.ndarray
    images: ImageSet | None = field(default=None, repr=False)  # the train split, for the pictures of the shown ones

    @classmethod
    def observe(cls, generator: nn.Module, images: ImageSet, margins: np.ndarray) -> LabelMargins | None:
        """From training_margins.npy's (epochs, N) table over ``images`` (the train split); None when it has no
        epochs (a classifier the user brought) or does not match the split (then say why)."""
        if len(margins) == 0:
            return None
        if margins.shape[1] != len(images):
            log.warning("training_margins.npy holds %d training images' margins but the train split has %d: "
                        "ranking without them. Re-run `defuse fit-classifier --force`.", margins.shape[1], len(images))
            return None
        z = latent_means(generator, images.float_images(), labels=images.labels).numpy()
        return cls(z, images.labels.numpy(), margins.mean(axis=0).astype(np.float64), images)

    def hardest_near(self, centre: np.ndarray, label: int, validity: ValidityModel, shown: int = REAL_SHOWN,
                     pool: int = DOUBTED_POOL) -> np.ndarray:
        """Train split positions of the ``shown`` training images labelled ``label`` whose labels were hardest to
        learn (lowest area under the margin) among the ``pool`` of them nearest ``centre``, hardest first. Where
        every split carries one labelling error, the images around its region that the model learnt late are its
        mislabelled ones, while the nearest are as often genuine (docs/benchmarks.md)."""
        nearest = nearest_of_class(self.z, self.labels, label, centre, validity, pool)
        return nearest[np.argsort(self.aum[nearest], kind="stable")[:shown]]

    def around(self, centre: np.ndarray, classes: tuple[int, int], validity: ValidityModel,
               k: int) -> tuple[float, float] | None:
        """(label_aum, label_doubt) of the ``k`` training images of ``classes`` nearest ``centre`` (standardised
        latent space); None where those classes' median AUM is not positive (a classifier that never fitted them)."""
        of_pair = np.nonzero(np.isin(self.labels, classes))[0]
        typical = float(np.median(self.aum[of_pair])) if len(of_pair) else 0.0
        if not typical > 0:
            return None
        nearest = of_pair[np.argsort(standardised_distance(self.z[of_pair], validity, centre), kind="stable")[:k]]
        label_aum = float(self.aum[nearest].mean())
        return label_aum, min(max(1.0 - label_aum / typical, 0.0), 1.0)


# ----------------------------------------------------------------------------- fitting


def _fit_pair(z: np.ndarray, config: DistillConfig, seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """DP mixture on one pair's latents; returns labels (n,) and (mean, cov) of each kept component."""
    n = len(z)
    components = max(1, min(config.max_components, n // config.min_region_size))
    if components == 1:
        cov = np.cov(z, rowvar=False) + 1e-3 * np.eye(z.shape[1])
        return np.zeros(n, dtype=int), [(z.mean(axis=0), cov)]
    mixture = BayesianGaussianMixture(
        n_components=components, covariance_type="full", weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=config.weight_concentration, reg_covar=1e-3, max_iter=300,
        random_state=int_seed(seed, "distill.mixture"),
        init_params="k-means++",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few EM steps short is harmless for ranking
        labels = mixture.fit_predict(z)
    return labels, [(mixture.means_[k], mixture.covariances_[k]) for k in range(components)]


def distill(
    failures: Failures,
    classifier: nn.Module,
    generator: nn.Module,
    validity: ValidityModel,
    classes: tuple[str, ...],
    config: DistillConfig,
    *,
    seed: int = 0,
    real: RealEvidence | None = None,
    sources: np.ndarray | None = None,
    margins: LabelMargins | None = None,
) -> Regions:
    """Fit regions per confusion pair, refine them on fresh samples, score them and rank them: by bug score, each
    pair's best region first (``config.order``, :func:`pairs_first`).

    Args:
        real: held-out images (latents, labels, classifier predictions) for the real-data evidence term; without
            them every region gets the prior real_error_rate (0.1) and the ranking rests on fresh samples alone.
        sources: encoder means of the searched split, (N, d), indexed by the failures' ``source_index``: each
            region's ``source_radius`` (0 without them).
        margins: the training images' areas under the margin, for ``label_doubt`` (0 without them).
    """
    z_all = failures.z
    table = failures.table
    if len(z_all) and not np.isfinite(z_all).all():
        raise ValueError("failures_z.npy holds NaN or infinite latents: refusing to fit regions on them. "
                         "Re-run `defuse identify --force`.")
    stats: dict[str, Any] = {"failures": int(len(table)), "pairs": 0, "pairs_too_small": 0}
    if len(table) == 0:
        log.warning("No failures to distill: the search found none. regions.json will be empty.")
        return Regions([], stats, tuple(classes))
    rng = numpy_rng(seed, "distill.fresh_samples")
    candidates: list[dict[str, Any]] = []
    pairs = table.groupby(["source_label", "predicted_label"]).indices
    for (source, predicted), rows in sorted(pairs.items()):
        stats["pairs"] += 1
        if len(rows) < config.min_failures:
            stats["pairs_too_small"] += 1
            continue
        labels, params = _fit_pair(z_all[rows], config, seed)
        for k, (mean, cov) in enumerate(params):
            members = rows[labels == k]
            if len(members) < config.min_region_size:
                continue
            candidates.append({"source": int(source), "predicted": int(predicted), "members": members,
                               "mean": mean, "cov": cov, "fit_mean": mean, "fit_cov": cov, "pair_rows": rows})
    if not candidates:
        log.warning("No confusion pair has %d or more failures: no regions.", config.min_failures)
        return Regions([], stats, tuple(classes))
    evaluate = make_evaluate(generator.eval(), inference_copy(classifier))
    _refine(candidates, evaluate, validity, config, rng)
    scored = _score(candidates, failures, evaluate, validity, config, rng, real, margins)
    for c in scored:
        c["source_radius"] = _source_radius(c, failures, sources, validity)
    scored.sort(key=lambda c: (-c["bug_score"], c["source"], c["predicted"]))
    if config.order == "pairs_first":
        scored = pairs_first(scored)
    scored = scored[: config.max_regions]
    if margins is not None and margins.images is not None:
        _read_doubted(scored, margins, classifier)
    regions = [
        Region(
            id=rank, source_label=c["source"], predicted_label=c["predicted"],
            pair=f"{classes[c['source']]} -> {classes[c['predicted']]}", n_failures=int(len(c["members"])),
            weight=round(len(c["members"]) / len(table), 4), purity=c["purity"], error_rate=c["error_rate"],
            flip_rate=c["flip_rate"], validity=c["validity"], confidence=c["confidence"],
            suggested_label=c["suggested_label"], median_radius=c["median_radius"],
            pair_median_radius=c["pair_median_radius"], source_confidence=c["source_confidence"],
            coverage=c["coverage"], bug_score=c["bug_score"], real_neighbours=c["real_neighbours"],
            real_misread=c["real_misread"], real_distance=c["real_distance"], real_error_rate=c["real_error_rate"],
            real_nearest=c["real_nearest"], real_nearest_read=c["real_nearest_read"],
            source_radius=c["source_radius"], label_aum=c["label_aum"], label_doubt=c["label_doubt"],
            doubted_nearest=c["doubted_nearest"], doubted_nearest_read=c.get("doubted_nearest_read", []),
            mean=c["mean"].tolist(), cov=c["cov"].tolist(),
        )
        for rank, c in enumerate(scored, start=1)
    ]
    stats["regions"] = len(regions)
    return Regions(regions, stats, tuple(classes))


def pairs_first(ranked: list, pair_of: Callable[[Any], tuple[int, int]] = lambda c: (c["source"], c["predicted"])
                ) -> list:
    """``ranked`` (best first) reordered so that each confusion pair's best region comes before any pair's second:
    the pairs' best in their own order, then the rest in theirs. A person labels the first regions shown; near
    duplicates of one strong pair should not hide a different bug behind them. ``pair_of``: an item's (source,
    predicted) pair (default: distill's candidate dicts)."""
    seen: set[tuple[int, int]] = set()
    best, rest = [], []
    for c in ranked:
        pair = pair_of(c)
        (rest if pair in seen else best).append(c)
        seen.add(pair)
    return best + rest


def _classify_latents(evaluate, z: np.ndarray, chunk: int = BATCH) -> np.ndarray:
    """Softmax probabilities (N, K) of the classifier on decoded latents, in chunks."""
    with torch.no_grad():
        return torch.cat([F.softmax(evaluate(torch.from_numpy(z[i : i + chunk])).float(), dim=1)
                          for i in range(0, len(z), chunk)]).numpy()


def _refine(candidates: list[dict[str, Any]], evaluate, validity: ValidityModel, config: DistillConfig,
            rng: np.random.Generator) -> None:
    """Cross-entropy-method steps, in place: refit each candidate's Gaussian to its fresh samples weighted by
    (read as the predicted class) x (validity of the source class). All candidates are sampled in one batch.
    A candidate whose samples carry too little weight (fewer than d + 1 effective samples) keeps its Gaussian.
    Refinement draws half the scoring sample size (at least 2 (d + 1)): every candidate pays for these rounds, and
    the refit needs far fewer samples than a precise error rate does."""
    d = candidates[0]["mean"].shape[0]
    n = max(config.fresh_samples // 2, 2 * (d + 1))
    for _ in range(config.refine_steps):
        z = np.concatenate([rng.multivariate_normal(c["mean"], c["cov"], size=n, method="cholesky")
                            for c in candidates]).astype(np.float32)
        pred = _classify_latents(evaluate, z).argmax(axis=1)
        valid = validity.scores(z)
        for i, c in enumerate(candidates):
            block = slice(i * n, (i + 1) * n)
            w = (pred[block] == c["predicted"]) * valid[block, c["source"]]
            peak = w.max()
            if not peak > 0:  # no sample read as the predicted class and valid (or a NaN score): keep the Gaussian
                continue
            # The effective sample size is scale-free: computed on w / peak, validities as small as 1e-200 (a tiny
            # model's) cannot underflow into 0 / 0.
            share = w / peak
            if share.sum() ** 2 / (share**2).sum() < d + 1:
                continue
            w = w / w.sum()
            mean = w @ z[block]
            diff = z[block] - mean
            c["mean"], c["cov"] = mean.astype(np.float64), (diff.T * w) @ diff + 1e-3 * np.eye(d)


def _score(candidates, failures, evaluate, validity, config, rng, real: RealEvidence | None,
           margins: LabelMargins | None = None) -> list[dict[str, Any]]:
    """Fresh samples for every candidate region at once: decode, classify, judge validity; real-data evidence and
    the training labels' doubt around each region."""
    n = config.fresh_samples
    fresh = np.concatenate([
        rng.multivariate_normal(c["mean"], config.tau * c["cov"], size=n, method="cholesky") for c in candidates
    ]).astype(np.float32)
    probs = _classify_latents(evaluate, fresh)
    pred = probs.argmax(axis=1)
    valid_probs = validity.scores(fresh)
    lr_probs = validity.predict_proba(fresh)
    z_all = failures.z
    pair_of = failures.table[["source_label", "predicted_label"]].to_numpy()
    radius = failures.table["radius"].to_numpy()
    source_conf = failures.table["source_confidence"].to_numpy()
    source_index = failures.table["source_index"].to_numpy()
    failing_sources = failures.table.groupby("source_label")["source_index"].nunique()
    out = []
    for i, c in enumerate(candidates):
        block = slice(i * n, (i + 1) * n)
        p, vp, cp = pred[block], valid_probs[block], probs[block]
        misread = p == c["predicted"]
        error_rate = float(misread.mean())
        validity_mean = float(vp[:, c["source"]].mean())
        confidence = float(cp[misread, c["predicted"]].mean()) if misread.any() else 0.0
        inside = inside_ellipsoid(z_all, c["fit_mean"], c["fit_cov"])  # the component as fitted, before refinement
        same_pair = (pair_of[:, 0] == c["source"]) & (pair_of[:, 1] == c["predicted"])
        purity = float(same_pair[inside].mean()) if inside.any() else 1.0
        nearest = _real_neighbours(real, validity, c, config.real_neighbours)
        read = real.predicted[nearest] if len(nearest) else np.zeros(0, dtype=int)
        neighbours, misread_real = len(nearest), int((read == c["predicted"]).sum())
        distance = _real_distance(real, validity, c, nearest)
        real_rate = (misread_real + REAL_PRIOR[0]) / (neighbours + REAL_PRIOR[1])
        around = (margins.around(c["mean"], (c["source"], c["predicted"]), validity, config.real_neighbours)
                  if margins is not None else None)
        doubt = around[1] if around is not None else 0.0
        doubted = (margins.hardest_near(c["mean"], c["source"], validity) if margins is not None
                   else np.zeros(0, dtype=int))
        evidence = 1.0 - (1.0 - real_rate) * (1.0 - doubt)
        out.append({
            **c,
            "error_rate": round(error_rate, 4),
            "flip_rate": round(float((p != c["source"]).mean()), 4),
            "validity": round(validity_mean, 4),
            "confidence": round(confidence, 4),
            "suggested_label": int(np.bincount(lr_probs[block].argmax(axis=1), minlength=vp.shape[1]).argmax()),
            "purity": round(purity, 4),
            "median_radius": round(float(np.median(radius[c["members"]])), 4),
            "pair_median_radius": round(float(np.median(radius[c["pair_rows"]])), 4),
            "source_confidence": round(float(np.mean(source_conf[c["members"]])), 4),
            "coverage": round(len(np.unique(source_index[c["members"]])) / int(failing_sources[c["source"]]), 4),
            "real_neighbours": neighbours,
            "real_misread": misread_real,
            "real_distance": round(distance, 4),
            "real_error_rate": round(real_rate, 4),
            "real_nearest": [int(i) for i in nearest[:REAL_SHOWN]],
            "real_nearest_read": [int(k) for k in read[:REAL_SHOWN]],
            "label_aum": round(around[0], 4) if around is not None else None,
            "label_doubt": round(around[1], 4) if around is not None else None,
            "doubted_nearest": [int(i) for i in doubted],
            "bug_score": round(error_rate * validity_mean * confidence * evidence, 4),
        })
    return out


def _read_doubted(candidates: list[dict[str, Any]], margins: LabelMargins, classifier: nn.Module) -> None:
    """Each candidate's ``doubted_nearest_read``: the class the classifier reads each of its shown training images
    as, all of them in one batch."""
    shown = sorted({i for c in candidates for i in c["doubted_nearest"]})
    if not shown:
        return
    images = margins.images.subset(torch.as_tensor(shown)).float_images()
    read = dict(zip(shown, predict_labels(classifier, images).tolist()))
    for c in candidates:
        c["doubted_nearest_read"] = [int(read[i]) for i in c["doubted_nearest"]]


def _source_radius(candidate: dict[str, Any], failures: Failures, sources: np.ndarray | None,
                   validity: ValidityModel) -> float:
    """Median standardised distance from the candidate's centre to the distinct sources of its member failures."""
    if sources is None or len(candidate["members"]) == 0:
        return 0.0
    index = np.unique(failures.table["source_index"].to_numpy()[candidate["members"]])
    return round(float(np.median(standardised_distance(sources[index], validity, candidate["mean"]))), 4)


def _real_neighbours(real: RealEvidence | None, validity: ValidityModel, candidate: dict[str, Any],
                     k: int) -> np.ndarray:
    """Positions in ``real`` of the ``k`` real images of the candidate's source class nearest its centre, in the
    validity model's standardised latent space, nearest first (empty without real evidence)."""
    if real is None or len(real.z) == 0:
        return np.zeros(0, dtype=int)
    return nearest_of_class(real.z, real.labels, candidate["source"], candidate["mean"], validity, k)


def _real_distance(real: RealEvidence | None, validity: ValidityModel, candidate: dict[str, Any],
                   nearest: np.ndarray) -> float:
    """Median standardised distance of the ``nearest`` real images to the candidate's centre (0 without any)."""
    if real is None or len(nearest) == 0:
        return 0.0
    return float(np.median(standardised_distance(real.z[nearest], validity, candidate["mean"])))


# ----------------------------------------------------------------------------- pictures


def save_grid_png(path, images: torch.Tensor, scale: int = 3) -> None:
    """A 4-column grid of images, upscaled with nearest neighbours, written atomically as PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=4, padding=2, pad_value=1.0)
    array = (grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
    if array.shape[2] == 1 or (array[..., 0] == array[..., 1]).all():
        array = array[..., 0]
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def embed_2d(points: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(N, 2) map coordinates of ``points`` (N, D): t-SNE or UMAP, seeded on stream ``distill.umap``.

    t-SNE is the default because umap-learn's numba code is compiled in every new process (about 15 s, not
    cached), which on a small map costs ten times the layout itself; scikit-learn's t-SNE is compiled ahead of
    time. Both keep neighbourhoods, which is what the map is read for (which failures sit among which images)."""
    random_state = int_seed(seed, "distill.umap")
    if method == "umap":
        import umap
        from sklearn.metrics import pairwise_distances

        # Precomputed distances: below 4,096 points umap-learn otherwise calls its metric once per pair from
        # Python (16 million calls for 4,000 failures: 9 s of a 12 s fit); 200 layout epochs, its own default for
        # large data.
        return umap.UMAP(n_components=2, n_neighbors=min(15, max(2, len(points) - 1)), metric="precomputed",
                         n_epochs=200, random_state=random_state).fit_transform(pairwise_distances(points))
    from sklearn.manifold import TSNE

    # Perplexity must stay below the number of points; PCA initialisation keeps the global layout stable; 500
    # iterations (half the default) settle a map of a few thousand points: 0.8 s against 1.6 s for the digits run.
    perplexity = float(min(30.0, max(1.0, (len(points) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=random_state
                ).fit_transform(points.astype(np.float32))


def region_colours(count: int) -> list:
    """``count`` distinct colours for regions 1..count: tab20, then tab20b and tab20c (60 before any repeats)."""
    import matplotlib.pyplot as plt

    palette = [plt.get_cmap(name)(i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    return [palette[i % len(palette)] for i in range(count)]


def save_umap(path, failures: Failures, regions: Regions, seed: int, max_points: int = 4000,
              real: RealEvidence | None = None, max_real: int = 1000, thumbnails: int = 60,
              method: str = "tsne") -> list[str]:
    """The failure map (umap.png): a 2-D map (t-SNE or UMAP, :func:`embed_2d`) of failure latents, coloured by
    the region each failure was assigned to (grey: none), every region in the legend. Returns the legend's
    entries.

    With ``real`` (the held-out images distill read as evidence), up to ``max_real`` of their latents are embedded
    with the failures and drawn underneath as faint dots, with ``thumbnails`` of the images themselves at their
    places: a reader sees which real digits each failure cluster sits among."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    z = failures.z
    rng = numpy_rng(seed, "distill.umap")
    keep = np.sort(rng.choice(len(z), size=min(len(z), max_points), replace=False))
    z = z[keep]
    assignment = np.full(len(z), -1)
    best = np.full(len(z), np.inf)
    pairs = failures.table[["source_label", "predicted_label"]].to_numpy()[keep]
    for region in regions.regions:
        same = (pairs[:, 0] == region.source_label) & (pairs[:, 1] == region.predicted_label)
        diff = z - np.asarray(region.mean)
        d2 = np.einsum("nd,dk,nk->n", diff, np.linalg.inv(np.asarray(region.cov)), diff)
        better = same & (d2 < best)
        assignment[better], best[better] = region.id, d2[better]
    real_keep = np.zeros(0, dtype=int)
    if real is not None and len(real.z):
        real_keep = np.sort(rng.choice(len(real.z), size=min(len(real.z), max_real), replace=False))
    points = np.concatenate([z, real.z[real_keep]]) if len(real_keep) else z
    embedding = embed_2d(points, method, seed)
    failure_xy, real_xy = embedding[: len(z)], embedding[len(z):]
    fig, ax = plt.subplots(figsize=(8, 6.5), dpi=110)
    if len(real_keep):
        ax.scatter(*real_xy.T, s=3, c="#e3e3e3", label="real held-out images", zorder=0)
        if real.images is not None:
            for i in rng.choice(len(real_keep), size=min(thumbnails, len(real_keep)), replace=False):
                image = real.images[real_keep[i]].float().clamp(0, 1).permute(1, 2, 0).numpy()
                box = OffsetImage(image[..., 0] if image.shape[2] == 1 else image, zoom=0.9, cmap="gray_r"
                                  if image.shape[2] == 1 else None, alpha=0.45)
                ax.add_artist(AnnotationBbox(box, real_xy[i], frameon=False, zorder=1))
    ax.scatter(*failure_xy[assignment < 0].T, s=4, c="#9a9a9a", label="failure, no region", zorder=2)
    colours = region_colours(max((r.id for r in regions.regions), default=0))
    shown = 0
    for region in regions.regions:
        mask = assignment == region.id
        if mask.any():
            ax.scatter(*failure_xy[mask].T, s=6, color=colours[region.id - 1], label=f"#{region.id} {region.pair}",
                       zorder=3)
            shown += 1
    ax.set_title(f"Failures in latent space ({'UMAP' if method == 'umap' else 't-SNE'}) among real images, "
                 "coloured by region")
    ax.set_xticks([])
    ax.set_yticks([])
    legend = ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       ncol=1 if shown <= 20 else 2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return [text.get_text() for text in legend.get_texts()]


def save_pictures(run: RunDir, regions: Regions, failures: Failures, generator: nn.Module, config: DistillConfig,
                  seed: int, real: RealEvidence | None = None, classifier: nn.Module | None = None,
                  margins: LabelMargins | None = None) -> None:
    """Each region's sample grid (regions/region_XX.png), the real images nearest it (regions/region_XX_real.png,
    when ``real`` holds images), the hardest-learnt training images near it (regions/region_XX_doubted.png, when
    ``margins`` holds the train split) and, with ``config.umap``, the failure map (umap.png).

    Pictures of an earlier distill run are removed first, so no stale grid outlives its region."""
    for stale in run.path(REGIONS_DIR).glob("region_*.png") if run.path(REGIONS_DIR).is_dir() else ():
        stale.unlink()
    for region_id, images in region_grids(regions, generator, config.tau, seed, classifier).items():
        save_grid_png(run.path(f"{REGIONS_DIR}/region_{region_id:02d}.png"), images)
    if real is not None and real.images is not None:
        for region in regions.regions:
            if region.real_nearest:
                save_grid_png(run.path(f"{REGIONS_DIR}/region_{region.id:02d}_real.png"),
                              real.images[region.real_nearest])
    if margins is not None and margins.images is not None:
        for region in regions.regions:
            if region.doubted_nearest:
                save_grid_png(run.path(region.doubted_grid),
                              margins.images.subset(torch.as_tensor(region.doubted_nearest)).float_images())
    run.path(UMAP_PNG).unlink(missing_ok=True)
    if config.umap and len(failures) >= 10:
        save_umap(run.path(UMAP_PNG), failures, regions, seed, real=real, method=config.map_method)
