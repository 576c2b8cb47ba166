"""Labelling: a person gives each misclassification region one label.

A label is what the region's images truly are: a class index (a bug: the classifier
should have said this class, and ``correct`` fine-tunes it to), ``"not-a-bug"`` (the
images are ambiguous or not of their source class) or ``"skip"`` (no decision; left out).

Answers come from a prompt (:func:`interactive_labels`), a JSON/YAML file
(:func:`file_labels`) or the regions' suggested labels (:func:`auto_labels`), and all
end in ``labels.jsonl``, an append-only :class:`LabelBook`: one JSON line per answer,
written, flushed and fsynced at once, so killing the process at any moment loses no
answer already given, and the prompt resumes at the first unanswered region.

Notation: K classes, ``classes[k]`` the name of class k; regions are in rank order
(``Regions.regions``, id 1 = most likely a real bug).

This module imports nothing heavy at load time (torch only inside :func:`render_preview`),
so a prompt starts at once.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from defuse.artifacts import LABELS_FILE, LABELS_FOR
from defuse.records import (
    NOT_A_BUG,
    SKIP,
    Answer,
    Label,
    LabelBook,
    answer_time,
    parse_label,
)
from defuse.terminal import preview_columns, preview_rows, render_preview

if TYPE_CHECKING:
    import torch

    from defuse.records import Region, Regions
    from defuse.rundir import RunDir

log = logging.getLogger(__name__)


_HELP = """\
  a class index or name   the class this region's images truly show (a bug: the classifier should say it;
                          the class it already says: the labels of the real images around it are suspect)
  Enter                   take the suggestion (a class only where real images are misread the same way)
  n                       not a bug (the images are ambiguous or not of their source class)
  s                       skip: no label, the region is left out of the repair
  u                       undo the last answer and go back to its region
  ?                       this help
  q                       quit; every answer is already saved, run the same command again to resume
