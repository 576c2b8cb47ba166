"""``defuse review``: a person's answer on each label issue of a labelled region, a page of pictures at a time, before correct
(and, after it, on the held-out images a candidate repair moved to their label). Not a stage of the run: its
answers reach correct through ``--reviewed-labels`` (``correct.reviewed_labels``). The label issues themselves:
:mod:`defuse.label_issues`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defuse.artifacts import (
    CLASSIFIER_CKPT,
    GENERATOR_CKPT,
    LABEL_ISSUES,
    LABEL_REVIEW,
    LABEL_REVIEW_TODO,
    LABELS_FILE,
    REGIONS_JSON,
    TRAINING_MARGINS,
    VALIDITY_MODEL,
)
from defuse.config import RunConfig, config_from_mapping
from defuse.records import parse_label
from defuse.terminal import render_preview

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from defuse.rundir import RunDir


def label_issues_to_review(config: RunConfig, run: RunDir) -> pd.DataFrame:
    """The label issues a person should review before correct (:func:`defuse.label_issues.issues_for_review`), less those
    ``correct.reviewed_labels`` answers already. Needs the regions labelled (the label stage's labels.jsonl)."""
    import numpy as np

    from defuse.data import ImageDataModule
    from defuse.label_issues import (
        image_witness,
        issues_for_review,
        read_reviewed_labels,
    )
    from defuse.models.loading import load_classifier, load_generator
    from defuse.records import LabelBook, Regions
    from defuse.validity import ValidityModel

    for name in (LABELS_FILE, REGIONS_JSON, GENERATOR_CKPT, VALIDITY_MODEL):
        if not run.path(name).exists():
            raise FileNotFoundError(f"{run.path(name)} is missing: label issues are found once the regions are "
                                    f"labelled. Run `defuse run` (and label the regions) first.")
    data = ImageDataModule(config.data, config.seed)
    reviewed = read_reviewed_labels(config.correct.reviewed_labels, data) if config.correct.reviewed_labels else None
    hparams = load_classifier(run.path(CLASSIFIER_CKPT)).hparams if run.path(CLASSIFIER_CKPT).exists() else {}
    # The same image judge the correct stage fits (same seed stream, deterministic), so review and repair agree.
    image_scores = image_witness(hparams, data, config.correct, config.seed, config.trainer, run.root)
    import pandas as pd

    margins = np.load(run.path(TRAINING_MARGINS)) if run.path(TRAINING_MARGINS).exists() else np.zeros((0, 0))
    todo = issues_for_review(Regions.load(run.path(REGIONS_JSON)), LabelBook(run.path(LABELS_FILE)).bug_labels(),
                             load_generator(run.path(GENERATOR_CKPT)), ValidityModel.load(run.path(VALIDITY_MODEL)),
                             data, reviewed, image_scores, training_aum=margins.mean(axis=0) if len(margins) else None)
    moved = moved_for_review(run, set(reviewed or ()) | set(todo["image"].tolist()))
    # An empty table has no dtypes to keep: concatenated, it would turn every column to object (pandas 3).
    return pd.concat([todo, moved], ignore_index=True) if len(moved) else todo


def moved_for_review(run: RunDir, answered: set[int]) -> pd.DataFrame:
    """The held-out images a finished correct stage found its candidates moving to a person's label under a mistaken
    label (kind "moved" in label_issues.csv, :func:`defuse.label_issues.moved_to_person`), less those in ``answered``:
    the person's answers re-grade the same candidates."""
    import pandas as pd

    from defuse.label_issues import LABEL_ISSUE_COLUMNS, MOVED

    path = run.path(LABEL_ISSUES)
    if not path.exists():
        return pd.DataFrame(columns=list(LABEL_ISSUE_COLUMNS))
    table = pd.read_csv(path, dtype={"given_class": str, "person_class": str, "split": str, "kind": str})
    return table[(table["kind"] == MOVED) & ~table["image"].isin(sorted(answered))].reset_index(drop=True)


def review_command(config: RunConfig, run: RunDir, out: Path | None = None, *, interactive: bool,
                   ask: Callable[[str], str] = input, say: Callable[[str], None] = print) -> dict[str, Any]:
    """``defuse review``: a person's answer on each label issue of a labelled region (:func:`label_issues_to_review`),
    appended to ``out`` (default <run-dir>/label_review.csv) as it is given (:func:`review_prompt`);
    answers already there are not asked again. Not interactive: the issues go to label_review_todo.csv, with an
    empty label column to fill in. Returns how many were listed and answered, and where they went."""
    from defuse.data import ImageDataModule

    out = Path(out) if out else run.path(LABEL_REVIEW)
    if out.exists() and not config.correct.reviewed_labels:  # answers given earlier are not asked again
        config = config_from_mapping(config.to_dict(), [f"correct.reviewed_labels={out}"])
    todo = label_issues_to_review(config, run)
    use = (f"Use the answers: `defuse run --run-dir {run.root} --reviewed-labels {out}` (each answer decides its "
           f"image's label; images you skip follow the rules).")
    if todo.empty:
        say(f"Nothing to review: no label issue of a labelled region awaits an answer (they are found once regions "
            f"are labelled with a class: `defuse label --run-dir {run.root}`). {use if out.exists() else ''}")
        return {"to_review": 0, "answered": 0}
    if not interactive:
        listing = run.path(LABEL_REVIEW_TODO)
        todo.assign(label="").to_csv(listing, index=False)
        say(f"{len(todo)} images to review are in {listing}: write each one's class (name or index) in its label "
            f"column (empty skips), then `defuse run --run-dir {run.root} --reviewed-labels {listing}`.")
        return {"to_review": len(todo), "answered": 0, "file": str(listing)}
    data = ImageDataModule(config.data, config.seed)
    answered = review_pages(_pages(todo, data), data.classes, out, ask=ask, out=say)
    say(use)
    return {"to_review": len(todo), "answered": answered, "file": str(out)}


def review_pages_of(todo: pd.DataFrame) -> list[pd.DataFrame]:
    """The label issues to review, page by page (the rows of each): grouped by given label, the person's label and
    whether a repair moved them (the images a person can answer together), in the order listed, ``PAGE`` to a page.
    A page costs the person one answer (:func:`review_pages`)."""
    import pandas as pd

    from defuse.label_issues import MOVED

    moved = todo["kind"] == MOVED if "kind" in todo else pd.Series(False, index=todo.index)
    groups = todo.groupby([todo["given_label"].astype(int), todo["person_label"].astype(int), moved], sort=False)
    return [group.iloc[start : start + PAGE] for _, group in groups for start in range(0, len(group), PAGE)]


def _pages(todo: pd.DataFrame, data) -> list[ReviewPage]:
    """:func:`review_pages_of` with each page's images and what to say about them."""
    import torch

    from defuse.label_issues import MOVED

    pages = []
    for rows in review_pages_of(todo):
        given, person = int(rows["given_label"].iloc[0]), int(rows["person_label"].iloc[0])
        by_repair = "kind" in rows and (rows["kind"] == MOVED).all()
        about = (f"labelled {data.classes[given]!r}; " + (
            f"the repair would read them as {data.classes[person]!r}" if by_repair else
            f"their region says {data.classes[person]!r}"))
        pages.append(ReviewPage(
            [int(i) for i in rows["image"]], given, person, about,
            [f"{row.split}, labelled {row.given_class!r}; its region says {row.person_class!r}{_witnesses(row)}"
             for row in rows.itertuples(index=False)],
            torch.cat([data.split(split).images[position : position + 1] for split, position in
                       zip(rows["split"], rows["position"])]).float() / 255))
    return pages


PAGE = 16  # images a person looks at together: two rows of eight in a terminal 140 characters wide


@dataclass(frozen=True)
class ReviewPage:
    """Up to ``PAGE`` label issues that share a given label and the person's label for them: their source image
    numbers, the two labels, what to say about them together and about each, and the images (N, C, H, W) in [0, 1]."""

    images: list[int]
    given: int
    person: int
    about: str
    about_each: list[str]
    pixels: torch.Tensor


def review_pages(pages: Sequence[ReviewPage], classes: Sequence[str], path: str | Path, *,
                 ask: Callable[[str], str] = input, out: Callable[[str], None] = print) -> int:
    """Ask a person about label issues a page at a time: the page's images side by side, numbered, and one
    question, which of them are the person's label. ``all``; ``none`` (each keeps its given label, which is an
    answer too: the label stands); the numbers of those that are (the rest keep their given label); ``o`` to
    answer each image of the page by itself (any class, :func:`review_prompt`); Enter skips the page, ``q`` stops.
    Every image still gets a person's look; a page of 16 costs one answer where they agree. Answers are appended
    to ``path`` and fsynced page by page. Returns how many answers were written."""
    path = Path(path)
    total = sum(len(page.images) for page in pages)
    out(f"{total} images to review, {len(pages)} pages of up to {PAGE}. For each page: which are the class asked "
        f"about: all, none, their numbers (e.g. 2 5 11; the rest keep their label), o to answer one by one, Enter to "
        f"skip the page, q to stop.")
    answered = 0
    for number, page in enumerate(pages, 1):
        out(_numbered_preview(page.pixels, columns=8))
        person, given = classes[page.person], classes[page.given]
        prompt = (f"[page {number}/{len(pages)}] {len(page.images)} images {page.about}. Which are {person!r}? "
                  f"(all / none: they are {given!r} / numbers / o / Enter / q) ")
        while True:
            try:
                answer = ask(prompt).strip().lower()
            except EOFError:  # stdin closed: as good as q
                return answered
            if answer in ("q", "quit"):
                return answered
            if answer in ("", "s", "skip"):
                break
            if answer in ("o", "one"):
                each, stopped = _ask_each(list(zip(page.images, page.about_each, page.pixels[:, None])), classes,
                                          path, ask, out)
                answered += each
                if stopped:
                    return answered
                break
            chosen = _chosen(answer, len(page.images))
            if chosen is None:
                out(f"{answer!r} is not an answer: all, none, the numbers 1 to {len(page.images)} of the images that "
                    f"are {person!r}, o, Enter to skip the page, or q to stop.")
                continue
            _append(path, [(image, page.person if i in chosen else page.given)
                           for i, image in enumerate(page.images, 1)])
            answered += len(page.images)
            break
    return answered


def _chosen(answer: str, n: int) -> set[int] | None:
    """The image numbers (1-based) an answer names as the person's class: all, none, or numbers; None if neither."""
    if answer in ("a", "all"):
        return set(range(1, n + 1))
    if answer in ("n", "none"):
        return set()
    parts = answer.replace(",", " ").split()
    if parts and all(part.isdigit() and 1 <= int(part) <= n for part in parts):
        return {int(part) for part in parts}
    return None


def _numbered_preview(pixels: torch.Tensor, columns: int) -> str:
    """:func:`render_preview` of ``pixels``, ``columns`` to a row, each row followed by the numbers (from 1) of its
    images, centred under them."""
    height, width = pixels.shape[-2:]
    drawn = max(1, round(width * min(1.0, 16 / max(height, width))))  # render_preview's default max_side of 16
    rows = []
    for start in range(0, len(pixels), columns):
        numbers = range(start + 1, min(start + columns, len(pixels)) + 1)
        rows.append(render_preview(pixels[start : start + columns], columns=columns) + "\n"
                    + " ".join(f"{i:^{drawn}}" for i in numbers).rstrip())
    return "\n".join(rows)


def _append(path: Path, answers: Sequence[tuple[int, int]]) -> None:
    """Append ``answers`` (image, label) to the review file, with its header if new, and fsync them."""
    fresh = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8") as handle:
        if fresh:
            handle.write("image,label\n")
        handle.write("".join(f"{image},{label}\n" for image, label in answers))
        handle.flush()
        os.fsync(handle.fileno())


def _witnesses(row) -> str:
    """What the judges give the region's label, as the review prompt shows it (the image judge where it judged)."""
    if row.judge_validity != row.judge_validity:  # NaN: a held-out image the repair moves (kind "moved")
        return f"; the repair would read it as {row.person_class!r}"
    said = f"; the judges give {row.person_class!r}: latent {row.judge_validity:.2f}"
    return said + (f", image {row.image_judge:.2f}" if row.image_judge == row.image_judge else "")  # NaN: none


def review_prompt(items: Sequence[tuple[int, str, torch.Tensor]], classes: Sequence[str], path: str | Path, *,
                  ask: Callable[[str], str] = input, out: Callable[[str], None] = print) -> int:
    """Ask a person about each image: ``items`` are (source image number, what to say about it, the image as a
    (1, C, H, W) tensor in [0, 1]). Each answer (a class name or index) is appended to ``path`` (a CSV of
    image,label, the review file ``correct.reviewed_labels`` reads) and fsynced at once, so stopping at any moment
    loses nothing; Enter skips, ``q`` stops. Returns how many answers were written."""
    out(f"{len(items)} images to review. For each: its class (name or index), Enter to skip, q to stop.")
    return _ask_each(items, classes, Path(path), ask, out)[0]


def _ask_each(items: Sequence[tuple[int, str, torch.Tensor]], classes: Sequence[str], path: Path,
              ask: Callable[[str], str], out: Callable[[str], None]) -> tuple[int, bool]:
    """:func:`review_prompt`'s questions: (answers written, whether the person stopped)."""
    answered = 0
    for done, (image, about, pixels) in enumerate(items):
        out(render_preview(pixels, columns=1))
        prompt = f"[{done + 1}/{len(items)}] image {image} ({about}). What is it? "
        while True:
            try:
                answer = ask(prompt).strip()
            except EOFError:  # stdin closed: as good as q
                return answered, True
            if answer in ("q", "quit"):
                return answered, True
            if answer in ("", "s", "skip"):
                break
            label = parse_label(answer, classes)
            if isinstance(label, int):
                _append(path, [(image, label)])
                answered += 1
                break
            out(f"{answer!r} is not a class: answer with one of {', '.join(classes)} (or its index), "
                f"Enter to skip, q to stop.")
    return answered, False
