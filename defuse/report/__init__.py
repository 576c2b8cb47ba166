"""The before/after repair report: report/index.html, report/report.json and report/report.md (see build.py)."""

from defuse.report.build import Report, build_report, find_regressions, markdown_escape

__all__ = ["Report", "build_report", "find_regressions", "markdown_escape"]