A class named like a command (n, s, u, q) is given by its index."""


# ----------------------------------------------------------------------------- labellers


def interactive_labels(
    regions: Regions | Sequence[Region],
    classes: Sequence[str],
    book: LabelBook,
    *,
    ask: Callable[[str], str] = input,
    out: Callable[[str], Any] = print,
    previews: Mapping[int, torch.Tensor] | None = None,
    grid_path: Callable[[int], str | Path | None] | None = None,
    terminal_columns: int | None = None,
    suggestions: Mapping[int, Answer] | None = None,
    real_grid_path: Callable[[int], str | Path | None] | None = None,
    terminal_lines: int | None = None,
    doubted_grid_path: Callable[[int], str | Path | None] | None = None,
) -> dict[int, Answer]:
    """Ask a person for one label per region, in rank order, resuming where the book stops.

    A region counts as answered once a person answered it (at the prompt or in a labels file);
    an automatic answer (a fallback run without a terminal) is asked again, its suggestion the default.
    Every answer is in ``book`` the moment it is given; ``q`` (or end of input) only stops asking.

    Args:
        regions: the ranked regions (``Regions`` or its ``.regions`` list).
        classes: the K class names; the regions' labels index them.
        book: where answers go and where a resumed session reads what is done.
        ask: reads one answer, given the prompt text (``input`` in a terminal, a script in tests).
        out: writes one block of text.
        previews: region id -> ``(N, C, H, W)`` sample images in [0, 1], drawn in the terminal.
        grid_path: region id -> the region's PNG grid (shown as a path), or None.
        terminal_columns: the terminal's width; the previews fill as many per row as fit
            (default ``shutil.get_terminal_size()``).
        terminal_lines: the terminal's height; only as many rows of previews are drawn as leave the region's
            header, its paths and the prompt on the screen (default ``shutil.get_terminal_size()``).
        suggestions: what Enter takes, with the reason shown; default the conservative :func:`auto_labels`, so a
            person who only presses Enter repairs no more than ``--labels auto`` would.
        real_grid_path: region id -> the PNG of the real images nearest it that carry its source label, or None:
            where every split carries a labelling bug, these are the mislabelled images (look-alikes of the
            region's samples labelled as the source class), and answering the model's own reading lists them.
        doubted_grid_path: region id -> the PNG of the training images of its source class near it whose labels
            were hardest to learn (``Region.doubted_nearest``), or None: the labels' side of the region.

    Returns:
        The book's answers, by region id.
    """
    region_list = _region_list(regions)
    _check_classes(region_list, classes)
    by_id = {region.id: region for region in region_list}
    suggestions = suggestions if suggestions is not None else auto_labels(region_list, classes)
    current = _first_pending(region_list, book.answers())
    if current is None:
        out(f"All {len(region_list)} regions are labelled ({book.path}).")
        return book.answers()
    out(f"Label {len(region_list)} regions: Enter takes the suggestion, ? lists the answers.")
    show = True
    while current is not None:
        if show:
            _show_region(current, region_list, classes, out, previews, grid_path, terminal_columns,
                         suggestions.get(current.id), real_grid_path, terminal_lines, doubted_grid_path)
        show = True
        command, label = _read_answer(current, classes, ask, out, suggestions.get(current.id))
        if command == "quit":
            answered = sum(1 for a in book.answers() if a in by_id)
            out(f"Stopped: {answered} of {len(region_list)} regions labelled, saved in {book.path}. "
                f"Run the same command again to resume at region #{current.id}.")
            return book.answers()
        if command == "undo":
            last = book.last_answered()
            if last is None:
                out("Nothing to undo.")
                show = False
                continue
            book.undo(last)
            out(f"Undid the answer for region #{last}.")
            current = by_id.get(last) or _first_pending(region_list, book.answers())
            continue
        book.record(current.id, label, "prompt")
        out(f"region #{current.id}: {_describe(label, classes)}{_model_agrees_note(current, label, classes)}")
        current = _first_pending(region_list, book.answers())
    out(f"All {len(region_list)} regions are labelled ({book.path}).")
    return book.answers()


def file_labels(path: str | Path, regions: Regions | Sequence[Region], classes: Sequence[str]) -> dict[int, Answer]:
    """Read labels from a JSON or YAML file mapping region ids to labels.

    Example (YAML): ``{1: 7, 2: seven, 3: not-a-bug, 4: skip}``; a label is a class index, a class
    name (case-insensitive), ``not-a-bug`` or ``skip``. Regions the file leaves out stay unanswered.

    Args:
        path: the file (JSON is YAML, so one reader takes both).
        regions: the run's regions; every id in the file must be one of theirs.
        classes: the K class names.

    Returns:
        One answer (source ``"file"``) per entry, by region id.
    """
    file = Path(path)
    region_list = _region_list(regions)
    _check_classes(region_list, classes)
    if not file.is_file():
        raise FileNotFoundError(
            f"Labels file {file} does not exist. Labels come from prompt, auto, or a JSON/YAML file "
            f"mapping region ids to labels, e.g. {{1: 7, 2: not-a-bug}}."
        )
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} must be JSON or YAML, got a parse error instead: {err}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ValueError(
            f"{file} must map region ids to labels, e.g. {{1: 7, 2: not-a-bug}}, got {got} instead."
        )
    ids = [region.id for region in region_list]
    listing = ", ".join(map(str, ids)) or "none"
    time = answer_time()
    answers: dict[int, Answer] = {}
    for key, value in data.items():
        region = _as_region_id(key)
        if region is None or region not in ids:
            raise ValueError(
                f"Region ids in {file} must be regions of this run ({listing}), got {key!r} instead. "
                f"Remove that entry or re-check regions.json."
            )
        if region in answers:
            raise ValueError(f"Region ids in {file} must appear once each, got region {region} twice instead.")
        label = parse_label(value, classes)
        if label is None:
            raise ValueError(
                f"The label of region {region} in {file} must be a class index in [0, {len(classes) - 1}], "
                f"a class name ({_class_listing(classes)}), {NOT_A_BUG!r} or {SKIP!r}, got {value!r} instead."
            )
        answers[region] = Answer(region, label, "file", time)
    return answers


def auto_labels(regions: Regions | Sequence[Region], classes: Sequence[str] | None = None, *,
                min_real_misread: int = 3) -> dict[int, Answer]:
    """Conservative automatic answers, each with its reason; source ``"auto"``. Only on explicit request.

    A region is labelled a bug (its source class) only when two independent witnesses agree: real images
    (at least ``min_real_misread`` of the region's nearest real audit images of its source class are read
    as the region's mistake, ``real_misread``) and the validity judge (its majority class on the region's
    fresh samples, ``suggested_label``, is the source class). Anything less is ``not-a-bug``: a region
    whose nearest real images the classifier reads right is a place only the generator draws, and
    repairing it costs clean accuracy for nothing a real input shows.

    Args:
        regions: the ranked regions.
        classes: class names, for the reasons (indices without them).
        min_real_misread: the real evidence a bug needs (``label.auto_min_real_misread``).
    """
    if not _is_int(min_real_misread) or min_real_misread < 1:
        raise ValueError(f"`min_real_misread` must be an int >= 1, got {min_real_misread!r} instead.")
    name = (lambda k: classes[k]) if classes is not None else str  # noqa: E731
    time = answer_time()
    answers = {}
    for r in _region_list(regions):
        source, predicted, suggested = int(r.source_label), int(r.predicted_label), int(r.suggested_label)
        evidence = (f"{r.real_misread} of the {r.real_neighbours} nearest real audit images of class "
                    f"{name(source)} are read as {name(predicted)}")
        if r.real_misread < min_real_misread:
            label, reason = NOT_A_BUG, f"{evidence} (fewer than {min_real_misread}): no real evidence of a bug"
        elif suggested != source:
            label, reason = NOT_A_BUG, (f"{evidence}, but the validity judge reads the region's samples as "
                                        f"{name(suggested)}, not {name(source)}")
        else:
            label, reason = source, (f"{evidence} (at least {min_real_misread}), and the validity judge reads the "
                                     f"region's samples as {name(source)}")
        answers[r.id] = Answer(r.id, label, "auto", time, reason)
    return answers


# ----------------------------------------------------------------------------- the stage



def awaiting_labels_notice(run: RunDir, pending: int, total: int) -> str:
    """What to tell a user whose run stopped for labels: how many await them and the exact commands."""
    folder = shlex.quote(str(run.root))
    return (f"{pending} of {total} regions await a label, and nothing is repaired until a person gives them. "
            f"Label them in a terminal: `defuse label --run-dir {folder}`; or from a file: "
            f"`defuse run --run-dir {folder} --labels FILE` (YAML/JSON: region id -> class, not-a-bug or skip); "
            f"or accept the conservative suggestions: `defuse run --run-dir {folder} --labels auto`. "
            f"Then `defuse run --run-dir {folder}` resumes with the repair.")


def label_stage(
    run: RunDir,
    regions: Regions | Sequence[Region],
    classes: Sequence[str],
    mode: str | Path | None,
    *,
    regions_sha256: str | None = None,
    min_real_misread: int = 3,
    ask: Callable[[str], str] = input,
    out: Callable[[str], Any] = print,
    stdin_is_tty: bool | None = None,
    previews: Mapping[int, torch.Tensor] | Callable[[], Mapping[int, torch.Tensor]] | None = None,
    terminal_columns: int | None = None,
) -> dict[str, Any]:
    """The label stage: record one answer per region in ``run/labels.jsonl``.

    Modes:

    * ``None`` or ``"prompt"``: ask in the terminal (:func:`interactive_labels`), resuming at the
      first unanswered region. Without a terminal on stdin nobody can answer: nothing is recorded,
      and a warning says how many regions await a label and how to give them. Nothing is ever
      labelled on a person's behalf unasked.
    * ``"auto"``: the conservative suggestions (:func:`auto_labels`) for every region without an answer.
    * ``"later"``: nobody is asked now, even at a terminal (a training script's callback, a notebook): the answers
      already given stand, and the run stops before correct while any region awaits one.
    * anything else: a JSON/YAML labels file (:func:`file_labels`). A file is explicit: its entries
      replace earlier answers (only changed ones are appended, so re-running it appends nothing).

    Answers are keyed by region id, and ids are reassigned when distill runs again: with ``regions_sha256``
    (the hash of the regions.json being labelled), answers given for another regions.json are moved aside
    to ``labels.before-<time>.jsonl`` (never deleted) before labelling starts.

    Args:
        run: the run directory.
        regions: the ranked regions.
        classes: the K class names.
        mode: see above.
        regions_sha256: the sha256 of the regions.json the answers belong to.
        min_real_misread: the real evidence an automatic bug label needs (see :func:`auto_labels`).
        ask: reads one answer at the prompt.
        out: writes one block of text.
        stdin_is_tty: whether a person can answer; default ``sys.stdin.isatty()``.
        previews: region id -> ``(N, C, H, W)`` sample images drawn at the prompt, or a function that makes them
            (called only when a person is asked).
        terminal_columns: the terminal's width for the previews; default ``shutil.get_terminal_size()``.

    Returns:
        Metrics: ``regions``, ``answered``, ``bugs`` (labelled with a class), ``not_a_bug``, ``skipped``,
        ``pending`` (no answer yet), ``mode`` (``prompt``, ``auto`` or ``file``) and, in file mode,
        ``labels_file``.
    """
    region_list = _region_list(regions)
    _check_classes(region_list, classes)
    book = LabelBook(run.path(LABELS_FILE))
    kind = _mode_kind(mode)
    if regions_sha256 is not None:
        _set_aside_answers_of_other_regions(run, book, regions_sha256)
    if kind == "prompt":
        if stdin_is_tty is None:
            stdin_is_tty = sys.stdin is not None and sys.stdin.isatty()
        if stdin_is_tty and _first_pending(region_list, book.answers()) is not None:
            shown = previews() if callable(previews) else previews
            interactive_labels(region_list, classes, book, ask=ask, out=out, previews=shown,
                               grid_path=lambda region: _existing(run.path(f"regions/region_{region:02d}.png")),
                               terminal_columns=terminal_columns,
                               suggestions=auto_labels(region_list, classes, min_real_misread=min_real_misread),
                               real_grid_path=lambda region: _existing(run.path(f"regions/region_{region:02d}_real.png")),
                               doubted_grid_path=lambda region: _existing(
                                   run.path(f"regions/region_{region:02d}_doubted.png")))
    elif kind == "later":
        pass
    elif kind == "auto":
        answered = book.answers()
        added = [a for a in auto_labels(region_list, classes, min_real_misread=min_real_misread).values()
                 if a.region not in answered]
        for answer in added:
            book.add(answer)
        bugs = sum(a.is_bug for a in added)
        out(f"auto: {len(added)} regions labelled from their evidence, {bugs} of them bugs, {len(added) - bugs} "
            f"not-a-bug; the reason of each is in {book.path}.")
    else:
        _apply_file(book, file_labels(mode, region_list, classes), classes, out)
    book.path.parent.mkdir(parents=True, exist_ok=True)
    book.path.touch()  # no regions, no answers: still the (empty) record later stages read
    metrics = _metrics(region_list, book.answers(), kind)
    if kind == "file":
        metrics["labels_file"] = str(mode)
    if metrics["pending"]:
        log.warning("%s", awaiting_labels_notice(run, metrics["pending"], metrics["regions"]))
    return metrics


def _set_aside_answers_of_other_regions(run: RunDir, book: LabelBook, regions_sha256: str) -> None:
    owner = run.path(LABELS_FOR)
    if book.path.exists() and (not owner.exists() or owner.read_text().strip() != regions_sha256):
        aside = book.path.with_name(f"labels.before-{datetime.now().strftime('%Y%m%d-%H%M%S')}.jsonl")
        book.path.rename(aside)
        log.warning("regions.json changed since %s was written: its answers were moved to %s.", book.path, aside)
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(regions_sha256 + "\n")


def _apply_file(book: LabelBook, answers: dict[int, Answer], classes: Sequence[str], out: Callable) -> None:
    current = book.answers()
    written = 0
    for region, answer in answers.items():
        before = current.get(region)
        if before is not None and before.label == answer.label and before.source != "auto":
            continue
        if before is not None and before.source != "auto":
            out(f"region #{region}: {_describe(before.label, classes)} -> {_describe(answer.label, classes)} "
                f"(from {before.source} to file)")
        book.add(answer)
        written += 1
    out(f"file: {written} answers recorded, {len(answers) - written} already standing ({book.path}).")


def _metrics(region_list: list[Region], answers: dict[int, Answer], kind: str) -> dict[str, Any]:
    mine = [answers[r.id] for r in region_list if r.id in answers]
    return {
        "regions": len(region_list),
        "answered": len(mine),
        "bugs": sum(a.is_bug for a in mine),
        "not_a_bug": sum(a.label == NOT_A_BUG for a in mine),
        "skipped": sum(a.label == SKIP for a in mine),
        "pending": len(region_list) - len(mine),
        "mode": kind,
    }


# ----------------------------------------------------------------------------- helpers


def _mode_kind(mode: str | Path | None) -> str:
    if mode is None or mode == "prompt":
        return "prompt"
    if mode in ("auto", "later"):
        return str(mode)
    if isinstance(mode, (str, Path)) and str(mode):
        return "file"
    raise ValueError(f"`mode` must be prompt, auto, later or a labels file path, got {mode!r} instead.")


REGION_TEXT_LINES = 12


def _show_region(region: Region, region_list: list[Region], classes: Sequence[str], out: Callable,
                 previews: Mapping[int, Any] | None, grid_path: Callable | None,
                 terminal_columns: int | None = None, suggestion: Answer | None = None,
                 real_grid_path: Callable | None = None, terminal_lines: int | None = None,
                 doubted_grid_path: Callable | None = None) -> None:
    position = region_list.index(region) + 1
    out("")
    out(f"Region #{region.id} ({position} of {len(region_list)}): {region.pair} | {region.n_failures} failures | "
        f"error rate {region.error_rate:.2f} | validity {region.validity:.2f}")
    doubt = getattr(region, "label_doubt", None)  # None: no training margins were recorded
    if doubt:
        out(f"label doubt {doubt:.2f}: training labels of {classes[region.source_label]} and "
            f"{classes[region.predicted_label]} near it were hard to learn")
    if previews is not None and region.id in previews:
        size = shutil.get_terminal_size()
        width = terminal_columns if terminal_columns is not None else size.columns
        height = terminal_lines if terminal_lines is not None else size.lines
        images = previews[region.id]
        columns = preview_columns(images, width)
        # Only the rows that fit under the header: a header scrolled off the top leaves a person labelling blind.
        rows = preview_rows(images, height - REGION_TEXT_LINES)
        out(render_preview(images[: rows * columns], columns=columns))
    if grid_path is not None:
        path = grid_path(region.id)
        if path is not None:
            out(f"samples: {path}")
    nearest_read = getattr(region, "real_nearest_read", None)  # a region-like record may lack real evidence
    real = real_grid_path(region.id) if real_grid_path is not None and nearest_read else None
    if real is not None:
        read = ", ".join(classes[k] for k in nearest_read)
        out(f"real images nearest it labelled {classes[region.source_label]} (the classifier reads: {read}): {real}")
    doubted_read = getattr(region, "doubted_nearest_read", None)
    doubted = doubted_grid_path(region.id) if doubted_grid_path is not None and doubted_read else None
    if doubted is not None:
        read = ", ".join(classes[k] for k in doubted_read)
        out(f"training images labelled {classes[region.source_label]} near it, hardest to learn first (read: {read}): "
            f"{doubted}")
    if suggestion is not None:
        out(f"suggested: {_describe(suggestion.label, classes)} ({suggestion.reason})")
    else:
        suggested = int(region.suggested_label)
        out(f"suggested label: {classes[suggested]} (index {suggested})")


def _read_answer(region: Region, classes: Sequence[str], ask: Callable[[str], str],
                 out: Callable, suggestion: Answer | None = None) -> tuple[str, Label | None]:
    """Ask until the answer is a label or a command; returns ("label", label), ("undo", None) or ("quit", None)."""
    suggested = suggestion.label if suggestion is not None else int(region.suggested_label)
    shown = classes[suggested] if isinstance(suggested, int) else suggested
    prompt = f"label for region #{region.id} [{shown}]: "
    while True:
        try:
            text = ask(prompt)
        except EOFError:
            out("")
            return "quit", None
        text = text.strip()
        command = text.lower()
        if command == "":
            return "label", suggested
        if command == "q":
            return "quit", None
        if command == "u":
            return "undo", None
        if command == "?":
            out(_HELP)
            continue
        if command == "n":
            return "label", NOT_A_BUG
        if command == "s":
            return "label", SKIP
        label = parse_label(text, classes)
        if label is None:
            out(f"{text!r} is not a class. Classes (index name): {_class_listing(classes, indexed=True)}; "
                f"or n (not a bug), s (skip), u (undo), ? (help), q (quit).")
            continue
        return "label", label


def _first_pending(region_list: list[Region], answers: dict[int, Answer]) -> Region | None:
    """The best-ranked region no person has answered yet."""
    for region in region_list:
        answer = answers.get(region.id)
        if answer is None or answer.source == "auto":
            return region
    return None


def _region_list(regions: Regions | Iterable[Region]) -> list[Region]:
    return list(getattr(regions, "regions", regions))


def _check_classes(region_list: list[Region], classes: Sequence[str]) -> None:
    if isinstance(classes, str) or len(classes) < 2:
        raise ValueError(f"`classes` must be a sequence of at least 2 class names, got {classes!r} instead.")
    for region in region_list:
        if not 0 <= int(region.suggested_label) < len(classes):
            raise ValueError(
                f"`classes` must name every class the regions use, got {len(classes)} classes but region "
                f"#{region.id} suggests class {region.suggested_label} instead. Pass the classes of regions.json."
            )


def _model_agrees_note(region: Region, label: Label, classes: Sequence[str]) -> str:
    """What an answer that is the class the model already reads means: its labels, not the model, are suspect."""
    if label != region.predicted_label or label == region.source_label:
        return ""
    return (f" (the classifier already reads these as {classes[label]}: nothing to fine-tune here, but the real "
            f"images labelled {classes[region.source_label]} within this region's reach are listed as label issues "
            f"for review, `defuse review`)")


def _describe(label: Label, classes: Sequence[str]) -> str:
    return f"{classes[label]} (index {label})" if isinstance(label, int) else label


def _class_listing(classes: Sequence[str], indexed: bool = False) -> str:
    if not indexed:
        return ", ".join(classes)
    return ", ".join(name if name == str(i) else f"{i} {name}" for i, name in enumerate(classes))


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def _as_region_id(key: Any) -> int | None:
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and key.strip().isdigit():
        return int(key.strip())
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
