"""The ``defuse`` command line: each subcommand reads a config and runs stage functions. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from defuse.config import RunConfig, describe_options, load_config
from defuse.pipeline import NOT_BUILT_YET, STAGES, StageResult, run_pipeline, run_stage, stage_named
from defuse.rundir import RunDir

_DESCRIPTIONS = {
    "run": "Run every stage of the pipeline that is built, skipping stages whose outputs are current.",
    "fit-classifier": "Train the classifier under test (or adopt yours: classifier.torchscript / classifier.factory) "
    "and write classifier.ckpt.",
    "fit-generator": "Train the convolutional beta-VAE and write generator.ckpt; records in manifest.json the "
    "fraction of test images whose reconstruction the classifier still gets right.",
    "identify": "Search the generator's latent space around correctly classified images for natural failures; "
    "write failures.parquet, failures_z.npy and the validity model (validity.npz).",
    "distill": "Group the failures into ranked misclassification regions (a Dirichlet-process mixture per confusion "
    "pair); write regions.json, regions/*.png and umap.png.",
    "label": "Give each region one label: a class (a bug), n (not a bug) or s (skip), at a prompt showing the "
    "region's samples; or --labels FILE / --labels auto. Answers go to labels.jsonl at once; run again to resume.",
    "correct": "Fine-tune the classifier on fresh samples of the regions labelled with a class, choosing lambda and "
    "epochs on validation data (clean accuracy may drop by at most correct.max_clean_drop); write repaired.ckpt. "
    "An interrupted fine-tune resumes from its last checkpoint.",
    "verify": "Compare the repaired classifier with the original on data the fine-tune never saw: test accuracy "
    "(with 95% bootstrap intervals), per-class accuracy, fresh region samples, and a re-run of the same search; "
    "write verify.json.",
}


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
        "  defuse run --force fit-generator             # re-train the VAE even if current\n"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None, metavar="CONFIG",
                        help="YAML config file, or the name of one in ./configs (default: the embedded digits run)")
    parser.add_argument("--run-dir", default=None, metavar="DIR",
                        help="where artifacts and manifest.json go (default: runs/<config name>)")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set classifier.epochs=5 (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="shortcut for --set seed=N")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")


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
        p = sub.add_parser(name, help=text, description=text, epilog=_options_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        if name in ("run", "label"):
            p.add_argument("--labels", default=None, metavar="prompt|auto|FILE",
                           help="where labels come from: the prompt (default; auto when stdin is not a terminal), "
                                "the regions' suggestions, or a JSON/YAML file mapping region id -> class or not-a-bug")
        if name == "run":
            p.add_argument("--force", action="append", default=[], metavar="STAGE",
                           help=f"re-run STAGE even if current (repeatable; 'all' for every stage). "
                                f"Stages: {', '.join(s.name for s in STAGES)}")
        else:
            p.add_argument("--force", action="store_true", help="re-run even if the outputs are current")
    return parser


def _resolve(args: argparse.Namespace) -> tuple[RunConfig, RunDir]:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "labels", None):
        overrides.append(f"label.mode={args.labels}")
    if args.no_progress or not sys.stderr.isatty():
        overrides.append("trainer.progress_bar=false")
    config = load_config(args.config, overrides)
    return config, RunDir(args.run_dir or os.path.join("runs", config.name))


def _print_results(console: Console, run: RunDir, results: list[StageResult]) -> None:
    table = Table(title=f"defuse: {run.root}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("key figures")
    for result in results:
        figures = ", ".join(f"{k}={v}" for k, v in result.metrics.items() if isinstance(v, (int, float)))
        status = "skipped (current)" if result.skipped else "done"
        table.add_row(result.name, status, f"{result.seconds:.1f}s", figures)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    errors = Console(stderr=True, soft_wrap=True)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning's own use of a torch API
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        config, run = _resolve(args)
        if args.command == "run":
            results = run_pipeline(config, run, force=tuple(args.force))
        else:
            results = [run_stage(stage_named(args.command), config, run, force=args.force)]
    except (ValueError, FileNotFoundError, TypeError) as err:
        if os.environ.get("DEFUSE_DEBUG"):
            raise
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted:[/] finished stages are kept; run the same command again to resume.")
        return 130
    _print_results(console, run, results)
    if args.command == "run":
        console.print(f"Not built yet (see the open issues): {', '.join(NOT_BUILT_YET)}.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
