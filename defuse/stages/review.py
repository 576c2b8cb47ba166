"""``defuse review``: a person's answer on each label issue of a labelled region, image by image, before correct
(and, after it, on the held-out images a candidate repair moved to their label). Not a stage of the run: its
answers reach correct through ``--reviewed-labels`` (``correct.reviewed_labels``). The label issues themselves:
:mod:`defuse.label_issues`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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

    todo = issues_for_review(Regions.load(run.path(REGIONS_JSON)), LabelBook(run.path(LABELS_FILE)).bug_labels(),
                             load_generator(run.path(GENERATOR_CKPT)), ValidityModel.load(run.path(VALIDITY_MODEL)),
                             data, reviewed, image_scores)
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
    items = [(int(row.image), f"{row.split}, labelled {row.given_class!r}; its region says {row.person_class!r}"
              f"{_witnesses(row)}",
              data.split(row.split).images[row.position : row.position + 1].float() / 255)
             for row in todo.itertuples(index=False)]
    answered = review_prompt(items, data.classes, out, ask=ask, out=say)
    say(use)
    return {"to_review": len(todo), "answered": answered, "file": str(out)}


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
    path = Path(path)
    fresh = not path.exists() or path.stat().st_size == 0
    answered = 0
    with open(path, "a", encoding="utf-8") as handle:
        if fresh:
            handle.write("image,label\n")
        out(f"{len(items)} images to review. For each: its class (name or index), Enter to skip, q to stop.")
        for done, (image, about, pixels) in enumerate(items):
            out(render_preview(pixels, columns=1))
            prompt = f"[{done + 1}/{len(items)}] image {image} ({about}). What is it? "
            while True:
                try:
                    answer = ask(prompt).strip()
                except EOFError:  # stdin closed: as good as q
                    return answered
                if answer in ("q", "quit"):
                    return answered
                if answer in ("", "s", "skip"):
                    break
                label = parse_label(answer, classes)
                if isinstance(label, int):
                    handle.write(f"{image},{label}\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    answered += 1
                    break
                out(f"{answer!r} is not a class: answer with one of {', '.join(classes)} (or its index), "
                    f"Enter to skip, q to stop.")
    return answered
