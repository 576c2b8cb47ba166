"""The report stage: what the run found, what a person said, what the repair changed and what it did not break.

The report only renders what the stages wrote (regions.json and its pictures, labels.jsonl, verify.json,
checks/*.json and their heat maps, manifest.json): it computes no model output, so this module never imports torch
(a test holds it to that) and a report can be rebuilt from a copied run directory anywhere.

``report.json`` holds every figure under the keys docs/report.md documents (DESIGN.md's stable keys plus a few more);
its content depends only on the run's artifacts, so two runs with one seed give the same file apart from
``timings`` and ``metadata.run_dir``/``metadata.created``. ``index.html`` embeds its images (data: URLs) and
loads nothing from outside, so it opens offline from a file: URL; ``report.md`` is the short form for a pull
request. HTML goes through jinja2 with autoescaping, Markdown through :func:`markdown_escape`: class names and
labels are user text.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    AWAITING_LABELS,
    CHECK_AFTER,
    CHECK_BEFORE,
    CHECKS_DIR,
    LABELS_FILE,
    REGIONS_JSON,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    STAGE_NAMES,
    UMAP_PNG,
    VERIFY_JSON,
)
from defuse.config import ReportConfig
from defuse.records import BUG_SCORE, WEAK_RECONSTRUCTION, Region, Regions, least_drawn
from defuse.rundir import RunDir, atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from defuse.records import (
        AccuracyChange,
        Answer,
        CheckResult,
        ClassChange,
        DriftEntry,
        DriftSummary,
        EIEntry,
        RegionVerification,
        Regression,
        RepairSummary,
        ReportData,
        ReportRegion,
        VarianceEntry,
        VerifyResult,
    )

# A stage's figures as manifest.json records them (free-form per stage; the records the report reads are typed).
Metrics = Mapping[str, Any]

TEMPLATES = Path(__file__).parent / "templates"
EI_REGRESSION = 0.01  # check-after's rule for an EI regression (defuse.invariance.check), repeated in the text
COMPLETE, DISCOVERY_ONLY = "complete", "discovery only"
# A region labelled a bug counts as repaired when the repaired classifier reads at least this share of its fresh
# decoded samples (verify.json) as the person's label. Admitting a repair is not enough: a candidate trained on real
# images alone can pass the guard while a labelled region's samples stay 0% -> 3% (seen on digits, seed 0).
REGION_REPAIRED = 0.8
STAGE_ORDER = tuple(name for name in STAGE_NAMES if name != "report")  # the timings table: the stages before it


@dataclass(frozen=True)
class Report:
    """The report stage's artifact: ``data`` is report.json; ``pictures`` maps a picture's run-directory name to
    its PNG bytes (embedded in index.html, left out of report.json)."""

    data: ReportData
    pictures: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def metrics(self) -> dict[str, object]:
        clean = self.data.get("clean_accuracy") or {}
        return {"status": self.data["status"], "regions": self.data["summary"]["regions_found"],
                "regions_repaired": self.data["summary"]["regions_repaired"],
                "clean_accuracy_before": clean.get("before"), "clean_accuracy_after": clean.get("after"),
                "regressions": len(self.data["regressions"]), "report": REPORT_HTML}

    def save(self, folder: str | Path) -> list[str]:
        """Write index.html, report.json and report.md into ``folder`` (a run directory's report/); return their
        paths."""
        folder = Path(folder)
        written = [folder / Path(name).name for name in (REPORT_HTML, REPORT_JSON, REPORT_MD)]
        atomic_write_bytes(written[0], render_html(self).encode())
        atomic_write_json(written[1], self.data)
        atomic_write_bytes(written[2], render_markdown(self).encode())
        return [str(path) for path in written]

    @classmethod
    def load(cls, folder: str | Path) -> Report:
        """report.json from ``folder`` (pictures are not read back)."""
        return cls(json.loads((Path(folder) / Path(REPORT_JSON).name).read_text()))


def build_report(run: RunDir, config: ReportConfig | None = None) -> Report:
    """Gather every figure the stages wrote into one report (nothing is computed from a model here).

    Args:
        run: the run directory; artifacts a stage has not written yet are reported as missing, not guessed.
        config: the regression bounds (``report.max_clean_drop``, ``report.max_class_drop``).
    """
    config = config or ReportConfig()
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    if not any(name in stages for name in STAGE_ORDER):
        raise FileNotFoundError(f"{run.root} holds no finished stage (no {run.manifest_path.name} with stages): "
                                f"there is nothing to report. Run `defuse run --run-dir {run.root}` first.")
    found = _read_regions(run)
    classes = [str(c) for c in found.classes]
    verify: VerifyResult | None = _read_json(run, VERIFY_JSON) if _done(stages, "verify") else None
    check_before: CheckResult | None = _read_json(run, CHECK_BEFORE) if _done(stages, "check-before") else None
    check_after: CheckResult | None = _read_json(run, CHECK_AFTER) if _done(stages, "check-after") else None
    answers = _standing_answers(run)
    label_metrics: Metrics = stages.get("label", {}).get("metrics", {})
    repair: RepairSummary | None = stages.get("correct", {}).get("metrics", {}) if _done(stages, "correct") else None

    repaired = bool(repair and repair.get("chosen"))
    regions = [_region_entry(r, answers.get(r.id), verify, classes, repair) for r in found.regions]
    if label_metrics.get("pending"):
        status = AWAITING_LABELS
    elif verify is not None:
        status = COMPLETE
    else:
        status = DISCOVERY_ONLY
    data: ReportData = {
        "status": status,
        "status_detail": _status_detail(status, label_metrics, repair, run, regions),
        "summary": {
            "regions_found": len(regions),
            "regions_labelled": sum(r["label"] is not None for r in regions),
            "regions_labelled_bug": sum(r["label_is_class"] for r in regions),
            "regions_repaired": sum(bool(r["repaired"]) for r in regions),
            "regions_not_repaired": [r["id"] for r in regions if r["repaired"] is False],
            "repair_admitted": repaired if repair is not None else None,
        },
        "clean_accuracy": (verify or {}).get("clean_accuracy") or _clean_before(stages),
        "regions": regions,
        "rediscovery": (verify or {}).get("rediscovery"),
        "ei": _ei(check_before, check_after),
        "variance": _variance(check_before, check_after),
        "drift": _drift(check_before, check_after),
        "drift_summary": {**_drift_summary(check_before, check_after), **_worst_cases(run)},
        "per_class_accuracy": _per_class(verify, stages),
        "repair": _repair(repair),
        "regressions": find_regressions(verify, check_after, config),
        "bounds": {"max_clean_drop": config.max_clean_drop, "max_class_drop": config.max_class_drop,
                   "ei_drop": EI_REGRESSION},
        "discovery": {"failures": found.stats.get("failures"),
                      "queries": stages.get("identify", {}).get("metrics", {}).get("queries"),
                      "least_drawn": _least_drawn(stages.get("identify", {}).get("metrics", {}), classes),
                      "bug_score": BUG_SCORE if run.path(REGIONS_JSON).exists() else None},
        "timings": {name: stages[name].get("seconds") for name in STAGE_ORDER if name in stages},
        "stages": {name: stages[name].get("status") for name in STAGE_ORDER if name in stages},
        "metadata": {
            "run_dir": str(run.root),
            "created": manifest.get("created"),
            "seed": manifest.get("seed"),
            "config": manifest.get("config"),
            "versions": manifest.get("versions"),
            "split_sizes": stages.get("fit-classifier", {}).get("metrics", {}).get("split_sizes"),
            "classes": classes,
        },
    }
    return Report(data, _pictures(run, regions, check_before, check_after))


def find_regressions(verify: VerifyResult | None, check_after: CheckResult | None,
                     config: ReportConfig) -> list[Regression]:
    """What the repaired model does worse than the original, by the bounds of ``config`` and check-after's EI rule.

    Each entry: ``kind`` (clean_accuracy, class, ei), ``what`` and a sentence ``detail`` with the figures."""
    found: list[Regression] = []
    if verify:
        clean = verify["clean_accuracy"]
        low, high = clean["change_ci95"]
        if clean["change"] < -config.max_clean_drop and high < 0:
            found.append({"kind": "clean_accuracy", "what": "clean test accuracy",
                          "detail": f"clean test accuracy fell {_points(-clean['change'])} "
                                    f"({clean['before']:.4f} -> {clean['after']:.4f}, paired 95% interval of the "
                                    f"change [{low:+.4f}, {high:+.4f}]), beyond report.max_clean_drop "
                                    f"{config.max_clean_drop}"})
        for name, c in verify.get("per_class_accuracy", {}).items():
            drop = c["before"] - c["after"]
            if drop > config.max_class_drop + 1e-9:
                found.append({"kind": "class", "what": f"class {name}",
                              "detail": f"class {name} fell {_points(drop)} ({c['before']:.4f} -> {c['after']:.4f} "
                                        f"on {c['n']} test images), beyond report.max_class_drop "
                                        f"{config.max_class_drop}"})
    for transform, change in ((check_after or {}).get("ei_change") or {}).items():
        if change and change.get("regression"):
            m = change["change"]
            found.append({"kind": "ei", "what": f"EI under {transform}",
                          "detail": f"Effective Invariance under {transform} fell {-m['mean']:.3f} (95% interval "
                                    f"[{m['low']:+.3f}, {m['high']:+.3f}]): beyond {EI_REGRESSION} and excluding 0"})
    return found


def markdown_escape(text: Any) -> str:
    """User text (class names, labels) as literal Markdown: ``<`` and ``&`` as entities (no HTML tag can open; a
    lone ``>`` cannot start one, so "7 -> 1" stays readable), Markdown's own syntax characters backslash-escaped."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def render_html(report: Report) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True,
                      undefined=StrictUndefined)
    env.filters["pct"] = _pct
    env.filters["interval"] = _interval
    pictures = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in report.pictures.items()}
    from defuse.stages.report.figures import per_class_figure

    figure = per_class_figure(report.data["per_class_accuracy"])
    if figure:
        pictures["per_class"] = "data:image/png;base64," + base64.b64encode(figure).decode()
    return env.get_template("index.html.j2").render(r=report.data, pictures=pictures,
                                                    config_json=json.dumps(report.data["metadata"]["config"],
                                                                           indent=2))


