"""Pictures a person reads, upscaled so a 32 px image is legible and captioned: rows of the same prompts
(a caption under each column, a label beside each row), or a sheet of different prompts, each image above
its own caption."""

from __future__ import annotations

import textwrap

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ldm.data.images import tensor_to_pil

MIN_CELL = 128  # pixels: smaller images are upscaled by a whole factor until their shorter side reaches it
_PAD = 4
_FONT_SIZE = 11
_CAPTION_LINES = 6  # a two-object shapes caption takes five lines at 128 pixels
_LABEL_WIDTH = 96


def upscale_factor(height: int, width: int, min_cell: int = MIN_CELL) -> int:
    """The whole factor that brings the shorter side to at least `min_cell` (1 for images that are already)."""
    return max(1, -(-min_cell // min(height, width)))


def on_white(images: list[torch.Tensor], side: int) -> torch.Tensor:
    """Images (3, h, w) in [-1, 1], each at most side x side, centred on white squares. -> (N, 3, side, side)"""
    canvas = torch.ones(len(images), 3, side, side)
    for tile, image in zip(canvas, images):
        h, w = image.shape[-2:]
        top, left = (side - h) // 2, (side - w) // 2
        tile[:, top : top + h, left : left + w] = image
    return canvas


def at_own_shapes(images: torch.Tensor, sizes: list[tuple[int, int]] | None) -> torch.Tensor:
    """Square canvas images (N, 3, S, S), each squashed from its own (width, height) (`ldm.data.buckets.to_square`,
    which measures compare on), shown back in those proportions with the longer side S, centred on white: how a
    grid shows the images of aspect-ratio buckets. None or all-square sizes: the images as they are."""
    if sizes is None or all(w == h for w, h in sizes):
        return images
    side = images.shape[-1]
    shown = []
    for image, (w, h) in zip(images, sizes):
        scale = side / max(w, h)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        shown.append(F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return on_white(shown, side)


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
    wrapped = [
        textwrap.wrap(c, _chars_per_line(cell_w), max_lines=_CAPTION_LINES, placeholder=" ...")
        for c in (captions or [])
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


def prompt_sheet(images: list[Image.Image], captions: list[str], columns: int = 4,
                 min_cell: int = MIN_CELL) -> Image.Image:
    """Images of different prompts, `columns` to a row, each upscaled (nearest) and above its wrapped caption."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"prompt_sheet needs one caption per image, got {len(images)} and {len(captions)}")
    factor = upscale_factor(images[0].height, images[0].width, min_cell)
    width, height = images[0].width * factor, images[0].height * factor
    font = ImageFont.load_default(size=_FONT_SIZE)
    line_height = _FONT_SIZE + 3
    wrapped = [textwrap.wrap(c, _chars_per_line(width), max_lines=_CAPTION_LINES, placeholder=" ...")
               for c in captions]
    text_height = max(len(w) for w in wrapped) * line_height + _PAD
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (width + _PAD) + _PAD, rows * (height + text_height + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x = _PAD + (i % columns) * (width + _PAD)
        y = _PAD + (i // columns) * (height + text_height + _PAD)
        sheet.paste(image.resize((width, height), Image.NEAREST), (x, y))
        # A grey frame: the images' white background would otherwise run into the sheet's.
        draw.rectangle((x - 1, y - 1, x + width, y + height), outline="gray")
        draw.multiline_text((x, y + height + 2), "\n".join(lines), fill="black", font=font, spacing=3)
    return sheet


def _chars_per_line(width: int) -> int:
    return max(8, width // (_FONT_SIZE * 6 // 10))


def notice(text: str, width: int = 480) -> Image.Image:
    """A picture that says why there is nothing to show, for a declared plot whose subject did not exist."""
    font = ImageFont.load_default(size=14)
    lines = textwrap.wrap(text, width // 8)
    sheet = Image.new("RGB", (width, (len(lines) + 2) * 20), "white")
    ImageDraw.Draw(sheet).multiline_text((16, 20), "\n".join(lines), fill="black", font=font, spacing=6)
    return sheet
