"""What every benchmark script shares: progress lines on stderr, the JSON result on stdout (and in a file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def progress(label: str, figures: Any) -> None:
    """One line of partial results on stderr, so a long benchmark shows where it is."""
    print(f"[{label}] {json.dumps(figures)}", file=sys.stderr, flush=True)


def emit(result: Any, out: str | None) -> int:
    """Print ``result`` as JSON on stdout and, with ``out``, write it there too; the script's exit code."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0
