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
- :class:`Verification` (verify): verify.json.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from defuse.artifacts import FAILURES_Z, REGIONS_DIR
from defuse.rundir import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

# ----------------------------------------------------------------------------- identify: failures


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

# The text regions.json has always carried (the module is defuse.stages.distill now): kept, so that a run's
# regions.json stays byte-identical across the move.
BUG_SCORE = "error_rate * validity * confidence * real_error_rate (see defuse.distill)"
ELLIPSOID_QUANTILE = 0.9  # "inside a region": within the 90% ellipsoid of its Gaussian
REAL_PRIOR = (0.5, 5.0)  # real_error_rate = (real_misread + 0.5) / (real_neighbours + 5)


@dataclass(frozen=True)
class Region:
    """One misclassification region: a Gaussian in latent space and what its fresh samples do."""

    id: int  # rank by bug score, 1 = most likely a real bug
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
    mean: list[float] = field(default_factory=list, repr=False)
    cov: list[list[float]] = field(default_factory=list, repr=False)

    def sample(self, n: int, tau: float, generator: np.random.Generator) -> np.ndarray:
        """Fresh latents from N(mean, tau * cov), (n, d)."""
        return generator.multivariate_normal(np.asarray(self.mean), tau * np.asarray(self.cov), size=n,
                                             method="cholesky").astype(np.float32)

    def contains(self, z: np.ndarray, tau: float = 1.0, quantile: float = ELLIPSOID_QUANTILE) -> np.ndarray:
        """(N,) booleans: which latents lie inside the ``quantile`` ellipsoid of N(mean, tau * cov)."""
        return inside_ellipsoid(np.asarray(z), np.asarray(self.mean), tau * np.asarray(self.cov), quantile)

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
            "regions": [{**r.summary(), "params": f"{REGIONS_DIR}/region_{r.id:02d}.npz",
                         "grid": f"{REGIONS_DIR}/region_{r.id:02d}.png",
                         "real_grid": f"{REGIONS_DIR}/region_{r.id:02d}_real.png" if r.real_nearest else None}
                        for r in self.regions],
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


@dataclass(frozen=True)
class Verification:
    """The verify stage's artifact, verify.json: ``clean_accuracy`` (before/after with intervals),
    ``per_class_accuracy``, ``regions`` (accuracy on fresh samples and failures re-found, per region),
    ``rediscovery`` (totals over the labelled regions) and ``failures_by_pair`` (the test-split searches)."""

    result: dict[str, Any]

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
