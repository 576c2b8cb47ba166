"""The stages, one room each, in the order ``defuse run`` runs them:

========================  ====================================================================
``fit_classifier/``       train the classifier under test (or adopt the user's): classifier.ckpt
``fit_generator/``        train the VAE on the images: generator.ckpt
``identify/``             fit the validity judge, search the latent space: failures, validity.npz
``distill/``              group the failures into ranked regions: regions.json, pictures
``check_before.py``       invariance checks of the original classifier: checks/before*
``label/``                one label per region from a person, a file or ``--labels auto``: labels.jsonl
``correct/``              fine-tune on the person's labels: repaired.ckpt, label_issues.csv
``verify/``               before/after on the test split and fresh region samples: verify.json
``check_after.py``        the same checks of the repaired classifier: checks/after*
``report/``               the before/after report: report/index.html, report.json, report.md
========================  ====================================================================

and the commands that are not stages of the run: ``review.py`` (``defuse review``), ``check.py`` (``defuse check
--model``), ``drift.py`` (``defuse drift``).

Each module (or package ``__init__``) declares its :class:`Stage` beside its adapter, the function that loads the
stage's input artifacts, calls the stage's one public function and saves what it returns. Declarations import
nothing heavy (the CLI's ``--help`` and the stage table cost no torch import); the adapters import their stage's
logic when they run. Stages read each other's artifacts through :mod:`defuse.records`, never each other's code:
what two stages share lives below them (:mod:`defuse.search`, :mod:`defuse.regions`, :mod:`defuse.label_issues`,
:mod:`defuse.models`, ...). :mod:`defuse.pipeline` is the runner and the list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


@dataclass(frozen=True)
class Stage:
    """One stage of the run: what ``defuse run`` and ``defuse <name>`` call, and what decides when to skip it."""

    name: str  # the CLI subcommand
    run: Callable[[RunConfig, RunDir], dict[str, Any]]  # the adapter: artifacts in, artifacts out, metrics back
    outputs: tuple[str, ...]  # file names, or glob patterns for a variable number of files
    sections: tuple[str, ...]  # config sections the stage reads
    inputs: tuple[str, ...] = ()  # artifacts of earlier stages it reads
    always: bool = False  # never skipped (labelling resumes where the person stopped)


__all__ = ["Stage"]
