"""The artifacts stages hand each other, as typed records: what each stage writes, and how it is read back.

A stage module imports records, never another stage: distill reads identify's :class:`Failures`, label,
correct and verify read distill's :class:`Regions` and the person's answers in :class:`LabelBook`, the report
reads them all. Each record saves to and loads from its file (``save(path)`` / ``load(path)``; a record with
companion files keeps them beside it, under the names in :mod:`defuse.artifacts`). Loading this module costs
numpy only (pandas and scipy when a method needs them), so the label prompt starts at once.

- :class:`Failures` (identify): failures.parquet + failures_z.npy.
- :class:`Region`, :class:`Regions` (distill): regions.json + regions/region_XX.npz.
- :class:`Answer`, :class:`LabelBook` (label): labels.jsonl, append-only. The one record that is not frozen:
  it is the file's reader and writer, so a killed prompt loses no answer (each line is fsynced).
- :class:`Verification` (verify): verify.json, a :class:`VerifyResult`.
- :class:`CheckResult` (check-before, check-after): checks/<name>.json, written by
  :class:`defuse.invariance.check.InvarianceCheck` and read by check-after (its reference) and the report.

The JSON documents (verify.json, the checks) are typed as ``TypedDict``s: their keys are a documented contract
(docs/report.md), read as they are written, and the files stay byte for byte what they were.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Union

import numpy as np

from defuse.artifacts import FAILURES_Z, REGIONS_DIR
from defuse.rundir import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

# ----------------------------------------------------------------------------- identify: failures


WEAK_RECONSTRUCTION = 0.9  # below this share of correctly read images surviving reconstruction, identify warns


def least_drawn(reach: dict[str, float], classes: Sequence[str] = (), shown: int = 3) -> str:
    """The ``shown`` classes whose correctly read images least often keep their class through the generator, as
    "name NN%", worst first (``reach``: a search's ``reconstruction_by_class``, class index as text -> share)."""
    worst = sorted(((share, int(k)) for k, share in reach.items()))[:shown]
    return ", ".join(f"{classes[k] if k < len(classes) else k} {share:.0%}" for share, k in worst)


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

    def save(self, path: str | Path) -> None:
        """Write the table to ``path`` (failures.parquet) and the latents beside it (failures_z.npy)."""
        path = Path(path)
        buffer = io.BytesIO()
        self.table.to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, self.z.astype(np.float32), allow_pickle=False)
        atomic_write_bytes(path.with_name(FAILURES_Z), buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path, stats: dict[str, Any] | None = None) -> Failures:
        """Read failures.parquet at ``path`` and the latents beside it; ``stats``: the identify stage's counts (in
        a run directory, its metrics in manifest.json)."""
        path = Path(path)
        for file in (path, path.with_name(FAILURES_Z)):
            if not file.exists():
                raise FileNotFoundError(f"{file} is missing: run `defuse identify` first.")
        import pandas as pd

        table = pd.read_parquet(path)
        z = np.load(path.with_name(FAILURES_Z), allow_pickle=False)
        if len(z) != len(table):
            raise ValueError(
                f"{path.with_name(FAILURES_Z)} holds {len(z)} latents but {path} {len(table)} rows: "
                f"they come from different runs. Re-run `defuse identify --force`."
            )
        return cls(table, z, dict(stats or {}))

# ----------------------------------------------------------------------------- distill: regions

# The formula regions.json carries beside its regions.
BUG_SCORE = ("error_rate * validity * confidence * evidence, evidence = 1 - (1 - real_error_rate) * (1 - label_doubt) "
             "(see defuse.stages.distill)")
ELLIPSOID_QUANTILE = 0.9  # "inside a region": within the 90% ellipsoid of its Gaussian
REAL_PRIOR = (0.5, 5.0)  # real_error_rate = (real_misread + 0.5) / (real_neighbours + 5)