def render_markdown(report: Report) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=False, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters["md"] = markdown_escape
    env.filters["pct"] = _pct
    env.filters["interval"] = _interval
    return env.get_template("report.md.j2").render(r=report.data)


# ----------------------------------------------------------------------------- gathering


_WRITERS = {REGIONS_JSON: "distill", VERIFY_JSON: "verify", CHECK_BEFORE: "check-before", CHECK_AFTER: "check-after"}


def _least_drawn(identify_metrics: Mapping[str, Any], classes: list[str]) -> str | None:
    """The classes the generator least often draws as themselves (the search's reach), when any falls below the
    identify stage's warning bar; None when all are drawn well or the run predates the figure."""
    reach = identify_metrics.get("reconstruction_by_class") or {}
    if not reach or min(reach.values()) >= WEAK_RECONSTRUCTION:
        return None
    return least_drawn(reach, classes)


def _read_regions(run: RunDir) -> Regions:
    """distill's regions, or none before distill ran."""
    if not run.path(REGIONS_JSON).exists():
        return Regions([], {}, ())
    try:
        return Regions.load(run.path(REGIONS_JSON))
    except (json.JSONDecodeError, KeyError, TypeError, FileNotFoundError) as err:
        raise ValueError(f"{run.path(REGIONS_JSON)} is not what distill writes ({type(err).__name__}: {err}): re-run "
                         f"the stage that writes it (`defuse run --run-dir {run.root} --force distill`).") from None


