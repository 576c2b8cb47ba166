"""The ``defuse`` command line: each subcommand reads a config and runs stage functions. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from defuse.artifacts import REPORT_HTML, REPORT_JSON, VERIFY_JSON
from defuse.config import (
    FAIL_ON,
    RunConfig,
    config_from_mapping,
    describe_options,
    load_config,
)
from defuse.pipeline import (
    AWAITING_LABELS,
    NOT_BUILT_YET,
    STAGES,
    StageResult,
    run_pipeline,
    run_stage,
    stage_named,
)
from defuse.quiet import quiet_libraries
from defuse.rundir import RunDir, ctrl_c_latch
from defuse.stages.check import check_file
from defuse.stages.drift import DRIFT_ACTIONS, drift_command
from defuse.stages.review import review_command

_DESCRIPTIONS = {
    "run": "Run the pipeline from data to report (fit-classifier, fit-generator, identify, distill, check-before, "
    "label, correct, verify, check-after, report), skipping stages whose outputs are current, so an interrupted run "
    "resumes where it stopped. Without a person to label the regions (no terminal, no --labels) it stops before "
    "correct, repairs nothing, writes the report of what exists and says how to label; the same command resumes "
    "from there.",
    "fit-classifier": "Train the classifier under test (or adopt yours: classifier.torchscript / classifier.factory) "
    "and write classifier.ckpt.",
    "fit-generator": "Train the convolutional beta-VAE and write generator.ckpt; records in manifest.json the "
    "fraction of audit images whose reconstruction the classifier still gets right (the search's ceiling).",
    "identify": "Fit the validity judge on the audit split and search the generator's latent space around the audit "
    "images the classifier gets right for natural failures; write failures.parquet, failures_z.npy and validity.npz.",
    "distill": "Group the failures into ranked misclassification regions (a Dirichlet-process mixture per confusion "
    "pair); write regions.json, regions/*.png and umap.png.",
    "label": "Give each region one label: a class (a bug), n (not a bug) or s (skip), at a prompt showing the "
    "region's samples; or --labels FILE; or --labels auto, which labels a region a bug only on real evidence and "
    "records why. Answers go to labels.jsonl at once; run again to resume.",
    "correct": "Fine-tune the classifier on its training labels as your region labels correct them (with --relabel, "
    "the training images whose labels your answers contradict, under your label; without it they are left out), "
    "plus fresh samples of the labelled regions that no real image shows; every layer, or the head alone on "
    "frozen features (correct.layers), each epoch a candidate, chosen on real held-out val and audit images; a candidate must show, by a paired bootstrap 95% lower bound, that held-out accuracy drops by at most "
    "correct.max_clean_drop, else the original weights stay. Writes repaired.ckpt and label_issues.csv. An "
    "interrupted fine-tune resumes from its last checkpoint.",
    "review": "Review the label issues your region labels revealed, a page of pictures at a time, before "
    "correct: the training, validation and audit images whose given label is a labelled region's mistake and which "
    "the judges doubt or contradict or the region reaches (e.g. short 2s labelled 7), and after it those a "
    "candidate repair moved to your label. At a terminal they come in pages of up to 16 numbered pictures that "
    "share a given label and the region's label; answer which are the region's label: all, none (they keep their "
    "label) or their numbers (the rest keep theirs); o answers one image at a time, with what the two judges "
    "(latent, image) give that label, any class as the answer (Enter skips, q stops). Answers go to "
    "<run-dir>/label_review.csv at once (run again to resume); without a terminal the images to review are written "
    "to <run-dir>/label_review_todo.csv, whose label column you fill. Use them with `defuse run --reviewed-labels "
    "FILE`: each answer decides its image's label (relabelled or standing), whatever the rules say.",
    "check": "Check the classifier's invariances on the test split: Effective Invariance (Deng et al. 2022) under "
    "90/180/270-degree rotation, grayscale (colour images), +-15-degree rotation, brightness, scale and translation, "
    "with 95% bootstrap intervals overall and per class; and ML4ML variance matrices (Liao et al. 2021) over 31 "
    "rotations, brightness and scale factors, with their features and heat maps. --model before (the original, "
    "check-before), after (the repaired, check-after, paired image by image with before: an EI drop beyond 0.01 "
    "whose interval excludes 0 is a regression) or a checkpoint file. Writes checks/<name>.json, .npy and .png.",
    "report": "Render what the stages wrote as a before/after report in <run-dir>/report/: index.html "
    "(self-contained, opens offline), report.json (every figure, keys documented in docs/report.md) and report.md (for a "
    "pull request). Computes nothing from a model; `defuse run` writes it last, and also when it stops for labels.",
    "drift": "Physical drift of a classifier (after raw2logit): the test images are unprocessed to linear light and "
    "re-acquired under physically named parameters (exposure, black level, gamma, optical blur, sharpening, shot and "
    "read noise, resolution; white balance, colour matrix and demosaicing for colour images). `forensics`: each "
    "parameter's sensitivity (autograd) and tolerance (the drift keeping the accuracy drop within "
    "check.drift_max_drop); `synth`: accuracy, EI and SSIM under named presets and parameter grids, ImageNet-C "
    "corruptions, and the post-hoc/physical accuracy-drop ratio at matched SSIM; `optimize`: the worst-case setting "
    "in a box around the identity. --model before|after|PATH. Writes checks/drift_<action>_<model>.json.",
    "verify": "Compare the repaired classifier with the original on the test split, which no other stage reads: "
    "accuracy (with 95% bootstrap intervals), per-class accuracy, fresh region samples, and the same search run "
    "around the test images against both models; write verify.json.",
}

SUBCOMMANDS = tuple(_DESCRIPTIONS)


def _options_epilog() -> str:
    rows = describe_options(RunConfig)
    width = max(len(key) for key, _ in rows)
    lines = [f"  {key.ljust(width)}  {default}" for key, default in rows]
    return (
        "config keys (set in the YAML file, or here with --set KEY=VALUE; defaults shown):\n"
        + "\n".join(lines)
        + "\n\nexamples:\n"
        "  defuse run                                   # embedded digits data, runs/digits\n"
        "  defuse run --config configs/mnist-test-split.yaml\n"
        "  defuse fit-classifier --set classifier.epochs=3 --set seed=1 --run-dir runs/try\n"
        "  defuse run --force fit-generator             # re-train the VAE and re-run every stage after it\n"
        "  defuse label --run-dir runs/digits           # label a run's regions (its config is read from the run)\n"
        "  defuse run --labels auto                     # accept the conservative suggestions, then repair\n"
        "  defuse review --run-dir runs/digits          # settle the doubted labels, a page at a time:\n"
        "  defuse run --reviewed-labels runs/digits/label_review.csv\n"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None, metavar="CONFIG",
                        help="YAML config file, or the name of one in ./configs (default: the config recorded in "
                             "--run-dir's manifest.json, else the embedded digits run)")
    parser.add_argument("--run-dir", default=None, metavar="DIR",
                        help="where artifacts and manifest.json go (default: runs/<config name>)")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set classifier.epochs=5 (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="shortcut for --set seed=N")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    parser.add_argument("--no-cache", action="store_true",
                        help="train the classifier and the generator even when another run directory already trained "
                             "them on the same data and settings (trainer.cache=false; the cache: $DEFUSE_CACHE, "
                             "default ~/.cache/defuse, off with DEFUSE_CACHE=off)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show what the libraries say (Lightning's device banners and tips, umap-learn's "
                             "warnings), which defuse hides by default (trainer.verbose=true)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defuse",
        description="Find, explain and repair the bugs of image classifiers: train a generator, search its latent "
        "space for natural failures, group them into regions, label them, fine-tune, and report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `defuse SUBCOMMAND --help` for the options and config keys of each subcommand.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, text in _DESCRIPTIONS.items():
        # argparse %-formats help strings (the subcommand list): "95%" must reach it as "95%%".
        p = sub.add_parser(name, help=text.replace("%", "%%"), description=text, epilog=_options_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        if name in ("run", "label"):
            p.add_argument("--labels", default=None, metavar="prompt|auto|later|FILE",
                           help="where labels come from: a person at the prompt (default; with no terminal nothing is "
                                "labelled and run stops before correct), auto (a bug only where real audit images are "
                                "misread the same way; asked for each time), later (nobody is asked now, even at a "
                                "terminal: run stops before correct), or a JSON/YAML file mapping region id -> "
                                "class, not-a-bug or skip")
        if name in ("run", "correct"):
            p.add_argument("--reviewed-labels", default=None, metavar="FILE", dest="reviewed_labels",
                           help="a person's review of label issues (`defuse review` writes it; a CSV of image,label): "
                                "each answer decides its image's label (correct.reviewed_labels)")
        if name in ("run", "correct"):
            p.add_argument("--relabel", action="store_true",
                           help="consent to relabel: training, validation and audit images whose labels your region "
                                "labels, the validity judge and most of their nearest audit images contradict "
                                "(listed in label_issues.csv) are "
                                "trained and graded under your label instead of being left out "
                                "(correct.relabel=true)")
        if name == "drift":
            p.add_argument("action", choices=DRIFT_ACTIONS, help="synth, forensics or optimize")
        if name in ("check", "drift"):
            p.add_argument("--model", default="before", metavar="before|after|PATH",
                           help="which classifier: before (classifier.ckpt, the default), after (repaired.ckpt) or a "
                                "checkpoint file (written as checks/<its stem>.*)")
        if name in ("run", "check"):
            p.add_argument("--fail-on", default=None, choices=FAIL_ON, dest="fail_on",
                           help="regression: exit with status 3, the reasons printed, when the repaired model "
                                "regresses (run: clean accuracy, a class or an EI transform beyond report.max_clean_"
                                "drop / report.max_class_drop / 0.01; check: an EI regression against check-before); "
                                "for CI pipelines (report.fail_on)")
        if name == "review":
            p.add_argument("--out", default=None, metavar="FILE",
                           help="where answers go (default: <run-dir>/label_review.csv); answers already there are "
                                "not asked again")
        if name == "run":
            p.add_argument("--force", action="append", default=[], metavar="STAGE",
                           help=f"re-run STAGE and every stage after it, even if current (repeatable; 'all' for "
                                f"every stage). Stages: {', '.join(s.name for s in STAGES)}")
        else:
            p.add_argument("--force", action="store_true", help="re-run even if the outputs are current")
    return parser


def _resolve(args: argparse.Namespace) -> tuple[RunConfig, RunDir]:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "labels", None):
        overrides.append(f"label.mode={args.labels}")
    if getattr(args, "relabel", False):
        overrides.append("correct.relabel=true")
    if getattr(args, "reviewed_labels", None):
        overrides.append(f"correct.reviewed_labels={args.reviewed_labels}")
    if getattr(args, "fail_on", None):
        overrides.append(f"report.fail_on={args.fail_on}")
    if args.no_progress or not sys.stderr.isatty():
        overrides.append("trainer.progress_bar=false")
    if args.verbose:
        overrides.append("trainer.verbose=true")
    if args.no_cache:
        overrides.append("trainer.cache=false")
    recorded = RunDir(args.run_dir).manifest().get("config") if args.run_dir and args.config is None else None
    if recorded:  # `defuse label --run-dir DIR` continues DIR's run with the config it was made with
        # ... but where labels come from is asked each time: a run never remembers "auto" on the user's behalf.
        # So is the CI gate: --fail-on holds for the command it is given to.
        recorded = {**recorded, "label": {**recorded.get("label", {}), "mode": "prompt"},
                    "report": {**recorded.get("report", {}), "fail_on": "never"},
                    "trainer": {**recorded.get("trainer", {}), "verbose": False}}
        config = config_from_mapping(recorded, overrides, origin=str(RunDir(args.run_dir).manifest_path))
    else:
        config = load_config(args.config, overrides)
    return config, RunDir(args.run_dir or os.path.join("runs", config.name))


def _print_results(console: Console, run: RunDir, results: list[StageResult], *, verbose: bool,
                   whole_run: bool) -> None:
    """What the command did. A whole run has already printed a line per stage as it went (``_StageProgress``);
    a single stage prints its line here. ``--verbose`` adds every stage's figures and, for a run, the checks'
    tables; `defuse check` and `defuse drift` always print theirs (they are what the command is for)."""
    if not whole_run:
        for result in results:
            console.print(stage_line(result), highlight=False, markup=False, soft_wrap=True)
    if verbose:
        table = Table(title=f"defuse: {run.root}", title_justify="left")
        table.add_column("stage")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("figures")
        for result in results:
            figures = ", ".join(f"{k}={v}" for k, v in result.metrics.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool))
            table.add_row(result.name, result.status, f"{result.seconds:.1f}s", escape(figures))
        console.print(table)
    if verbose or not whole_run:
        for result in results:
            file = str(result.metrics.get("file", ""))
            if file.startswith("checks/drift_") and run.path(file).exists():
                _print_drift(console, json.loads(run.path(file).read_text()), file)
            elif file.startswith("checks/") and run.path(file).exists():
                _print_check(console, json.loads(run.path(file).read_text()), file)
    if not whole_run and any(r.status == AWAITING_LABELS for r in results):
        label = next(r for r in results if r.name == "label")
        console.print(f"[yellow]Stopped before correct:[/] {label.metrics.get('pending')} of "
                      f"{label.metrics.get('regions')} regions await a label; nothing was repaired. "
                      f"Label them with `defuse label --run-dir {escape(str(run.root))}` (or --labels FILE, or "
                      f"--labels auto), then run the same command again.", soft_wrap=True)


def stage_line(result: StageResult, index: int | None = None) -> str:
    """One line per stage: where it is in the run, its status and time, and its key figure."""
    where = f"[{index + 1}/{len(STAGES)}] " if index is not None else ""
    figure = key_figure(result) if result.status != AWAITING_LABELS else ""
    return f"{where}{result.name}: {result.status} ({result.seconds:.1f}s)" + (f"  {figure}" if figure else "")


def key_figure(result: StageResult) -> str:
    """The one figure a person wants from each stage (the rest: --verbose, manifest.json and the report)."""
    m = result.metrics
    try:
        if result.name == "fit-classifier":
            sizes = m.get("split_sizes") or {}
            return f"test accuracy {m['test_accuracy']:.4f}" + (
                f" (images: {', '.join(f'{name} {n:,}' for name, n in sizes.items())})" if sizes else "")
        if result.name == "fit-generator":
            return f"reconstruction MSE {m['reconstruction_mse']:.4f}"
        if result.name == "identify":
            return (f"{m['valid_failures']:,} valid failures around {m['sources_with_failure']:,} of "
                    f"{m['sources']:,} audit images ({m['queries']:,} classifier queries)")
        if result.name == "distill":
            return f"{m['regions']} regions in {m['pairs']} confusion pairs"
        if result.name.startswith("check"):
            ei = {k.removeprefix("ei."): v for k, v in m.items() if k.startswith("ei.") and isinstance(v, float)}
            return "EI " + ", ".join(f"{name} {value:.2f}" for name, value in ei.items()) if ei else ""
        if result.name == "label":
            if m.get("pending"):
                return f"{m['pending']} of {m['regions']} regions await a label"
            return f"{m['bugs']} of {m['regions']} regions labelled a bug, {m['not_a_bug']} not a bug"
        if result.name == "correct":
            chosen = m.get("chosen")
            if chosen:
                return (f"repaired: {chosen['layers']} layers, lambda {chosen['lambda']}, epoch {chosen['epoch']}"
                        if isinstance(chosen, dict) else f"repaired: {chosen}")
            return f"original kept: {m.get('reason')}"
        if result.name == "verify":
            return f"clean test accuracy {m['clean_accuracy_before']:.4f} -> {m['clean_accuracy_after']:.4f}"
    except (KeyError, TypeError, ValueError):
        return ""
    return ""


def _print_check(console: Console, checked: dict, path: str) -> None:
    """One check's figures: EI per transform with its interval (and the paired change after a repair), and each
    variance matrix's mean with the assessor's verdict."""
    if not checked.get("ei"):
        return
    changes = checked.get("ei_change") or {}
    table = Table(title=f"invariance of {checked['model']} ({checked['images']} test images; {path})",
                  title_justify="left")
    for column in ("transform", "EI [95% interval]", "agreement", "accuracy", *(["EI change"] if changes else [])):
        table.add_column(column)
    for transform, e in checked["ei"].items():
        if not e["applicable"]:
            table.add_row(transform, "not applicable", "", "", *([""] if changes else []))
            continue
        row = [transform, f"{e['ei']['mean']:.3f} [{e['ei']['low']:.3f}, {e['ei']['high']:.3f}]",
               f"{e['agreement']['mean']:.3f}", f"{e['accuracy']['mean']:.3f}" if e.get("accuracy") else "–"]
        if changes:
            change = changes.get(transform)
            row.append("" if change is None else f"{change['change']['mean']:+.3f}"
                       + (" [red]regression[/]" if change["regression"] else ""))
        table.add_row(*row)
    console.print(table)
    for family, v in checked.get("variance", {}).items():
        verdict = (f"{v['verdict']} (P(invariant) {v['probability_invariant']:.2f})" if v.get("verdict")
                   else "no assessor")
        console.print(f"  variance {family}: matrix mean {v['mean']:.3f} over {v['counts']['correct']} images; "
                      f"{verdict}", soft_wrap=True, highlight=False)


def _print_drift(console: Console, result: dict, path: str) -> None:
    """A drift command's figures: tolerances (forensics), presets and the ratio (synth), the worst case (optimize)."""
    if "parameters" in result:
        table = Table(title=f"drift tolerance of {result['model']} ({result['images']} test images, accuracy drop "
                            f"<= {result['max_drop']:.2%}; {path})", title_justify="left")
        for column in ("parameter", "identity", "tolerated range", "physical range", "sensitivity / range"):
            table.add_column(column)
        for name, p in result["parameters"].items():
            low = p["identity"] if p.get("tolerance_low") is None else p["tolerance_low"]
            high = p["identity"] if p.get("tolerance_high") is None else p["tolerance_high"]
            sensitivity = "–" if p["sensitivity_per_range"] is None else f"{p['sensitivity_per_range']:+.4f}"
            table.add_row(f"{name} ({p['unit']})", f"{p['identity']}", f"{low} .. {high}", f"{p['low']} .. {p['high']}",
                          sensitivity)
        console.print(table)
    elif "presets" in result:
        table = Table(title=f"drift presets, {result['model']} ({result['images']} test images; {path})",
                      title_justify="left")
        for column in ("preset", "setting", "accuracy", "EI", "SSIM"):
            table.add_column(column)
        clean = result["clean"]
        table.add_row("clean", "", f"{clean['accuracy']:.4f}", f"{clean['ei']:.4f}", "1")
        for name, p in result["presets"].items():
            table.add_row(name, escape(json.dumps(p["setting"])), f"{p['accuracy']:.4f}", f"{p['ei']:.4f}",
                          f"{p['ssim']:.4f}")
        console.print(table)
        console.print(f"post-hoc / physical accuracy drop at matched SSIM: {result['ratio']} "
                      f"({escape(result['ratio_definition'])})", soft_wrap=True, highlight=False)
    else:
        console.print(f"worst case within {result['budget']:.0%} of each range: accuracy {result['worst_accuracy']:.4f} "
                      f"(clean {result['clean_accuracy']:.4f}; random settings in the box: mean "
                      f"{result['random_accuracy_mean']:.4f}, min {result['random_accuracy_min']:.4f}) at "
                      f"{escape(json.dumps(result['worst_setting']))}", soft_wrap=True, highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # To a file or a pipe rich assumes 80 columns and wraps the --verbose tables inside their cells; a log file
        # has no width, so lay them out as wide as they need (up to 200).
        console = Console(width=200)
    errors = Console(stderr=True, soft_wrap=True)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", handlers=[StderrAtEmit()])
    with ctrl_c_latch():
        return _main(args, console, errors)


def _main(args: argparse.Namespace, console: Console, errors: Console) -> int:
    try:
        config, run = _resolve(args)
        if args.command == "run":
            with _StageProgress(console, errors, enabled=config.trainer.progress_bar) as progress:
                results = run_pipeline(config, run, force=tuple(args.force), on_stage=progress.update)
        elif args.command == "review":
            with quiet_libraries(enabled=not config.trainer.verbose):  # as a stage of the run is (the image judge)
                return _review(args, config, run, console)
        elif args.command == "drift":
            start = time.perf_counter()
            with quiet_libraries(enabled=not config.trainer.verbose):
                metrics = drift_command(config, run, args.action, args.model)
            results = [StageResult(f"drift {args.action} {args.model}", False, time.perf_counter() - start,
                                   metrics)]
        elif args.command == "check" and args.model not in ("before", "after"):
            start = time.perf_counter()
            with quiet_libraries(enabled=not config.trainer.verbose):
                metrics = check_file(config, run, args.model)
            results = [StageResult(f"check {args.model}", False, time.perf_counter() - start, metrics)]
        elif args.command == "check":
            results = [run_stage(stage_named(f"check-{args.model}"), config, run, force=args.force)]
        else:
            results = [run_stage(stage_named(args.command), config, run, force=args.force)]
    except (ValueError, FileNotFoundError) as err:  # a user's mistake; anything else is ours: a traceback
        if os.environ.get("DEFUSE_DEBUG"):
            raise
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Lightning answers Ctrl-C inside a Trainer with SystemExit(1)
        errors.print("[yellow]interrupted:[/] finished stages are kept; run the same command again to resume.")
        return 130
    _print_results(console, run, results, verbose=config.trainer.verbose, whole_run=args.command == "run")
    if args.command == "run":
        _print_summary(console, run)
        if NOT_BUILT_YET:
            console.print(f"Not built yet (see the open issues): {', '.join(NOT_BUILT_YET)}.")
    if config.report.fail_on == "regression" and args.command in ("run", "check"):
        return _gate(errors, config, run, results, whole_run=args.command == "run")
    return 0


def _review(args: argparse.Namespace, config: RunConfig, run: RunDir, console: Console) -> int:
    """`defuse review`: the prompt at a terminal, else the list to fill in (defuse.stages.review.review_command)."""
    def say(text: str) -> None:
        console.print(text, soft_wrap=True, highlight=False, markup=False)

    review_command(config, run, Path(args.out) if args.out else None, interactive=sys.stdin.isatty(), say=say)
    return 0


class StderrAtEmit(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record comes, not what it was at start-up: rich's
    stage bar swaps stderr for a proxy that prints above the bar, so a warning never draws over the bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not sys.stderr:
            self.setStream(sys.stderr)
        super().emit(record)


class _StageProgress:
    """The pipeline's progress: a line per stage on stdout as each finishes (status, time, key figure), and in a
    terminal a rich bar across the stages on stderr below them (Lightning's own bars draw below it, on stdout).
    Sharing Lightning's console instead breaks rich 15's stack of live displays when Lightning stops its bar."""

    def __init__(self, console: Console, bar_console: Console, enabled: bool) -> None:
        self.console = console
        self.bar_console = bar_console
        self.live = enabled and bar_console.is_terminal
        self.progress = None

    def __enter__(self) -> _StageProgress:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("[bold]defuse run[/]"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), TimeElapsedColumn(),
                                     console=self.bar_console)
            self.progress.start()
            self.task = self.progress.add_task("", total=len(STAGES))
        return self

    def update(self, index: int, stage, result: StageResult | None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=index + (result is not None),
                                 description=stage.name if result is None else f"{stage.name}: {result.status}")
        if result is not None:
            self.console.print(stage_line(result, index), highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_summary(console: Console, run: RunDir) -> None:
    """The run in five lines: clean accuracy before/after, regions, regressions, and where the report is."""
    if not run.path(REPORT_JSON).exists():
        return
    report = json.loads(run.path(REPORT_JSON).read_text())
    clean, summary = report.get("clean_accuracy") or {}, report["summary"]
    lines = [f"[bold]{escape(report['status'])}[/]: {escape(report['status_detail'])}"]
    if clean.get("after") is not None:
        lines.append(f"clean test accuracy {clean['before']:.2%} -> {clean['after']:.2%} (change "
                     f"{100 * clean['change']:+.2f} points, 95% interval [{100 * clean['change_ci95'][0]:+.2f}, "
                     f"{100 * clean['change_ci95'][1]:+.2f}]; {clean['n']} test images)")
    elif clean.get("before") is not None:
        lines.append(f"clean test accuracy {clean['before']:.2%} ({clean.get('n')} test images)")
    lines.append(f"regions: {summary['regions_found']} found, {summary['regions_labelled']} labelled, "
                 f"{summary['regions_labelled_bug']} labelled a bug, {summary['regions_repaired']} repaired")
    if report["status"] == "complete":
        lines.append(f"regressions: {len(report['regressions'])}" + "".join(
            f"\n  - {escape(item['detail'])}" for item in report["regressions"]))
    lines.append(f"report: {escape(str(run.path(REPORT_HTML)))}")
    console.print("\n".join(lines), soft_wrap=True, highlight=False)


def _gate(errors: Console, config: RunConfig, run: RunDir, results: list[StageResult], whole_run: bool) -> int:
    """--fail-on regression: status 3 and the reasons when the repaired model regresses, else 0. A whole run is
    judged on verify.json and check-after; `defuse check` on the EI of the model it checked against check-before."""
    from defuse.stages.report.build import find_regressions

    if any(r.status == AWAITING_LABELS for r in results):
        errors.print("[yellow]--fail-on regression:[/] nothing was repaired (regions await labels): no regression "
                     "to check.")
        return 0
    verify = json.loads(run.path(VERIFY_JSON).read_text()) if run.path(VERIFY_JSON).exists() else None
    check_files = [r.metrics["file"] for r in results if str(r.metrics.get("file", "")).startswith("checks/")]
    checked = [json.loads(run.path(name).read_text()) for name in check_files if run.path(name).exists()]
    found = find_regressions(verify if whole_run else None,
                             next((c for c in checked if c.get("ei_change")), None), config.report)
    if not found:
        errors.print("--fail-on regression: no regression.", highlight=False)
        return 0
    errors.print(f"[bold red]--fail-on regression:[/] {len(found)} regression(s):", highlight=False)
    for item in found:
        errors.print(f"  - {escape(item['detail'])}", highlight=False)
    return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