@dataclass(frozen=True)
class Region:
    """One misclassification region: a Gaussian in latent space and what its fresh samples do."""

    id: int  # rank: each confusion pair's best region by bug score, then the rest (distill.order); 1 = the top
    source_label: int
    predicted_label: int
    pair: str  # "7 -> 1", with class names
    n_failures: int
    weight: float  # share of all failures assigned to this region
    purity: float  # share of all failures inside the fitted component's 90% ellipsoid that have its pair
    error_rate: float  # fresh samples read as predicted_label
    flip_rate: float  # fresh samples read as anything but source_label
    validity: float  # mean validity-model probability of the source class on fresh samples
    confidence: float  # mean classifier confidence on predicted_label, over misread fresh samples
    suggested_label: int  # validity model's majority class on fresh samples
    median_radius: float
    pair_median_radius: float
    source_confidence: float
    coverage: float  # share of the failing sources of its source class that fail into this region
    bug_score: float
    real_neighbours: int = 0  # held-out images of the source class nearest the region's centre
    real_misread: int = 0  # of those, read as predicted_label by the classifier
    real_distance: float = 0.0  # their median distance to the centre, standardised latent units
    real_error_rate: float = REAL_PRIOR[0] / REAL_PRIOR[1]  # (real_misread + 0.5) / (real_neighbours + 5)
    real_nearest: list[int] = field(default_factory=list)  # the nearest of them (held-out split positions), nearest first
    real_nearest_read: list[int] = field(default_factory=list)  # the class the classifier reads each of them as
    # Median standardised latent distance from the centre to the real images whose neighbourhoods the search walked
    # from into this region (its failures' sources): the region's reach among real images. Its own Gaussian
    # reaches none (a core of failures: on the planted benchmark no real image lies within even the 99% ellipsoid
    # of a top region), so the real images it covers are those within this radius (label issues, defuse.label_issues).
    source_radius: float = 0.0
    # The training labels around it (defuse.stages.distill.mixture.LabelMargins): the mean area under the margin
    # of the training images of its two classes nearest its centre, and how far below those classes' median it lies,
    # as label_doubt in [0, 1]. None where no margins were recorded (a classifier the user brought).
    label_aum: float | None = None
    label_doubt: float | None = None
    # What a person is shown of those labels: the training images labelled as its source class, of the
    # DOUBTED_POOL nearest its centre, whose labels were hardest to learn (lowest area under the margin), hardest
    # first (train split positions), and the class the classifier reads each as. Where every split carries a
    # labelling bug, these are its mislabelled images (docs/benchmarks.md). Empty without recorded margins.
    doubted_nearest: list[int] = field(default_factory=list)
    doubted_nearest_read: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list, repr=False)
    cov: list[list[float]] = field(default_factory=list, repr=False)

    def sample(self, n: int, tau: float, generator: np.random.Generator) -> np.ndarray:
        """Fresh latents from N(mean, tau * cov), (n, d)."""
        return generator.multivariate_normal(np.asarray(self.mean), tau * np.asarray(self.cov), size=n,
                                             method="cholesky").astype(np.float32)

    def contains(self, z: np.ndarray, tau: float = 1.0, quantile: float = ELLIPSOID_QUANTILE) -> np.ndarray:
        """(N,) booleans: which latents lie inside the ``quantile`` ellipsoid of N(mean, tau * cov)."""
        return inside_ellipsoid(np.asarray(z), np.asarray(self.mean), tau * np.asarray(self.cov), quantile)

    @property
    def grid(self) -> str:
        """Its picture of fresh decoded samples, relative to the run directory (distill draws it)."""
        return f"{REGIONS_DIR}/region_{self.id:02d}.png"

    @property
    def real_grid(self) -> str | None:
        """Its picture of the nearest real images, where it has any."""
        return f"{REGIONS_DIR}/region_{self.id:02d}_real.png" if self.real_nearest else None

    @property
    def doubted_grid(self) -> str | None:
        """Its picture of the hardest-learnt training images near it, where it has any."""
        return f"{REGIONS_DIR}/region_{self.id:02d}_doubted.png" if self.doubted_nearest else None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("mean")
        out.pop("cov")
        return out


