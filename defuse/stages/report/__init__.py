"""report: render what the stages wrote as report/index.html, report/report.json and report/report.md (no model is
run; :mod:`.build`, templates in templates/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defuse.artifacts import REPORT_HTML, REPORT_JSON, REPORT_MD
from defuse.stages import Stage

if TYPE_CHECKING:
    from defuse.config import RunConfig
    from defuse.rundir import RunDir


def report_stage(config: RunConfig, run: RunDir) -> dict[str, Any]:
    """Render what the stages wrote as report/index.html, report.json and report.md (no model is run)."""
    from defuse.stages.report.build import build_report

    report = build_report(run, config.report)
    report.save(run.path(REPORT_JSON).parent)
    return report.metrics


# Always re-rendered (a second or two): it reads whatever the stages before it left, including a run that stopped
# for labels, whose report says so.
STAGE = Stage("report", report_stage, (REPORT_HTML, REPORT_JSON, REPORT_MD), ("report",), always=True)
