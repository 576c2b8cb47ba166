"""label: one label per region from a person at the prompt, a labels file, or the conservative suggestions on
request (``--labels auto``); answers in labels.jsonl (:mod:`.labelling`, :class:`defuse.records.LabelBook`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import CLASSIFIER_CKPT, GENERATOR_CKPT, LABELS_FILE, REGIONS_JSON
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def labelling_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """One label per region from a person (prompt), a labels file, or the conservative suggestions (auto)."""
    from defuse.models.loading import load_classifier, load_generator
    from defuse.records import Regions
    from defuse.regions import region_grids
    from defuse.stages.label.labelling import label_stage

    regions = Regions.load(run.path(REGIONS_JSON))
    return label_stage(
        run, regions, regions.classes, config.label.mode, regions_sha256=run.artifact_hash(REGIONS_JSON),
        min_real_misread=config.label.auto_min_real_misread,
        previews=lambda: region_grids(regions, load_generator(run.path(GENERATOR_CKPT)), config.distill.tau,
                                      config.seed, load_classifier(run.path(CLASSIFIER_CKPT)).model),
    )


STAGE = Stage("label", labelling_stage, (LABELS_FILE,), ("label",), (REGIONS_JSON,), always=True)