@dataclass(frozen=True)
class Regions:
    """The distill stage's artifact: ranked regions, the run's class names, and counts of what was fitted."""

    regions: list[Region]
    stats: dict[str, Any]
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def metrics(self) -> dict[str, Any]:
        top = self.regions[0] if self.regions else None
        return {**self.stats, "top_region": top.pair if top else None, "top_bug_score": top.bug_score if top else None}

    def save(self, path: str | Path, classes: tuple[str, ...] | None = None) -> list[str]:
        """Write regions.json at ``path`` and each region's Gaussian in regions/region_XX.npz beside it (removing
        those of an earlier run); return the names written, relative to ``path``'s folder."""
        path = Path(path)
        folder = path.parent / REGIONS_DIR
        classes = tuple(classes if classes is not None else self.classes)
        if folder.is_dir():
            for stale in folder.glob("region_*.npz"):
                stale.unlink()
        written = [path.name]
        for region in self.regions:
            name = f"{REGIONS_DIR}/region_{region.id:02d}.npz"
            buffer = io.BytesIO()
            np.savez(buffer, mean=np.asarray(region.mean), cov=np.asarray(region.cov))
            atomic_write_bytes(path.parent / name, buffer.getvalue())
            written.append(name)
        atomic_write_json(path, {
            "bug_score": BUG_SCORE,
            "classes": list(classes),
            "stats": self.stats,
            "regions": [{**r.summary(), "params": f"{REGIONS_DIR}/region_{r.id:02d}.npz", "grid": r.grid,
                         "real_grid": r.real_grid, "doubted_grid": r.doubted_grid} for r in self.regions],
        })
        return written

    @classmethod
    def load(cls, path: str | Path) -> Regions:
        """Read regions.json at ``path`` and the Gaussians it names (relative to its folder)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `defuse distill` first.")
        data = json.loads(path.read_text())
        regions = []
        for entry in data["regions"]:
            with np.load(path.parent / entry["params"], allow_pickle=False) as f:
                mean, cov = f["mean"].tolist(), f["cov"].tolist()
            fields = {k: v for k, v in entry.items() if k in Region.__dataclass_fields__}
            regions.append(Region(**{**fields, "mean": mean, "cov": cov}))
        return cls(regions, data.get("stats", {}), tuple(data.get("classes", ())))


def inside_ellipsoid(z: np.ndarray, mean: np.ndarray, cov: np.ndarray, quantile: float = ELLIPSOID_QUANTILE) -> np.ndarray:
    """(N,) booleans: squared Mahalanobis distance to ``mean`` under ``cov`` within the chi-square ``quantile``."""
    if len(z) == 0:
        return np.zeros(0, dtype=bool)
    from scipy.stats import chi2

    diff = z - mean
    m2 = ((diff @ np.linalg.inv(cov)) * diff).sum(axis=1)  # a BLAS product: 10x a three-operand einsum
    return m2 <= chi2.ppf(quantile, df=z.shape[1])

# ----------------------------------------------------------------------------- label: the person's answers

NOT_A_BUG = "not-a-bug"
SKIP = "skip"
SOURCES = ("prompt", "file", "auto")
Label = Union[int, str]  # a class index, NOT_A_BUG or SKIP


@dataclass(frozen=True)
class Answer:
    """One region's label.

    Args:
        region: the region id (as in regions.json).
        label: a class index, ``"not-a-bug"`` or ``"skip"``.
        source: ``"prompt"``, ``"file"`` or ``"auto"``.
        time: when it was given, ISO 8601 (UTC).
        reason: why, for an automatic answer (the evidence it rests on); None for a person's.
    """

    region: int
    label: Label
    source: str
    time: str
    reason: str | None = None

    @property
    def is_bug(self) -> bool:
        """True when the label is a class (a bug to repair)."""
        return isinstance(self.label, int)

    def to_record(self) -> dict[str, Any]:
        record = {"region": self.region, "label": self.label, "source": self.source, "time": self.time}
        if self.reason is not None:
            record["reason"] = self.reason
        return record


# ----------------------------------------------------------------------------- the book


class LabelBook:
    """An append-only ``labels.jsonl``: answers and undos, one JSON line each.

    Answer line: ``{"region": 3, "label": 7 | "not-a-bug" | "skip", "source": "prompt", "time": "..."}``;
    undo line: ``{"region": 3, "undo": true, "time": "..."}``. Replaying the file in order gives the
    answers: a later line overrides an earlier one, an undo removes the region's answer.

    Args:
        path: the ``labels.jsonl`` file; created (with its folder) on the first answer.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def record(self, region: int, label: Label, source: str) -> Answer:
        """Append one answer now (flushed and fsynced before this returns) and return it."""
        answer = Answer(_check_region_id(region), _check_label(label), _check_source(source), answer_time())
        self.add(answer)
        return answer

    def add(self, answer: Answer) -> None:
        """Append an existing :class:`Answer` (its time is kept)."""
        _check_region_id(answer.region)
        _check_label(answer.label)
        _check_source(answer.source)
        self._append(answer.to_record())

    def undo(self, region: int) -> None:
        """Append an undo line: the region has no answer any more."""
        self._append({"region": _check_region_id(region), "undo": True, "time": answer_time()})

    def answers(self) -> dict[int, Answer]:
        """The standing answer of every answered region, by region id."""
        return self._replay()[0]

    def bug_labels(self) -> dict[int, int]:
        """Region id -> class, for the regions whose standing answer is a class (the bugs to repair)."""
        return {region: int(answer.label) for region, answer in self.answers().items() if answer.is_bug}

    def last_answered(self) -> int | None:
        """The region whose standing answer was given last (what ``u`` undoes), or None."""
        order = self._replay()[1]
        return order[-1] if order else None

    # ------------------------------------------------------------ internals
    def _replay(self) -> tuple[dict[int, Answer], list[int]]:
        answers: dict[int, Answer] = {}
        order: list[int] = []  # answered regions, oldest answer first
        for entry in self._entries():
            region = entry if isinstance(entry, int) else entry.region
            if region in order:
                order.remove(region)
            if isinstance(entry, int):  # an undo
                answers.pop(region, None)
            else:
                answers[region] = entry
                order.append(region)
        return answers, order

    def _entries(self) -> list[Answer | int]:
        """Parsed lines in order (an int is an undo of that region); a torn last line is left out."""
        if not self.path.exists():
            return []
        *complete, tail = self.path.read_bytes().split(b"\n")
        entries = []
        for number, raw in enumerate(complete, start=1):
            if raw.strip():
                try:
                    entries.append(_parse_line(raw))
                except ValueError as err:
                    raise ValueError(
                        f"Line {number} of {self.path} must be a label record like "
                        f'{{"region": 1, "label": 7, "source": "prompt", "time": "..."}}, got {_shorten(raw)} '
                        f"instead ({err}). Fix or delete that line; the other answers are kept."
                    ) from None
        if tail.strip():  # no newline at the end: the process was killed while writing it
            try:
                entries.append(_parse_line(tail))
            except ValueError:
                pass
        return entries

    def _append(self, entry: dict[str, Any]) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            _repair_tail(handle)
            handle.write((json.dumps(entry) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            _fsync_directory(self.path.parent)


def _repair_tail(handle) -> None:
    """Before appending: complete or cut a last line a killed process left without its newline."""
    handle.seek(0, os.SEEK_END)
    if handle.tell() == 0:
        return
    handle.seek(0)
    data = handle.read()
    if data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        _parse_line(data[start:])
    except ValueError:
        handle.truncate(start)  # a torn line: never a given answer, and it would corrupt the next one
    else:
        handle.write(b"\n")  # a whole record that only missed its newline
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_directory(folder: Path) -> None:
    """Make a new file's directory entry durable too (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_line(raw: bytes) -> Answer | int:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    region = entry.get("region")
    if not _is_int(region):
        raise ValueError("'region' must be an integer")
    if not isinstance(entry.get("time"), str):
        raise ValueError("'time' must be a string")
    if entry.get("undo") is True:
        return int(region)
    label, source = entry.get("label"), entry.get("source")
    if not (_is_int(label) and label >= 0 or label in (NOT_A_BUG, SKIP)):
        raise ValueError(f"'label' must be a class index, {NOT_A_BUG!r} or {SKIP!r}")
    if source not in SOURCES:
        raise ValueError(f"'source' must be one of {', '.join(SOURCES)}")
    reason = entry.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ValueError("'reason' must be a string")
    return Answer(int(region), label, source, entry["time"], reason)


def parse_label(value: Any, classes: Sequence[str]) -> Label | None:
    """A class index, a class name (exact, then case-insensitive, before an index), not-a-bug or skip; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(classes) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.lower() in (NOT_A_BUG, SKIP):
        return text.lower()
    if text in classes:
        return list(classes).index(text)
    folded = [name.lower() for name in classes]
    if text.lower() in folded:
        return folded.index(text.lower())
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    return None


def _check_region_id(region: Any) -> int:
    if not _is_int(region):
        raise ValueError(f"`region` must be an int region id, got {region!r} instead.")
    return int(region)


def _check_label(label: Any) -> Label:
    if not (_is_int(label) and label >= 0 or label in (NOT_A_BUG, SKIP)):
        raise ValueError(f"`label` must be a class index >= 0, {NOT_A_BUG!r} or {SKIP!r}, got {label!r} instead.")
    return label


def _check_source(source: Any) -> str:
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {', '.join(SOURCES)}, got {source!r} instead.")
    return source


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shorten(raw: bytes, limit: int = 80) -> str:
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def answer_time() -> str:
    """Now, as an answer's time stamp: ISO 8601, UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

# ----------------------------------------------------------------------------- verify


class AccuracyChange(TypedDict, total=False):
    """Accuracy before/after a repair on the same images, with paired 95% bootstrap intervals (``after``, the
    intervals and ``change`` are None where only the original is measured)."""

    before: float
    after: float | None
    change: float | None
    before_ci95: list[float] | None
    after_ci95: list[float] | None
    change_ci95: list[float] | None
    n: int | None


class ClassAccuracy(TypedDict):
    before: float
    after: float
    n: int


class RegionVerification(TypedDict, total=False):
    """One region, graded on the test split: fresh samples read as the person's label (labelled regions), its
    nearest real test images of its source class, and the failures the test-split searches found inside it."""

    id: int
    pair: str
    label: int | None
    accuracy_before: float
    accuracy_after: float
    real_n: int
    real_accuracy_before: float
    real_accuracy_after: float
    failures_before: int
    failures_after: int


class Rediscovery(TypedDict):
    regions_before: int
    regions_after: int
    failures_before: int
    failures_after: int


class VerifyResult(TypedDict, total=False):
    """verify.json."""

    clean_accuracy: AccuracyChange
    per_class_accuracy: dict[str, ClassAccuracy]
    regions: list[RegionVerification]
    rediscovery: Rediscovery
    failures_by_pair: dict[str, dict[str, int]]  # "7 -> 1" -> failures/valid/sources _before/_after
    search_queries: dict[str, int]  # before, after
    search: str  # why the test-split searches were not run (the original weights kept)


@dataclass(frozen=True)
class Verification:
    """The verify stage's artifact, verify.json: ``clean_accuracy`` (before/after with intervals),
    ``per_class_accuracy``, ``regions`` (accuracy on fresh samples and failures re-found, per region),
    ``rediscovery`` (totals over the labelled regions) and ``failures_by_pair`` (the test-split searches)."""

    result: VerifyResult

    def save(self, path: str | Path) -> None:
        atomic_write_json(Path(path), self.result)

    @classmethod
    def load(cls, path: str | Path) -> Verification:
        return cls(json.loads(Path(path).read_text()))

    @property
    def metrics(self) -> dict[str, Any]:
        clean = self.result["clean_accuracy"]
        return {"test_n": clean.get("n"), "clean_accuracy_before": clean["before"],
                "clean_accuracy_after": clean["after"], "clean_change_ci95": clean["change_ci95"],
                **{f"rediscovery_{k}": v for k, v in self.result.get("rediscovery", {}).items()}}


# ----------------------------------------------------------------------------- correct


class CandidateRecord(TypedDict, total=False):
    """One fine-tune candidate as correct's summary lists it (the figures the report explains a refusal with)."""

    layers: str
    epoch: int
    decoded_accuracy: float | None
    admissible: bool
    guard_change_ci95: list[float]
    largest_class_drop: float


class RepairSummary(TypedDict, total=False):
    """What correct did (:attr:`defuse.stages.correct.stage.Repair.summary`, its metrics in manifest.json): the
    labelled regions, the label issues, every candidate, the choice or why the original was kept."""

    labelled_regions: int
    chosen: Any  # the chosen candidate's settings, a name, or None when the original weights were kept
    reason: str
    chosen_on: str
    candidates: list[CandidateRecord]
    moved_for_review: int
    label_issues: int
    label_issues_of_labelling_bugs: int
    reviewed_labels: int
    reviewed_relabelled: int
    relabelled: int
    relabelled_training_images: int
    guard_images: int
    guard: Any
    real_bug_images: int
    real_bug_accuracy_before: float
    real_bug_accuracy_after: float
    val_region_accuracy_before: float
    val_region_accuracy_after: float


# ----------------------------------------------------------------------------- check-before, check-after


class Interval(TypedDict):
    """A mean over images with its 95% bootstrap interval (:class:`defuse.stats.Estimate` as JSON)."""

    mean: float
    low: float
    high: float


class TransformCheck(TypedDict, total=False):
    """One transform's Effective Invariance figures (:class:`defuse.invariance.ei.TransformEI` as JSON)."""

    transform: str
    applicable: bool
    images: int
    ei: Interval | None
    agreement: Interval | None
    confidence: Interval | None
    accuracy: Interval | None
    per_class: dict[str, dict[str, Interval | None]]


class EIChangeRecord(TypedDict):
    transform: str
    change: Interval
    regression: bool


class FamilyCheck(TypedDict, total=False):
    """One ML4ML variance family: its grid, matrices (file names), features and the assessor's verdict."""

    grid: list[float]
    counts: dict[str, int]
    mean: float
    features: dict[str, float]
    verdict: str | None
    probability_invariant: float
    assessor: str
    matrices: dict[str, str]
    heatmap: str


class DriftParameter(TypedDict, total=False):
    """One acquisition parameter's bounds, sensitivity and tolerated range (tolerance_* None where the identity is
    the bound)."""

    identity: float
    low: float
    high: float
    unit: str
    sensitivity: float | None
    sensitivity_per_range: float | None
    differentiable: bool
    tolerance_low: float | None
    tolerance_high: float | None
    accuracy_at_tolerance_low: float
    accuracy_at_tolerance_high: float
    reaches_bound_low: bool
    reaches_bound_high: bool


class DriftCheck(TypedDict, total=False):
    clean_accuracy: float
    max_drop: float
    images: int
    parameters: dict[str, DriftParameter]
    worst_direction: dict[str, Any] | None  # the steepest combined direction (defuse.drift.forensics)
    tolerance_file: str
    presets_strip: str | None


class CheckResult(TypedDict, total=False):
    """checks/<name>.json (``enabled`` False and nothing else when ``check.enabled`` is off)."""

    model: str
    enabled: bool
    images: int
    seconds: float
    ei: dict[str, TransformCheck]
    variance: dict[str, FamilyCheck]
    ei_change: dict[str, EIChangeRecord | None]
    variance_mean_change: dict[str, float]
    drift: DriftCheck


# ----------------------------------------------------------------------------- report: report.json


class ReportRegion(TypedDict):
    """One region as the report shows it: what distill found, the person's label, what verify measured."""

    id: int
    pair: str
    source_class: str
    predicted_class: str
    label: str | None  # a class name, not-a-bug, skip, or None (no answer)
    label_is_class: bool
    label_source: str | None
    label_reason: str | None
    bug_score: float
    weight: float
    n_failures: int
    error_rate: float
    validity: float
    confidence: float
    purity: float
    real_neighbours: int
    real_misread: int
    real_distance: float | None
    real_nearest_read: list[str]
    doubted_nearest_read: list[str]
    label_aum: float | None
    label_doubt: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    real_test_images: int | None
    real_accuracy_before: float | None
    real_accuracy_after: float | None
    failures_before: int | None
    failures_after: int | None
    repaired: bool | None  # None: not labelled a bug, or not verified yet
    not_repaired_reason: str | None
    grid: str | None
    real_grid: str | None
    doubted_grid: str | None


class ReportSummary(TypedDict):
    regions_found: int
    regions_labelled: int
    regions_labelled_bug: int
    regions_repaired: int
    regions_not_repaired: list[int]
    repair_admitted: bool | None


class Regression(TypedDict):
    kind: str  # clean_accuracy, class, ei
    what: str
    detail: str


class EIEntry(TypedDict, total=False):
    applicable: bool
    before: float | None
    after: float | None
    before_ci95: list[float]
    after_ci95: list[float]
    accuracy_before: float | None
    accuracy_after: float | None
    change: float
    change_ci95: list[float]
    regression: bool


class VarianceEntry(TypedDict):
    mean_before: float | None
    mean_after: float | None
    verdict_before: str | None
    verdict_after: str | None
    p_invariant_before: float | None
    p_invariant_after: float | None
    heatmap_before: str | None
    heatmap_after: str | None


class Tolerance(TypedDict):
    low: float | None
    high: float | None


class DriftEntry(TypedDict):
    identity: float
    bounds: list[float]
    unit: str
    tolerance_before: Tolerance
    tolerance_after: Tolerance | None
    sensitivity_before: float | None
    sensitivity_after: float | None


class ClassChange(TypedDict):
    before: float
    after: float | None
    change: float | None
    n: int | None


class DriftSummary(TypedDict, total=False):
    max_drop: float
    worst_direction_before: dict[str, Any] | None  # the steepest combined direction (defuse.drift.forensics)
    worst_direction_after: dict[str, Any] | None
    presets_strip: str | None
    worst_case_before: dict[str, Any]  # `defuse drift optimize`'s worst case, where it was run
    worst_case_after: dict[str, Any]


class DiscoverySummary(TypedDict):
    failures: int | None
    queries: int | None
    bug_score: str | None  # the formula


class ReportMetadata(TypedDict):
    run_dir: str
    created: str | None
    seed: int | None
    config: dict[str, Any] | None  # the run's config as manifest.json records it (RunConfig.to_dict)
    versions: dict[str, str] | None
    split_sizes: dict[str, int] | None
    classes: list[str]


class ReportData(TypedDict):
    """report.json: every figure of the report, under the keys docs/report.md documents."""

    status: str  # complete, discovery only, awaiting labels
    status_detail: str
    summary: ReportSummary
    clean_accuracy: AccuracyChange | None
    regions: list[ReportRegion]
    rediscovery: Rediscovery | None
    ei: dict[str, EIEntry]
    variance: dict[str, VarianceEntry]
    drift: dict[str, DriftEntry]
    drift_summary: DriftSummary
    per_class_accuracy: dict[str, ClassChange]
    repair: RepairSummary | None
    regressions: list[Regression]
    bounds: dict[str, float]
    discovery: DiscoverySummary
    timings: dict[str, float | None]
    stages: dict[str, str | None]
    metadata: ReportMetadata
