import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from defuse.records import Answer, LabelBook, Region, Regions
from defuse.rundir import RunDir
from defuse.stages.label.labelling import (
    auto_labels,
    file_labels,
    interactive_labels,
    label_stage,
)
from defuse.terminal import render_preview

DIGITS = tuple(str(i) for i in range(10))
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "defuse"
CLASS_LIST = "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"


def make_region(region_id: int, source: int, predicted: int, suggested: int, real_misread: int = 0) -> Region:
    return Region(id=region_id, source_label=source, predicted_label=predicted, pair=f"{source} -> {predicted}",
                  n_failures=10 + region_id, weight=0.25, purity=1.0, error_rate=0.9, flip_rate=0.95, validity=0.8,
                  confidence=0.9, suggested_label=suggested, median_radius=1.0, pair_median_radius=1.0,
                  source_confidence=0.99, coverage=0.5, bug_score=0.65, real_neighbours=20, real_misread=real_misread,
                  mean=[0.0, 0.0], cov=[[1.0, 0.0], [0.0, 1.0]])


def make_regions() -> Regions:
    """Four regions; by their real evidence auto calls #1 (12 of 20 real 7s misread), #3 (5) and #4 (3) bugs, #2 (1)
    not."""
    return Regions([make_region(1, 7, 1, 7, real_misread=12), make_region(2, 4, 9, 4, real_misread=1),
                    make_region(3, 2, 7, 2, real_misread=5), make_region(4, 5, 3, 5, real_misread=3)], {})


def scripted(answers, prompts):
    """An `ask` that records each prompt and plays the answers in order; past the end it is end of input."""
    answers = iter(answers)

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    return ask


