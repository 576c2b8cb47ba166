"""Images in a terminal: half-block characters with 24-bit colour, two pixels a character cell, sized to fit.

Used by the prompts that show a person images (``defuse label``, ``defuse review``). Imports torch only when it
draws, so a prompt starts at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_RESET = "\x1b[0m"
_UPPER_HALF = "\u2580"  # "▀": foreground paints the upper pixel, background the lower one


def render_preview(images: torch.Tensor, columns: int = 8, *, max_side: int = 16) -> str:
    """Draw images in a terminal with upper half blocks and 24-bit ANSI colour.

    Each character cell shows two pixels: its foreground the upper row, its background the
    lower one. Images are downscaled (area interpolation) to at most ``max_side`` pixels a
    side, laid side by side ``columns`` to a row with one space between them and one blank
    line between rows; an odd height leaves the last cell's lower half in the terminal's
    own background. Every line ends with a colour reset.

    Args:
        images: ``(N, C, H, W)`` floats in [0, 1], C = 1 or 3.
        columns: images per row.
        max_side: the largest side, in pixels, of a drawn image.

    Returns:
        The lines joined by ``"\\n"`` (no trailing newline): ``ceil(N / columns)`` rows of
        ``ceil(h / 2)`` lines each, plus the blank lines between rows, where h is the drawn height.
    """
    import torch
    import torch.nn.functional as F

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (N, C, H, W) tensor with C = 1 or 3, got {shape} instead.")
    if not images.is_floating_point():
        raise ValueError(f"`images` must hold floats in [0, 1], got {images.dtype} instead. Divide uint8 images by 255.")
    if not _is_int(columns) or columns < 1:
        raise ValueError(f"`columns` must be an int >= 1, got {columns!r} instead.")
    if not _is_int(max_side) or max_side < 1:
        raise ValueError(f"`max_side` must be an int >= 1, got {max_side!r} instead.")
    n, channels, height, width = images.shape
    if n == 0 or height == 0 or width == 0:
        return ""
    x = torch.nan_to_num(images.detach().float().cpu())
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x, size=size, mode="area")
    x = x.clamp(0, 1).mul(255).round().to(torch.uint8)
    if channels == 1:
        x = x.expand(-1, 3, -1, -1)
    pixels = x.permute(0, 2, 3, 1).tolist()  # (N, h, w, 3) nested lists of ints
    drawn_height = x.shape[2]
    lines: list[str] = []
    for start in range(0, n, columns):
        if start:
            lines.append("")
        block = pixels[start : start + columns]
        for top in range(0, drawn_height, 2):
            cells = [_cell_row(image[top], image[top + 1] if top + 1 < drawn_height else None) for image in block]
            lines.append(" ".join(cells))
    return "\n".join(lines)


def _cell_row(upper: list[list[int]], lower: list[list[int]] | None) -> str:
    """One text line of one image: colour codes only where the colours change, then a reset."""
    out = []
    previous = None
    for i, top in enumerate(upper):
        bottom = None if lower is None else lower[i]
        if (top, bottom) != previous:
            background = "\x1b[49m" if bottom is None else "\x1b[48;2;{};{};{}m".format(*bottom)
            out.append("\x1b[38;2;{};{};{}m".format(*top) + background)
            previous = (top, bottom)
        out.append(_UPPER_HALF)
    return "".join(out) + _RESET


def preview_columns(images: torch.Tensor, terminal_columns: int, max_side: int = 16) -> int:
    """How many previews of ``images`` fit side by side in ``terminal_columns`` characters (at least 1).

    A preview is as many characters wide as its drawn width (at most ``max_side``), plus one space between two.
    """
    height, width = int(images.shape[-2]), int(images.shape[-1])
    drawn = width if max(height, width) <= max_side else max(1, round(width * max_side / max(height, width)))
    return max(1, (int(terminal_columns) + 1) // (drawn + 1))


def preview_rows(images: torch.Tensor, lines: int, max_side: int = 16) -> int:
    """How many rows of previews of ``images`` fit in ``lines`` terminal lines (at least 1): each row is half its
    drawn height in lines (two pixels a character), with a blank line between two rows."""
    height, width = int(images.shape[-2]), int(images.shape[-1])
    drawn = height if max(height, width) <= max_side else max(1, round(height * max_side / max(height, width)))
    return max(1, (int(lines) + 1) // (-(-drawn // 2) + 1))


# Lines a region shows besides its previews, at 80 columns: a blank line, the header, the samples' path and the
# real images' path (up to two lines each), the suggestion, the prompt and the answer to the region before.


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
