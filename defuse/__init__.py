"""defuse: find, explain and repair the bugs of image classifiers.

The public API; everything else is private to its module.
"""

import importlib
from typing import Any

# Names -> the module that defines them. Imported on first use (PEP 562), so `import defuse` and the CLI's --help
# do not pay for torch and Lightning (seconds) before they are needed.
_EXPORTS = {
    "RunConfig": "defuse.config", "config_from_mapping": "defuse.config", "load_config": "defuse.config",
    "Repair": "defuse.stages.correct.stage", "repair": "defuse.stages.correct.stage",
    "ImageDataModule": "defuse.data", "ImageSet": "defuse.data", "load_source": "defuse.data",
    "RealEvidence": "defuse.stages.distill.mixture", "Regions": "defuse.records",
    "distill": "defuse.stages.distill.mixture",
    "fit_classifier": "defuse.stages.fit_classifier.fit", "fit_generator": "defuse.stages.fit_generator.fit",
    "Discovery": "defuse.stages.identify.discover", "Failures": "defuse.records",
    "discover": "defuse.stages.identify.discover",
    "LabelBook": "defuse.records", "auto_labels": "defuse.stages.label.labelling",
    "label_stage": "defuse.stages.label.labelling",
    "ClassifierModule": "defuse.models", "ConvVAE": "defuse.models", "Generator": "defuse.models",
    "VAEModule": "defuse.models", "load_classifier": "defuse.models", "load_generator": "defuse.models",
    "predict_labels": "defuse.models",
    "run_pipeline": "defuse.pipeline", "run_stage": "defuse.pipeline",
    "RunDir": "defuse.rundir",
    "InvarianceMonitor": "defuse.callbacks", "DefuseCallback": "defuse.callbacks",
    "scan": "defuse.scanner", "ScanResult": "defuse.scanner",
    "InvarianceCheck": "defuse.invariance.check", "check_invariance": "defuse.invariance.check",
    "effective_invariance": "defuse.invariance.ei", "variance_matrix": "defuse.invariance.variance",
    "ValidityModel": "defuse.validity",
    "Verification": "defuse.records", "verify": "defuse.stages.verify.compare",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'defuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


from defuse.version import __version__  # noqa: E402  (after the lazy table, as before)

__all__ = sorted(_EXPORTS)