def records(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        datetime.fromisoformat(line.pop("time"))
    return lines


# ----------------------------------------------------------------------------- prompt


def test_interactive_labels_answers_commands_undo_and_resume(tmp_path):
    book = LabelBook(tmp_path / "labels.jsonl")
    prompts: list[str] = []
    printed: list[str] = []
    script = ["?", "cat", "12", "7",  # region 1: help, an unknown name, an index out of range, then class 7
              "n",                    # region 2: not a bug
              "u", "s",               # region 3: undo region 2's answer, which asks region 2 again: skip
              "",                     # region 3: Enter takes the suggestion (2)
              "q"]                    # region 4: quit
    answers = interactive_labels(make_regions(), DIGITS, book, ask=scripted(script, prompts), out=printed.append)
    assert {r: (a.label, a.source) for r, a in answers.items()} == {1: (7, "prompt"), 2: ("skip", "prompt"),
                                                                     3: (2, "prompt")}
    # Enter's default is the conservative suggestion: region 2 has 1 real misread of 20, so not-a-bug
    assert prompts == ["label for region #1 [7]: "] * 4 + ["label for region #2 [not-a-bug]: ",
                                                           "label for region #3 [2]: ",
                                                           "label for region #2 [not-a-bug]: ",
                                                           "label for region #3 [2]: ", "label for region #4 [5]: "]
    text = "\n".join(printed)
    assert "n                       not a bug" in text  # the help
    assert (f"'cat' is not a class. Classes (index name): {CLASS_LIST}; "
            f"or n (not a bug), s (skip), u (undo), ? (help), q (quit).") in printed
    assert f"'12' is not a class. Classes (index name): {CLASS_LIST}; " in text
    assert "Region #1 (1 of 4): 7 -> 1 | 11 failures | error rate 0.90 | validity 0.80" in printed
    assert ("suggested: 7 (index 7) (12 of the 20 nearest real audit images of class 7 are read as 1 (at least 3), "
            "and the validity judge reads the region's samples as 7)") in printed
    assert "Undid the answer for region #2." in printed
    assert printed[-1] == (f"Stopped: 3 of 4 regions labelled, saved in {book.path}. "
                           f"Run the same command again to resume at region #4.")
    assert records(book.path) == [
        {"region": 1, "label": 7, "source": "prompt"},
        {"region": 2, "label": "not-a-bug", "source": "prompt"},
        {"region": 2, "undo": True},
        {"region": 2, "label": "skip", "source": "prompt"},
        {"region": 3, "label": 2, "source": "prompt"},
    ]

    prompts.clear()
    again = interactive_labels(make_regions(), DIGITS, LabelBook(book.path), ask=scripted([" 3 "], prompts),
                               out=printed.append)
    assert prompts == ["label for region #4 [5]: "]  # resumed at the first unanswered region
    assert again[4].label == 3 and len(again) == 4
    assert printed[-1] == f"All 4 regions are labelled ({book.path})."
    assert records(book.path)[-1] == {"region": 4, "label": 3, "source": "prompt"}


def test_interactive_labels_take_class_names_and_show_previews(tmp_path):
    book = LabelBook(tmp_path / "labels.jsonl")
    regions = [make_region(1, 0, 1, 0), make_region(2, 1, 2, 1)]
    printed: list[str] = []
    answers = interactive_labels(regions, ("cat", "dog", "bird"), book, ask=scripted(["DOG", "2"], []),
                                 out=printed.append, previews={1: torch.rand(16, 1, 28, 28)},
                                 grid_path=lambda region: tmp_path / f"region_{region:02d}.png")
    assert [answers[1].label, answers[2].label] == [1, 2]  # a name (any case), then an index
    assert sum("\u2580" in text for text in printed) == 1  # region 2 has no preview
    assert f"samples: {tmp_path / 'region_01.png'}" in printed
    assert ("suggested: not-a-bug (0 of the 20 nearest real audit images of class cat are read as dog (fewer than 3): "
            "no real evidence of a bug)") in printed


def test_end_of_input_quits_and_undo_with_nothing_to_undo_asks_again(tmp_path):
    book = LabelBook(tmp_path / "labels.jsonl")
    printed: list[str] = []
    prompts: list[str] = []
    answers = interactive_labels(make_regions(), DIGITS, book, ask=scripted(["u", "1", "u", "u", "2"], prompts),
                                 out=printed.append)
    assert "Nothing to undo." in printed
    assert {r: a.label for r, a in answers.items()} == {1: 2}  # 1 for region 1, undone, then 2 for region 1
    assert prompts[-1] == "label for region #2 [not-a-bug]: "  # then end of input: stop, nothing lost
    assert printed[-1].startswith("Stopped: 1 of 4 regions labelled")


def test_undo_twice_goes_back_two_answers(tmp_path):
    book = LabelBook(tmp_path / "labels.jsonl")
    prompts: list[str] = []
    interactive_labels(make_regions(), DIGITS, book, ask=scripted(["1", "2", "u", "u", "q"], prompts),
                       out=lambda text: None)
    assert book.answers() == {} and book.last_answered() is None
    assert prompts[-1] == "label for region #1 [7]: "


# ----------------------------------------------------------------------------- the book


def test_a_torn_last_line_is_ignored_and_repaired_before_the_next_answer(tmp_path):
    path = tmp_path / "labels.jsonl"
    book = LabelBook(path)
    book.record(1, 7, "prompt")
    book.record(2, "not-a-bug", "file")
    with open(path, "ab") as handle:
        handle.write(b'{"region": 3, "label": 2, "sou')  # killed mid-write
    assert sorted(book.answers()) == [1, 2] and book.last_answered() == 2
    book.record(3, 5, "prompt")
    assert {r: a.label for r, a in book.answers().items()} == {1: 7, 2: "not-a-bug", 3: 5}
    assert len(path.read_text().splitlines()) == 3


def test_a_last_line_without_its_newline_still_counts(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"region": 1, "label": 4, "source": "auto", "time": "2024-01-01T00:00:00+00:00"}')
    book = LabelBook(path)
    assert book.answers() == {1: Answer(1, 4, "auto", "2024-01-01T00:00:00+00:00")}
    book.undo(1)
    assert book.answers() == {} and len(path.read_text().splitlines()) == 2


def test_a_corrupt_line_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"region": 1, "label": 4, "source": "auto", "time": "t"}\nnonsense\n'
                    '{"region": 2, "label": 4, "source": "auto", "time": "t"}\n')
    message = (f"Line 2 of {path} must be a label record like "
               '{"region": 1, "label": 7, "source": "prompt", "time": "..."}, got \'nonsense\' instead '
               "(not JSON: Expecting value: line 1 column 1 (char 0)). Fix or delete that line; "
               "the other answers are kept.")
    with pytest.raises(ValueError, match=re.escape(message)):
        LabelBook(path).answers()


