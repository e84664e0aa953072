"""Pictures a person reads: images in rows of the same prompts, upscaled so a 32 px image is legible, with each
column's caption under it and each row's label beside it."""

from __future__ import annotations

import textwrap

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ldm.data.images import tensor_to_pil

MIN_CELL = 128  # pixels: smaller images are upscaled by a whole factor until their shorter side reaches it
_PAD = 4
_FONT_SIZE = 11
_CAPTION_LINES = 4
_LABEL_WIDTH = 96


def upscale_factor(height: int, width: int, min_cell: int = MIN_CELL) -> int:
    """The whole factor that brings the shorter side to at least `min_cell` (1 for images that are already)."""
    return max(1, -(-min_cell // min(height, width)))


def captioned_grid(
    rows: list[torch.Tensor], captions: list[str] | None = None, row_labels: list[str] | None = None,
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """`rows`: tensors (N, 3, H, W) in [-1, 1] of equal shape, column i of each showing prompt i. Upscaled by
    nearest neighbour (no invented detail), with `captions[i]` wrapped under column i and `row_labels[r]`
    to the left of row r."""
    if not rows or any(r.shape != rows[0].shape for r in rows):
        raise ValueError(f"captioned_grid needs rows of one shape, got {[tuple(r.shape) for r in rows]}")
    count, _, height, width = rows[0].shape
    if captions is not None and len(captions) != count:
        raise ValueError(f"captioned_grid got {len(captions)} captions for {count} columns")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"captioned_grid got {len(row_labels)} row labels for {len(rows)} rows")
    factor = upscale_factor(height, width, min_cell)
    cell_h, cell_w = height * factor, width * factor
    font = ImageFont.load_default(size=_FONT_SIZE)
    line_height = _FONT_SIZE + 3
    chars_per_line = max(8, cell_w // (_FONT_SIZE * 6 // 10))
    wrapped = [
        textwrap.wrap(c, chars_per_line, max_lines=_CAPTION_LINES, placeholder=" ...") for c in (captions or [])
    ]
    caption_h = (max((len(w) for w in wrapped), default=0) * line_height + _PAD) if captions else 0
    label_w = _LABEL_WIDTH if row_labels else 0

    sheet = Image.new(
        "RGB",
        (label_w + count * (cell_w + _PAD) + _PAD, len(rows) * (cell_h + _PAD) + _PAD + caption_h),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = _PAD + r * (cell_h + _PAD)
        big = F.interpolate(row.detach().float().cpu(), scale_factor=factor, mode="nearest") if factor > 1 else row
        for i in range(count):
            sheet.paste(tensor_to_pil(big[i]), (label_w + _PAD + i * (cell_w + _PAD), top))
        if row_labels:
            label = textwrap.wrap(row_labels[r], _LABEL_WIDTH // (_FONT_SIZE * 6 // 10)) or [""]
            draw.multiline_text((_PAD, top + cell_h // 2 - len(label) * line_height // 2), "\n".join(label),
                                fill="black", font=font, spacing=3)
    for i, lines in enumerate(wrapped):
        draw.multiline_text((label_w + _PAD + i * (cell_w + _PAD), len(rows) * (cell_h + _PAD) + _PAD),
                            "\n".join(lines), fill="black", font=font, spacing=3)
    return sheet


def notice(text: str, width: int = 480) -> Image.Image:
    """A picture that says why there is nothing to show, for a declared plot whose subject did not exist."""
    font = ImageFont.load_default(size=14)
    lines = textwrap.wrap(text, width // 8)
    sheet = Image.new("RGB", (width, (len(lines) + 2) * 20), "white")
    ImageDraw.Draw(sheet).multiline_text((16, 20), "\n".join(lines), fill="black", font=font, spacing=6)
    return sheet
