"""The report's own plots, drawn with matplotlib from figures the stages wrote (never from a model)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from defuse.records import ClassChange


def per_class_figure(per_class: dict[str, ClassChange]) -> bytes | None:
    """A bar per class: test accuracy change after the repair, in points (PNG bytes); None before a repair."""
    rows = [(name, c["change"]) for name, c in per_class.items() if c.get("change") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, changes = zip(*rows)
    points = [100 * c for c in changes]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 2.6), dpi=110)
    ax.bar(range(len(names)), points, color=["#b2182b" if p < 0 else "#2166ac" for p in points])
    ax.axhline(0, color="#333333", linewidth=0.8)
    ax.set_xticks(range(len(names)), [str(n) for n in names], fontsize=8)
    ax.set_ylabel("accuracy change (points)", fontsize=8)
    ax.set_title("Per-class test accuracy, after minus before", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