def test_the_book_refuses_bad_answers(tmp_path):
    book = LabelBook(tmp_path / "labels.jsonl")
    with pytest.raises(ValueError, match=re.escape("`label` must be a class index >= 0, 'not-a-bug' or 'skip', "
                                                   "got 'bug' instead.")):
        book.record(1, "bug", "prompt")
    with pytest.raises(ValueError, match=re.escape("`source` must be one of prompt, file, auto, got 'cli' instead.")):
        book.record(1, 3, "cli")
    assert not book.path.exists()


# ----------------------------------------------------------------------------- a real terminal

DRIVER = r"""
import json, sys, types
from types import SimpleNamespace

# Load defuse.label and defuse.rundir without running defuse/__init__.py, which imports torch and Lightning
# (seconds): the prompt itself needs neither, and the test restarts this process several times.
package = types.ModuleType("defuse")
package.__path__ = [sys.argv[1]]
sys.modules["defuse"] = package
from defuse.stages.label.labelling import label_stage
from defuse.rundir import RunDir

def region(i, source, predicted, suggested):
    return SimpleNamespace(id=i, pair=f"{source} -> {predicted}", n_failures=10 + i, error_rate=0.9, validity=0.8,
                           suggested_label=suggested, source_label=source, predicted_label=predicted,
                           real_misread=12, real_neighbours=20)

regions = [region(1, 7, 1, 7), region(2, 4, 9, 4), region(3, 2, 7, 2)]
metrics = label_stage(RunDir(sys.argv[2]), regions, tuple(str(i) for i in range(10)), None, stdin_is_tty=True)
print("DRIVER DONE " + json.dumps(metrics), flush=True)
"""


class Terminal:
    """A process whose stdin, stdout and stderr are a pseudo-terminal; every read has a deadline."""

    def __init__(self, script: Path, run_dir: Path) -> None:
        master, slave = os.openpty()
        self.process = subprocess.Popen([sys.executable, str(script), str(PACKAGE_DIR), str(run_dir)],
                                        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                        start_new_session=True)
        os.close(slave)
        self.master = master
        self.seen = b""
        self.position = 0

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Read until ``text`` appears after what earlier calls consumed; return what came before it."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout
        while wanted not in self.seen[self.position :]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows:\n{self.seen.decode()}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the process has gone and the terminal is closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"the process ended before {text!r}; the terminal shows:\n{self.seen.decode()}")
            self.seen += chunk
        end = self.seen.index(wanted, self.position)
        before = self.seen[self.position : end].decode()
        self.position = end + len(wanted)
        return before

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    terminals: list[Terminal] = []

    def start() -> Terminal:
        terminals.append(Terminal(script, tmp_path / "run"))
        return terminals[-1]

    yield start
    for terminal in terminals:
        terminal.close()


def test_prompt_in_a_real_terminal_quits_and_resumes(driver, tmp_path):
    first = driver()
    shown = first.expect("label for region #1 [7]: ")
    assert "Region #1 (1 of 3): 7 -> 1 | 11 failures | error rate 0.90 | validity 0.80" in shown
    first.send("7")
    first.expect("label for region #2 [4]: ")
    first.send("q")
    first.expect("Run the same command again to resume at region #2.")
    first.expect("DRIVER DONE ")
    assert json.loads(first.expect("\n").strip()) == {"regions": 3, "answered": 1, "bugs": 1, "not_a_bug": 0,
                                                      "skipped": 0, "pending": 2, "mode": "prompt"}
    assert first.wait() == 0

    second = driver()
    shown = second.expect("label for region #")
    assert "Region #2 (2 of 3)" in shown and "Region #1 " not in shown  # resumed at the first unanswered one
    second.expect("2 [4]: ")
    second.send("n")
    second.expect("label for region #3 [2]: ")
    second.send("")  # Enter: the suggestion
    second.expect("All 3 regions are labelled")
    second.expect("DRIVER DONE ")
    assert json.loads(second.expect("\n").strip())["answered"] == 3
    assert second.wait() == 0
    assert records(tmp_path / "run" / "labels.jsonl") == [
        {"region": 1, "label": 7, "source": "prompt"},
        {"region": 2, "label": "not-a-bug", "source": "prompt"},
        {"region": 3, "label": 2, "source": "prompt"},
    ]