def _read_json(run: RunDir, name: str) -> Any:
    """A JSON artifact as written (its record type is the caller's annotation), or None when it is absent."""
    path = run.path(name)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        stage = _WRITERS.get(name, "STAGE")
        raise ValueError(f"{path} is not valid JSON ({err}): re-run the stage that writes it "
                         f"(`defuse run --run-dir {run.root} --force {stage}`).") from None


def _done(stages: Metrics, name: str) -> bool:
    return stages.get(name, {}).get("status") == "done"


def _standing_answers(run: RunDir) -> dict[int, Answer]:
    if not run.path(LABELS_FILE).exists():
        return {}
    from defuse.records import LabelBook

    return LabelBook(run.path(LABELS_FILE)).answers()


def _region_entry(region: Region, answer: Answer | None, verify: VerifyResult | None,
                  classes: list[str], repair: RepairSummary | None = None) -> ReportRegion:
    measured: RegionVerification = next((r for r in (verify or {}).get("regions", []) if r["id"] == region.id), {})
    label = None if answer is None else answer.label
    is_class = answer is not None and answer.is_bug
    name = (lambda k: classes[k] if 0 <= k < len(classes) else str(k))
    repaired, why = _region_repaired(is_class, measured.get("accuracy_after"), repair,
                                     name(int(label)) if is_class else None)
    return {
        "id": region.id,
        "pair": region.pair,
        "source_class": name(region.source_label),
        "predicted_class": name(region.predicted_label),
        "label": name(int(label)) if is_class else label,
        "label_is_class": is_class,
        "label_source": None if answer is None else answer.source,
        "label_reason": None if answer is None else answer.reason,
        "bug_score": region.bug_score,
        "weight": region.weight,
        "n_failures": region.n_failures,
        "error_rate": region.error_rate,
        "validity": region.validity,
        "confidence": region.confidence,
        "purity": region.purity,
        "real_neighbours": region.real_neighbours,
        "real_misread": region.real_misread,
        "real_distance": region.real_distance,
        "real_nearest_read": [name(k) for k in region.real_nearest_read],
        "doubted_nearest_read": [name(k) for k in region.doubted_nearest_read],
        "label_aum": region.label_aum,
        "label_doubt": region.label_doubt,
        "accuracy_before": measured.get("accuracy_before"),
        "accuracy_after": measured.get("accuracy_after"),
        "real_test_images": measured.get("real_n"),
        "real_accuracy_before": measured.get("real_accuracy_before"),
        "real_accuracy_after": measured.get("real_accuracy_after"),
        "failures_before": measured.get("failures_before"),
        "failures_after": measured.get("failures_after"),
        "repaired": repaired,
        "not_repaired_reason": why,
        "grid": region.grid,
        "real_grid": region.real_grid,
        "doubted_grid": region.doubted_grid,
    }


