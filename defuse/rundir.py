"""The run directory: artifact paths, ``manifest.json``, atomic writes and stage skipping.

Every stage writes its artifacts here and records, in ``manifest.json``, its status,
time, metrics, the sha256 of each output, and a *fingerprint* of what it depended on
(its config sections, the seed and the hashes of its input artifacts). A stage whose
outputs still exist and whose fingerprint is unchanged is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from defuse.artifacts import MANIFEST

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once (setting is the only way to read it), then restored
_TRACKED_PACKAGES = ("defuse", "torch", "torchvision", "pytorch-lightning", "numpy", "scikit-learn", "umap-learn")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make a shared run directory unreadable to the team
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_digest(path: str | Path) -> str:
    """What a user's file or folder holds, as a digest: a file's sha256; a folder's listing of (relative path,
    size, modification time), which notices edits without reading every image; "missing" if nothing is there."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return fingerprint(listing)
    return "missing"


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=_jsonable).encode()).hexdigest()


def defuse_version() -> str:
    """The running defuse's version, recorded with each finished stage (see ``pipeline.run_stage``)."""
    from defuse.version import __version__

    return __version__


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class StageRecord:
    """What one stage run leaves in the manifest."""

    fingerprint: str
    outputs: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """A run directory and its manifest.

    Args:
        root: the directory; created on first write.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    # ---------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.manifest_path} is not valid JSON ({err}). Delete it to rebuild every stage."
            ) from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.manifest().get("stages", {}).get(name)

    def metrics(self, name: str) -> dict[str, Any]:
        record = self.stage(name)
        return dict(record.get("metrics", {})) if record else {}

    def artifact_hash(self, name: str) -> str:
        """sha256 of an artifact, as the manifest recorded it (or computed now)."""
        for record in self.manifest().get("stages", {}).values():
            if name in record.get("outputs", {}):
                return record["outputs"][name]
        path = self.path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first.")
        return sha256_file(path)

    def changed_outputs(self, name: str) -> list[str]:
        """The outputs of stage ``name`` (done) that are missing or no longer hash to what it recorded."""
        record = self.stage(name)
        if not record or record.get("status") != "done":
            return []
        return [file for file, digest in record.get("outputs", {}).items()
                if not self.path(file).exists() or sha256_file(self.path(file)) != digest]

    def is_current(self, name: str, stage_fingerprint: str) -> bool:
        """True when ``name`` completed with this fingerprint and all its outputs still match their hashes."""
        record = self.stage(name)
        if not record or record.get("status") != "done" or record.get("fingerprint") != stage_fingerprint:
            return False
        return not self.changed_outputs(name)

    def record(self, name: str, status: str, config: dict[str, Any], seed: int, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.setdefault("created", _now())
        manifest["updated"] = _now()
        manifest["config"] = config
        manifest["seed"] = seed
        manifest["versions"] = package_versions()
        stages = manifest.setdefault("stages", {})
        entry = {"status": status, "finished" if status == "done" else "at": _now(), **fields}
        stages[name] = entry
        self.write_manifest(manifest)

    @contextmanager
    def running(self, name: str, config: dict[str, Any], seed: int, stage_fingerprint: str) -> Iterator[StageRecord]:
        """Record a stage as running, then as done (with outputs hashed) or as failed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.record(name, "running", config, seed, fingerprint=stage_fingerprint)
        record = StageRecord(fingerprint=stage_fingerprint)
        start = time.perf_counter()
        try:
            yield record
            if CTRL_C.is_set():  # pressed while the stage ran, and dropped where Python ignores exceptions
                raise KeyboardInterrupt
        except BaseException as err:
            # Lightning turns Ctrl-C inside a Trainer into SystemExit(1) after its graceful shutdown.
            status = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
            self.record(
                name, status, config, seed, fingerprint=stage_fingerprint,
                seconds=round(time.perf_counter() - start, 3), error=f"{type(err).__name__}: {err}",
            )
            raise
        outputs = {file: sha256_file(self.path(file)) for file in record.outputs}
        self.record(
            name, "done", config, seed, fingerprint=stage_fingerprint,
            seconds=round(time.perf_counter() - start, 3), outputs=outputs, metrics=record.metrics,
            defuse=defuse_version(),
        )


# Set by :func:`ctrl_c_latch`'s handler. Python drops a KeyboardInterrupt raised inside a finaliser (a ``__del__``,
# e.g. Lightning's profiler's, prints "Exception ignored" and goes on), so a Ctrl-C can be lost while the stage runs
# on to the end (seen in the interrupt test: the run finished with exit code 0). A stage that ends with the latch set
# is recorded as interrupted instead of done.
CTRL_C = threading.Event()


@contextmanager
def ctrl_c_latch() -> Iterator[None]:
    """While inside, Ctrl-C (SIGINT) sets :data:`CTRL_C` and raises KeyboardInterrupt as usual (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pressed(signum, frame):
        CTRL_C.set()
        signal.default_int_handler(signum, frame)

    CTRL_C.clear()
    previous = signal.signal(signal.SIGINT, pressed)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        CTRL_C.clear()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