def test_killing_the_prompt_loses_no_given_answer(driver, tmp_path):
    terminal = driver()
    terminal.expect("label for region #1 [7]: ")
    terminal.send("1")
    terminal.expect("label for region #2 [4]: ")
    terminal.send("9")
    terminal.expect("label for region #3 [2]: ")
    path = tmp_path / "run" / "labels.jsonl"
    deadline = time.monotonic() + 10
    while len(path.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(terminal.process.pid, signal.SIGKILL)
    assert terminal.wait() == -signal.SIGKILL
    answers = LabelBook(path).answers()
    assert {r: (a.label, a.source) for r, a in answers.items()} == {1: (1, "prompt"), 2: (9, "prompt")}


# ----------------------------------------------------------------------------- files and auto


def test_file_labels_read_json_and_yaml(tmp_path):
    regions = make_regions()
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps({"1": 7, "2": "not-a-bug", "3": "skip", "4": "5"}))
    answers = file_labels(as_json, regions, DIGITS)
    assert {r: a.label for r, a in answers.items()} == {1: 7, 2: "not-a-bug", 3: "skip", 4: 5}
    assert {a.source for a in answers.values()} == {"file"}
    as_yaml = tmp_path / "labels.yaml"
    as_yaml.write_text("1: 7\n3: Not-A-Bug\n")
    assert {r: a.label for r, a in file_labels(as_yaml, regions, DIGITS).items()} == {1: 7, 3: "not-a-bug"}
    named = tmp_path / "named.yaml"
    named.write_text("1: Dog\n2: 0\n")
    two = [make_region(1, 0, 1, 0), make_region(2, 1, 0, 1)]
    assert {r: a.label for r, a in file_labels(named, two, ("cat", "dog")).items()} == {1: 1, 2: 0}


def test_file_labels_refuse_an_unknown_region(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"1": 7, "9": 1}))
    message = (f"Region ids in {path} must be regions of this run (1, 2, 3, 4), got '9' instead. "
               "Remove that entry or re-check regions.json.")
    with pytest.raises(ValueError, match=re.escape(message)):
        file_labels(path, make_regions(), DIGITS)