def _region_repaired(is_class: bool, accuracy_after: float | None, repair: RepairSummary | None,
                     label: str | None) -> tuple[bool | None, str | None]:
    """Whether a region labelled a bug is repaired (None: not labelled a bug, or not verified yet), and why not."""
    if not is_class or accuracy_after is None:
        return None, None
    if repair is not None and not repair.get("chosen"):
        return False, f"the repair was refused ({repair.get('reason', 'no candidate was admitted')})"
    if accuracy_after >= REGION_REPAIRED:
        return True, None
    return False, (f"the repaired classifier reads {100 * accuracy_after:.1f}% of its fresh samples as {label}, under "
                   f"{100 * REGION_REPAIRED:.0f}%: {_why_not_learnt(repair)}")


def _why_not_learnt(repair: RepairSummary | None) -> str:
    """Why the chosen fine-tune left a labelled region misread, from the candidates' table: none learnt the regions'
    decoded samples, or those that did were refused by the guard (with the figures that refused them)."""
    candidates = (repair or {}).get("candidates") or []
    learnt = [c for c in candidates if (c.get("decoded_accuracy") or 0.0) >= REGION_REPAIRED]
    if not learnt:
        return "no fine-tune learnt the labelled regions' decoded samples (see the candidates under Repair)"
    refused = [c for c in learnt if not c.get("admissible")]
    if len(refused) < len(learnt):
        return ("the fine-tune was chosen on the real held-out images of the labelled bugs, and the ones that learnt "
                "the decoded samples read those images no better (see the candidates under Repair)")
    low = max(c["guard_change_ci95"][0] for c in refused)
    drop = min(c["largest_class_drop"] for c in refused)
    return (f"the {len(learnt)} fine-tunes that learnt the labelled regions' decoded samples change answers on "
            f"held-out images the guard holds, and were refused: at best a 95% lower bound of {100 * low:+.2f} "
            f"points on held-out accuracy and a largest class drop of {100 * drop:.1f}% (correct.max_clean_drop, "
            f"correct.max_class_drop)")


def _status_detail(status: str, label_metrics: Metrics, repair: RepairSummary | None, run: RunDir,
                   regions: list[ReportRegion] | None = None) -> str:
    detail = _repair_detail(status, label_metrics, repair, run, regions)
    moved = (repair or {}).get("moved_for_review") or 0
    if moved:
        detail += (f" {moved} images labelled as a labelled region's mistake are read as your label by a candidate "
                   f"repair: `defuse review --run-dir {run.root}` shows each, and your answers re-grade (or retrain) "
                   f"the repair when you run again with --reviewed-labels.")
    return detail


