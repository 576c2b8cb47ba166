"""Fitted models shared between run directories: a classifier or generator that a stage trained is kept under a key
of everything it depends on, so another run on the same data and settings adopts it instead of training again.

Trying a search setting in a new run directory, or running the same config on another branch of an experiment,
should not pay the training again (a minute on digits, hours on a large set). The key is the stage's fingerprint
(its config sections, the contents of the files they name, its inputs; see :func:`defuse.pipeline.stage_fingerprint`)
and the versions of Python, defuse, torch, torchvision, Lightning, numpy and scikit-learn (a new version may train
differently). Training is deterministic on CPU for a seed (``trainer.deterministic``), so the adopted file is the
file the stage would have written; the run's manifest says where it came from.

Where: ``$DEFUSE_CACHE``, default ``~/.cache/defuse``. ``DEFUSE_CACHE=off``, ``--no-cache`` or ``trainer.cache:
false`` turn it off; ``--force STAGE`` trains again (and replaces the entry). An entry is written whole or not at
all (a temporary folder renamed into place), so an interrupted run leaves no half entry behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from defuse.rundir import RunDir, fingerprint, package_versions

CACHED_STAGES = ("fit-classifier", "fit-generator")  # the stages that train; the rest are quick or read labels
RECORD = "record.json"


def cache_root() -> Path | None:
    """The cache folder, or None when ``DEFUSE_CACHE`` is ``off``."""
    setting = os.environ.get("DEFUSE_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    return Path(setting).expanduser() if setting else Path.home() / ".cache" / "defuse"


def entry_path(stage: str, stage_fingerprint: str) -> Path | None:
    """Where stage ``stage`` with this fingerprint is kept (whether or not it is there); None with the cache off."""
    root = cache_root()
    if root is None:
        return None
    key = fingerprint({"stage": stage, "fingerprint": stage_fingerprint, "versions": package_versions()})
    return root / "stages" / stage / key


def lookup(stage: str, stage_fingerprint: str, outputs: tuple[str, ...] = ()) -> Path | None:
    """The complete entry for this stage and fingerprint, or None. ``outputs``: the stage's output names today; an
    entry kept by an older defuse that lacks one of them (glob patterns aside: optional pictures) is not adopted, so
    the stage runs and writes them all."""
    entry = entry_path(stage, stage_fingerprint)
    if entry is None or not (entry / RECORD).is_file():
        return None
    kept = set(json.loads((entry / RECORD).read_text())["outputs"])
    required = [name for name in outputs if not any(ch in name for ch in "*?[")]
    return entry if kept.issuperset(required) else None


def restore(entry: Path, run: RunDir) -> dict[str, Any]:
    """Copy an entry's files into ``run``; returns the metrics the stage recorded when it trained them."""
    record = json.loads((entry / RECORD).read_text())
    for name in record["outputs"]:
        target = run.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry / name, target)
    return {**record["metrics"], "restored_from": str(entry)}


def store(stage: str, stage_fingerprint: str, run: RunDir, outputs: list[str], metrics: dict[str, Any]) -> None:
    """Keep a finished stage's ``outputs`` (names in ``run``) and ``metrics``; a failure to write only warns."""
    entry = entry_path(stage, stage_fingerprint)
    if entry is None:
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
        for name in outputs:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run.path(name), staging / name)
        (staging / RECORD).write_text(json.dumps({"stage": stage, "outputs": outputs, "metrics": metrics}, indent=1))
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
    except OSError as error:  # a full disk or a read-only home: the run itself is complete, so say so and go on
        import logging

        logging.getLogger(__name__).warning("Could not keep %s's outputs in the cache %s (%s); the run is complete. "
                                            "DEFUSE_CACHE=off turns the cache off.", stage, entry.parent, error)


__all__ = ["CACHED_STAGES", "cache_root", "entry_path", "lookup", "restore", "store"]