def test_file_labels_refuse_an_unknown_class(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_text("1: 7\n2: cat\n")
    message = (f"The label of region 2 in {path} must be a class index in [0, 9], a class name ({CLASS_LIST}), "
               "'not-a-bug' or 'skip', got 'cat' instead.")
    with pytest.raises(ValueError, match=re.escape(message)):
        file_labels(path, make_regions(), DIGITS)
    path.write_text("1: 10\n")
    with pytest.raises(ValueError, match=re.escape("got 10 instead.")):
        file_labels(path, make_regions(), DIGITS)


def test_file_labels_refuse_a_file_that_is_no_mapping(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_text("- 7\n- 1\n")
    message = f"{path} must map region ids to labels, e.g. {{1: 7, 2: not-a-bug}}, got a list instead."
    with pytest.raises(ValueError, match=re.escape(message)):
        file_labels(path, make_regions(), DIGITS)
    with pytest.raises(FileNotFoundError, match=re.escape(f"Labels file {tmp_path / 'nope.yaml'} does not exist.")):
        file_labels(tmp_path / "nope.yaml", make_regions(), DIGITS)


def test_auto_labels_a_bug_only_on_real_evidence_and_the_judge_and_says_why():
    regions = Regions([*make_regions().regions, make_region(5, 2, 7, 7, real_misread=5)], {})
    answers = auto_labels(regions, DIGITS)
    assert {r: (a.label, a.source) for r, a in answers.items()} == {
        1: (7, "auto"), 2: ("not-a-bug", "auto"), 3: (2, "auto"), 4: (5, "auto"), 5: ("not-a-bug", "auto")}
    assert answers[1].reason == ("12 of the 20 nearest real audit images of class 7 are read as 1 (at least 3), and "
                                 "the validity judge reads the region's samples as 7")
    assert answers[2].reason == ("1 of the 20 nearest real audit images of class 4 are read as 9 (fewer than 3): "
                                 "no real evidence of a bug")
    assert answers[5].reason == ("5 of the 20 nearest real audit images of class 2 are read as 7, but the validity "
                                 "judge reads the region's samples as 7, not 2")
    stricter = auto_labels(make_regions(), DIGITS, min_real_misread=4)
    assert stricter[4].label == "not-a-bug" and stricter[1].label == 7


def test_without_a_terminal_nothing_is_labelled_and_the_notice_says_how(tmp_path, caplog):
    run = RunDir(tmp_path)

    def never(prompt: str) -> str:
        raise AssertionError("asked without a terminal")

    def no_previews():
        raise AssertionError("previews drawn with nobody to look at them")

    metrics = label_stage(run, make_regions(), DIGITS, None, ask=never, out=lambda text: None, stdin_is_tty=False,
                          previews=no_previews)
    assert metrics == {"regions": 4, "answered": 0, "bugs": 0, "not_a_bug": 0, "skipped": 0, "pending": 4,
                       "mode": "prompt"}
    assert (tmp_path / "labels.jsonl").read_text() == ""  # the record later stages read, empty
    assert f"4 of 4 regions await a label, and nothing is repaired until a person gives them. Label them in a " \
           f"terminal: `defuse label --run-dir {tmp_path}`" in caplog.text
    assert f"`defuse run --run-dir {tmp_path} --labels auto`" in caplog.text


def test_later_asks_nobody_even_at_a_terminal_and_keeps_the_answers_given(tmp_path):
    run = RunDir(tmp_path)
    LabelBook(run.path("labels.jsonl")).record(2, 4, "prompt")

    def never(prompt: str) -> str:
        raise AssertionError("later asks nobody")

    metrics = label_stage(run, make_regions(), DIGITS, "later", ask=never, out=lambda text: None, stdin_is_tty=True)
    assert metrics["mode"] == "later" and metrics["answered"] == 1 and metrics["pending"] == 3


def test_auto_keeps_given_answers_records_reasons_and_a_prompt_asks_auto_answered_regions_again(tmp_path):
    run = RunDir(tmp_path)
    book = LabelBook(run.path("labels.jsonl"))
    book.record(2, 4, "prompt")
    metrics = label_stage(run, make_regions(), DIGITS, "auto", out=lambda text: None)
    assert metrics["not_a_bug"] == 0 and metrics["bugs"] == 4 and len(records(book.path)) == 4
    written = records(book.path)
    assert "reason" not in written[0] and all(line["reason"] for line in written[1:])
    assert LabelBook(book.path).answers()[3].reason.startswith("5 of the 20 nearest")  # read back from the file
    assert book.answers()[2].reason is None  # a person's answer needs no reason
    prompts: list[str] = []
    metrics = label_stage(run, make_regions(), DIGITS, "prompt", ask=scripted(["1", "q"], prompts),
                          out=lambda text: None, stdin_is_tty=True)
    assert prompts == ["label for region #1 [7]: ", "label for region #3 [2]: "]
    assert book.answers()[1].label == 1 and metrics["mode"] == "prompt"


def test_a_labels_file_replaces_earlier_answers_once(tmp_path):
    run = RunDir(tmp_path)
    label_stage(run, make_regions(), DIGITS, "auto", out=lambda text: None)
    file = tmp_path / "mine.yaml"
    file.write_text("1: not-a-bug\n2: 4\n")
    printed: list[str] = []
    metrics = label_stage(run, make_regions(), DIGITS, str(file), out=printed.append)
    assert metrics == {"regions": 4, "answered": 4, "bugs": 3, "not_a_bug": 1, "skipped": 0, "pending": 0,
                       "mode": "file", "labels_file": str(file)}
    assert len(records(run.path("labels.jsonl"))) == 6  # 4 auto, then the file's 2 (replacing auto answers)
    label_stage(run, make_regions(), DIGITS, file, out=printed.append)
    assert len(records(run.path("labels.jsonl"))) == 6  # the same file again appends nothing
    assert printed[-1] == f"file: 0 answers recorded, 2 already standing ({run.path('labels.jsonl')})."


def test_answers_for_other_regions_are_moved_aside_not_lost(tmp_path):
    run = RunDir(tmp_path)
    label_stage(run, make_regions(), DIGITS, "auto", out=lambda text: None, regions_sha256="a" * 64)
    before = run.path("labels.jsonl").read_text()
    label_stage(run, make_regions(), DIGITS, "auto", out=lambda text: None, regions_sha256="a" * 64)
    assert not list(tmp_path.glob("labels.before-*.jsonl"))  # the same regions: answers stand
    metrics = label_stage(run, make_regions(), DIGITS, None, out=lambda text: None, stdin_is_tty=False,
                          regions_sha256="b" * 64)
    (aside,) = tmp_path.glob("labels.before-*.jsonl")
    assert aside.read_text() == before and metrics["pending"] == 4


def test_classes_must_cover_the_suggestions(tmp_path):
    message = ("`classes` must name every class the regions use, got 3 classes but region #1 suggests class 7 "
               "instead. Pass the classes of regions.json.")
    with pytest.raises(ValueError, match=re.escape(message)):
        label_stage(RunDir(tmp_path), make_regions(), ("a", "b", "c"), "auto")


# ----------------------------------------------------------------------------- preview


def test_render_preview_draws_half_blocks_in_rows():
    images = torch.rand(5, 1, 28, 28)
    lines = render_preview(images, columns=2).split("\n")
    assert len(lines) == 3 * 8 + 2  # 3 rows of images, 16 px high = 8 text lines each, a blank line between rows
    assert lines[8] == "" and lines[17] == ""
    assert all(line.endswith("\x1b[0m") for line in lines if line)
    assert lines[0].count("\u2580") == 2 * 16 and lines[-1].count("\u2580") == 16  # the last row holds 1 image


def test_render_preview_colours_and_odd_heights():
    white_over_black = torch.zeros(1, 3, 5, 7)
    white_over_black[:, :, 0] = 1.0
    lines = render_preview(white_over_black).split("\n")
    assert len(lines) == 3  # 5 pixel rows: 3 text lines, the last half empty
    assert lines[0].startswith("\x1b[38;2;255;255;255m\x1b[48;2;0;0;0m\u2580")
    assert "\x1b[49m" in lines[2] and "\x1b[49m" not in lines[0]
    sixteen = render_preview(torch.rand(16, 3, 32, 20), columns=8).split("\n")
    assert len(sixteen) == 2 * 8 + 1 and sixteen[0].count("\u2580") == 8 * 10


def test_render_preview_refuses_other_shapes():
    with pytest.raises(ValueError, match=re.escape("`images` must be a (N, C, H, W) tensor with C = 1 or 3, "
                                                   "got (2, 2, 8, 8) instead.")):
        render_preview(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match=re.escape("`columns` must be an int >= 1, got 0 instead.")):
        render_preview(torch.rand(2, 1, 8, 8), columns=0)


@pytest.mark.parametrize("terminal, per_row", [(120, 7), (80, 4), (16, 1), (10, 1), (200, 11)])
def test_previews_fill_the_terminal_width_and_never_wrap(terminal, per_row, tmp_path):
    """28x28 samples are drawn 16 characters wide plus a space: 7 fit in 120 columns (8 would wrap)."""
    previews = {region.id: torch.rand(16, 1, 28, 28) for region in make_regions().regions}
    printed: list[str] = []
    interactive_labels(make_regions(), DIGITS, LabelBook(tmp_path / "labels.jsonl"), ask=scripted(["q"], []),
                       out=printed.append, previews=previews, terminal_columns=terminal, terminal_lines=200)
    drawn = next(text for text in printed if "\u2580" in text).split("\n")
    visible = [len(re.sub(r"\x1b\[[0-9;]*m", "", line)) for line in drawn]
    assert max(visible) == per_row * 17 - 1 and (max(visible) <= terminal or per_row == 1)
    assert visible.count(0) == -(-16 // per_row) - 1  # one blank line between rows of previews


@pytest.mark.parametrize("columns,lines,shown", [(80, 24, 4), (120, 30, 14), (80, 60, 16)])
def test_a_region_with_its_previews_and_prompt_fits_the_terminal_so_its_header_stays_on_screen(
        columns, lines, shown, tmp_path):
    """At 80x24 a region's header, previews, paths, suggestion and prompt all fit on one screen."""
    from dataclasses import replace

    regions = Regions([replace(region, real_nearest=[4, 9, 2], real_nearest_read=[1, 1, 7], label_doubt=0.59,
                               doubted_nearest=[3, 8, 5], doubted_nearest_read=[7, 7, 1])
                       for region in make_regions().regions], {})
    previews = {region.id: torch.rand(16, 1, 28, 28) for region in regions.regions}
    printed: list[str] = []
    prompts: list[str] = []
    interactive_labels(regions, DIGITS, LabelBook(tmp_path / "labels.jsonl"), ask=scripted(["n", "q"], prompts),
                       out=printed.append, previews=previews, terminal_columns=columns, terminal_lines=lines,
                       grid_path=lambda region: f"runs/my-long-project-name/regions/region_{region:02d}.png",
                       real_grid_path=lambda region: f"runs/my-long-project-name/regions/region_{region:02d}_real.png",
                       doubted_grid_path=lambda region: f"runs/my-long-project-name/regions/region_{region:02d}_doubted.png")
    assert any(text.startswith("training images labelled 7 near it, hardest to learn first (read: 7, 7, 1): runs/")
               for text in printed)
    second = max(i for i, text in enumerate(printed) if text.startswith("Region #"))
    screen = [*printed[second - 2:], prompts[-1]]  # the first region's answer, then all the second region shows
    visible = [re.sub(r"\x1b\[[0-9;]*m", "", line) for text in screen for line in text.split("\n")]
    assert sum(max(1, -(-len(line) // columns)) for line in visible) <= lines
    drawn = next(text for text in screen if "\u2580" in text).split("\n")
    per_row = max(1, (columns + 1) // 17)
    rows = sum(1 for line in drawn if not line) + 1
    assert min(16, rows * per_row) == shown  # as many previews as fit, never fewer than a row


def test_answering_the_models_own_reading_says_the_labels_around_the_region_are_suspect(tmp_path):
    from dataclasses import replace

    regions = Regions([replace(make_region(1, 1, 7, 7, real_misread=3), real_nearest=[4, 9, 2],
                               real_nearest_read=[1, 1, 7])], {})
    printed: list[str] = []
    answers = interactive_labels(regions, DIGITS, LabelBook(tmp_path / "labels.jsonl"), ask=scripted(["7"], []),
                                 out=printed.append, real_grid_path=lambda region: f"regions/region_{region:02d}_real.png")
    assert answers[1].label == 7 and answers[1].is_bug  # a class: recorded as the person gave it
    text = "\n".join(printed)
    assert "real images nearest it labelled 1 (the classifier reads: 1, 1, 7): regions/region_01_real.png" in text
    assert ("region #1: 7 (index 7) (the classifier already reads these as 7: nothing to fine-tune here, but the "
            "real images labelled 1 within this region's reach are listed as label issues for review") in text
    printed.clear()
    interactive_labels(make_regions(), DIGITS, LabelBook(tmp_path / "other.jsonl"), ask=scripted(["7", "q"], []),
                       out=printed.append)
    assert not any("already reads these" in line for line in printed)  # 7 for a "7 -> 1" region: a bug to fix


def test_a_region_whose_training_labels_were_hard_to_learn_says_so_at_the_prompt(tmp_path):
    """The label doubt (training margins around the region) is shown where it is above 0; without margins (None) or
    with none (0) the line is left out."""
    from dataclasses import replace

    doubted, easy, unknown = (replace(make_region(i, 7, 1, 7), label_doubt=d) for i, d in ((1, 0.59), (2, 0.0), (3, None)))
    printed: list[str] = []
    interactive_labels(Regions([doubted, easy, unknown], {}), DIGITS, LabelBook(tmp_path / "labels.jsonl"),
                       ask=scripted(["n", "n", "n"], []), out=printed.append)
    doubt_lines = [text for text in printed if text.startswith("label doubt")]
    assert doubt_lines == ["label doubt 0.59: training labels of 7 and 1 near it were hard to learn"]