def _repair_detail(status: str, label_metrics: Metrics, repair: RepairSummary | None, run: RunDir,
                   regions: list[ReportRegion] | None = None) -> str:
    if status == AWAITING_LABELS:
        return (f"{label_metrics.get('pending')} of {label_metrics.get('regions')} regions await a label; nothing "
                f"was repaired. Label them with `defuse label --run-dir {run.root}` (or --labels FILE, or --labels "
                f"auto), then run the same command again.")
    if status == DISCOVERY_ONLY:
        return "The repair and its checks have not run yet: this report shows discovery and the original model."
    if repair is not None and not repair.get("chosen"):
        return f"The original weights were kept: {repair.get('reason', 'no candidate was admitted')}."
    missed = [r for r in regions or () if r["repaired"] is False]
    if missed:
        cause = _why_not_learnt(repair)
        if all((r["not_repaired_reason"] or "").endswith(cause) for r in missed):  # one cause, said once
            named = ", ".join(f"#{r['id']} {r['pair']} labelled {r['label']} ({100 * r['accuracy_after']:.1f}% of its "
                              f"fresh samples read as {r['label']})" for r in missed)
            named += f", each under {100 * REGION_REPAIRED:.0f}%: {cause}"
        else:
            named = "; ".join(f"#{r['id']} {r['pair']} labelled {r['label']}: {r['not_repaired_reason']}"
                              for r in missed)
        done = sum(bool(r["repaired"]) for r in regions)
        opening = (f"Partly repaired: {done} of {done + len(missed)} regions labelled a bug are repaired." if done else
                   f"None of the {len(missed)} regions labelled a bug is repaired.")
        return (f"{opening} Not repaired: {named}. The figures below compare the repaired classifier with the "
                f"original on the test split.")
    return "Repaired: the figures below compare the repaired classifier with the original on the test split."


def _clean_before(stages: Metrics) -> AccuracyChange | None:
    metrics = stages.get("fit-classifier", {}).get("metrics", {})
    if "test_accuracy" not in metrics:
        return None
    return {"before": metrics["test_accuracy"], "before_ci95": None, "after": None, "after_ci95": None, "change": None,
            "change_ci95": None, "n": metrics.get("test_n")}


def _ei(before: CheckResult | None, after: CheckResult | None) -> dict[str, EIEntry]:
    out: dict[str, EIEntry] = {}
    for transform, e in (before or {}).get("ei", {}).items():
        entry: EIEntry = {"applicable": e["applicable"], "before": None, "after": None}
        if e["applicable"]:
            entry.update(before=e["ei"]["mean"], before_ci95=[e["ei"]["low"], e["ei"]["high"]],
                         accuracy_before=(e.get("accuracy") or {}).get("mean"))
        a = (after or {}).get("ei", {}).get(transform)
        if a and a["applicable"]:
            entry.update(after=a["ei"]["mean"], after_ci95=[a["ei"]["low"], a["ei"]["high"]],
                         accuracy_after=(a.get("accuracy") or {}).get("mean"))
        change = ((after or {}).get("ei_change") or {}).get(transform)
        if change:
            entry.update(change=change["change"]["mean"], change_ci95=[change["change"]["low"],
                                                                       change["change"]["high"]],
                         regression=bool(change["regression"]))
        out[transform] = entry
    return out


def _variance(before: CheckResult | None, after: CheckResult | None) -> dict[str, VarianceEntry]:
    out: dict[str, VarianceEntry] = {}
    for family, v in (before or {}).get("variance", {}).items():
        a = (after or {}).get("variance", {}).get(family, {})
        out[family] = {"mean_before": v.get("mean"), "mean_after": a.get("mean"),
                       "verdict_before": v.get("verdict"), "verdict_after": a.get("verdict"),
                       "p_invariant_before": v.get("probability_invariant"),
                       "p_invariant_after": a.get("probability_invariant"),
                       "heatmap_before": f"{CHECKS_DIR}/{v['heatmap']}" if v.get("heatmap") else None,
                       "heatmap_after": f"{CHECKS_DIR}/{a['heatmap']}" if a.get("heatmap") else None}
    return out


