"""The README is a user's first contact: it stays short, and every command, config key, config block, code sample
and link in it is checked here against the code, so none of them rots while the code moves.

What these checks leave to other tests: running the commands. ``defuse run`` (unattended, then resumed with
labels), ``defuse label``, ``defuse review`` and ``--labels auto`` run end to end in tests/test_cli.py and
tests/test_pipeline.py; the examples the README links run in tests/test_examples.py.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from defuse.cli import build_parser
from defuse.config import RunConfig, config_from_mapping

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Words the README writes in capitals for "your value here", and what stands in for each when parsing.
PLACEHOLDERS = {"FILE": "labels.yaml", "STAGE": "distill", "DIR": "runs/digits", "PATH": "model.pt"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def readme_commands() -> list[str]:
    """Every ``defuse ...`` command: the lines of bash blocks and the inline code spans, comments stripped."""
    lines = [line.split("  #")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    inline = re.findall(r"`(defuse [^`]*)`", README)
    commands = [c for c in [*lines, *inline] if c.startswith("defuse")]
    return sorted({c.replace("</dev/null", "").strip() for c in commands if "SUBCOMMAND" not in c})


def test_the_readme_is_short_and_begins_with_the_two_commands():
    assert len(README.splitlines()) <= 250
    first = blocks("bash")[0].splitlines()
    assert first == ["pip install -c constraints.txt -e . && defuse run",
                     "pip install -c constraints.txt -e '.[test]' && pytest"]
    assert (ROOT / ".ci" / "run").read_text().count("pytest") >= 1  # CI runs the second command's tests


@pytest.mark.parametrize("command", readme_commands())
def test_every_defuse_command_in_the_readme_parses(command):
    words = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    try:
        build_parser().parse_args(words)
    except SystemExit as exit:  # argparse exits 0 for --help, 2 for a command that does not exist
        assert exit.code == 0 and "--help" in words, f"`{command}` does not parse"


def test_every_config_key_the_readme_names_exists():
    """Keys written as `section.key` or `section.key: value` are keys of the config, with the documented name."""
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    files = {"ckpt", "pt", "json", "jsonl", "png", "yaml", "csv", "html", "md", "npz", "parquet", "safetensors", "py"}
    named = {(section, key) for section, key in re.findall(r"`([a-z]+)\.([a-z_]+)(?:[:=][^`]*)?`", README)
             if key not in files and f"{section}.{key}" != "trainer.fit"}  # a file; Lightning's Trainer.fit
    config = RunConfig()
    checked = 0
    for section, key in named:
        if section in sections and dataclasses.is_dataclass(getattr(config, section)):
            assert hasattr(getattr(config, section), key), f"`{section}.{key}` in the README is no config key"
            checked += 1
    assert checked >= 3  # classifier.torchscript, classifier.factory, classifier.weights


def test_the_readme_config_block_is_a_valid_config():
    (block,) = blocks("yaml")
    config = config_from_mapping(yaml.safe_load(block), origin="the README's config block")
    assert config.data.source == "folder" and config.name == "my-run"


def test_the_readme_python_sample_compiles_and_calls_scan_as_it_is():
    import inspect

    import defuse

    (sample,) = blocks("python")
    compile(sample, "README.md", "exec")
    parameters = inspect.signature(defuse.scan).parameters
    for call in re.findall(r"defuse\.scan\(([^)]*)\)", sample):
        for keyword in re.findall(r"(\w+)=", call):
            assert keyword in parameters, f"defuse.scan has no parameter {keyword!r}"


def test_every_relative_link_in_the_readme_points_at_a_file_in_the_repository():
    links = [target for target in re.findall(r"\]\(([^)#]+)\)", README) if not target.startswith("http")]
    assert links  # the report picture, the docs, the examples, the benchmark records
    missing = [target for target in links if not (ROOT / target).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
