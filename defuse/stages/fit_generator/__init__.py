"""fit-generator: train the VAE on the images (or adopt ``generator.checkpoint``) and write generator.ckpt
(:mod:`.fit`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import GENERATOR_CKPT
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def fit_generator_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Train the VAE on the images (or adopt generator.checkpoint); write generator.ckpt."""
    from defuse.stages.fit_generator.fit import fit_generator

    return fit_generator(config, run)


STAGE = Stage("fit-generator", fit_generator_stage, (GENERATOR_CKPT,), ("data", "generator", "trainer"))