def _drift(before: CheckResult | None, after: CheckResult | None) -> dict[str, DriftEntry]:
    """Per acquisition parameter (DESIGN.md's ``drift.<parameter>`` keys), the tolerated range before and after
    (``{"low": ..., "high": ...}``; null on a side where the identity is the physical bound) and the sensitivity."""
    b, a = (before or {}).get("drift"), (after or {}).get("drift")
    if not b:
        return {}
    out: dict[str, DriftEntry] = {}
    for name, entry in b["parameters"].items():
        other = (a or {}).get("parameters", {}).get(name)
        out[name] = {"identity": entry["identity"], "bounds": [entry["low"], entry["high"]], "unit": entry["unit"],
                     "tolerance_before": {"low": entry.get("tolerance_low"), "high": entry.get("tolerance_high")},
                     "tolerance_after": ({"low": other.get("tolerance_low"), "high": other.get("tolerance_high")}
                                         if other else None),
                     "sensitivity_before": entry.get("sensitivity_per_range"),
                     "sensitivity_after": other.get("sensitivity_per_range") if other else None}
    return out


def _drift_summary(before: CheckResult | None, after: CheckResult | None) -> DriftSummary:
    """The allowed drop, each model's worst direction and the presets' picture, beside the per-parameter table."""
    b, a = (before or {}).get("drift"), (after or {}).get("drift")
    if not b:
        return {}
    return {"max_drop": b["max_drop"], "worst_direction_before": b.get("worst_direction"),
            "worst_direction_after": (a or {}).get("worst_direction"),
            "presets_strip": f"{CHECKS_DIR}/{b['presets_strip']}" if b.get("presets_strip") else None}


def _worst_cases(run: RunDir) -> DriftSummary:
    """The worst-case drift of `defuse drift optimize`, where it was run for the original or the repaired model."""
    out: DriftSummary = {}
    for name in ("before", "after"):
        found = _read_json(run, f"{CHECKS_DIR}/drift_optimize_{name}.json")
        if found:
            out[f"worst_case_{name}"] = {k: found[k] for k in ("budget", "clean_accuracy", "worst_accuracy",
                                                                "worst_setting", "random_accuracy_mean")}
    return out


def _per_class(verify: VerifyResult | None, stages: Metrics) -> dict[str, ClassChange]:
    if verify:
        return {name: {**c, "change": round(c["after"] - c["before"], 4)}
                for name, c in verify.get("per_class_accuracy", {}).items()}
    before = stages.get("fit-classifier", {}).get("metrics", {}).get("per_class_accuracy", {})
    return {name: {"before": acc, "after": None, "change": None, "n": None} for name, acc in before.items()}


def _repair(repair: RepairSummary | None) -> RepairSummary | None:
    if repair is None:
        return None
    keys = ("labelled_regions", "chosen", "reason", "chosen_on", "label_issues", "label_issues_of_labelling_bugs",
            "reviewed_labels", "reviewed_relabelled", "relabelled", "relabelled_training_images", "guard_images", "guard",
            "real_bug_images",
            "real_bug_accuracy_before", "real_bug_accuracy_after", "val_region_accuracy_before",
            "val_region_accuracy_after")
    return {k: repair[k] for k in keys if k in repair}


def _pictures(run: RunDir, regions: list[ReportRegion], before: CheckResult | None,
              after: CheckResult | None) -> dict[str, bytes]:
    names = [UMAP_PNG]
    names += [r[key] for r in regions for key in ("grid", "real_grid", "doubted_grid") if r.get(key)]
    for check in (before, after):
        names += [f"{CHECKS_DIR}/{v['heatmap']}" for v in (check or {}).get("variance", {}).values() if v.get("heatmap")]
    if (before or {}).get("drift", {}).get("presets_strip"):
        names.append(f"{CHECKS_DIR}/{before['drift']['presets_strip']}")
    return {name: run.path(name).read_bytes() for name in names if run.path(name).is_file()}


def _points(fraction: float) -> str:
    return f"{100 * fraction:.2f} points"


def _pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _interval(pair: Any, digits: int = 1) -> str:
    return "" if not pair else f"[{100 * pair[0]:.{digits}f}, {100 * pair[1]:.{digits}f}]"
