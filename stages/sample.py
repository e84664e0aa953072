"""DVC stage `sample`: draw the params' prompts with the trained text-to-image model.

reads:  paths.text2img; params seed, device, sample (prompts, negative prompt, sampler, steps, guidance, seed,
        batch size)
writes: paths.samples/000.png ...           one PNG per prompt (prompt i drawn with seed sample.seed + i)
        paths.samples/grid.png              all of them, each captioned with its prompt
        paths.samples/prompts.json          which file shows which prompt, and how it was drawn

    python -m stages.sample [--params params.yaml]
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldm.data.images import tensor_to_pil
from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.models.text_encoder import TextEncoderNotFoundError
from ldm.training.checkpoint import atomic_directory
from stages.params import Params, resolve_device
from stages.reporting import Reporter, StageResult, stage_main

STAGE = "sample"
CELL = 128  # the grid shows each image at least this wide, so 32x32 samples are visible
CAPTION_LINES = 6  # a two-object caption wraps to five lines at CELL pixels


def load_pipeline(path: str, sampler: str, device: torch.device) -> Text2Image:
    try:
        pipeline = Text2Image.from_pretrained(path, device=device)
    except (FileNotFoundError, TextEncoderNotFoundError, ValueError) as e:
        raise InputError(f"{e} (to train the model: `dvc repro train_unet`)") from None
    pipeline.sampler = sampler
    return pipeline


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Images upscaled (nearest) to CELL pixels, each above its wrapped caption, `columns` to a row."""
    scale = max(1, CELL // images[0].width)
    width, height = images[0].width * scale, images[0].height * scale
    chars = max(8, width // 6)  # PIL's default bitmap font is about 6 pixels per character
    text_height = 11 * CAPTION_LINES + 4
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (width + 4) + 4, rows * (height + text_height + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = 4 + (i % columns) * (width + 4)
        y = 4 + (i // columns) * (height + text_height + 4)
        grid.paste(image.resize((width, height), Image.NEAREST), (x, y))
        # A grey frame: the images' white background would otherwise run into the grid's.
        draw.rectangle((x - 1, y - 1, x + width, y + height), outline="gray")
        lines = textwrap.wrap(caption, chars)[:CAPTION_LINES]
        draw.multiline_text((x, y + height + 2), "\n".join(lines), fill="black", spacing=1)
    return grid


def run(params: Params, reporter: Reporter) -> StageResult:
    section = params.sample
    device = resolve_device(params.device)
    pipeline = load_pipeline(params.paths.text2img, section.sampler, device)
    prompts = section.prompts
    reporter.info(
        f"{STAGE}: {len(prompts)} prompts, {section.sampler} {section.steps} steps, guidance {section.guidance_scale}"
        f"{f', negative prompt {section.negative_prompt!r}' if section.negative_prompt else ''}, on {device}"
    )
    images: list[Image.Image] = []
    for start in range(0, len(prompts), section.batch_size):
        chunk = prompts[start : start + section.batch_size]
        # One seed per prompt (seed + index), so a prompt's image does not depend on the batch it falls in.
        drawn = pipeline(
            chunk, negative_prompt=section.negative_prompt, steps=section.steps,
            guidance_scale=section.guidance_scale, seed=[section.seed + start + i for i in range(len(chunk))],
        )
        images.extend(tensor_to_pil(image) for image in drawn.cpu())
        reporter.progress(STAGE, len(images), len(prompts))

    out = Path(params.paths.samples)
    names = [f"{i:03d}.png" for i in range(len(prompts))]
    record = {
        "sampler": section.sampler, "steps": section.steps, "guidance_scale": section.guidance_scale,
        "negative_prompt": section.negative_prompt,
        "images": [{"file": n, "prompt": p, "seed": section.seed + i} for i, (n, p) in enumerate(zip(names, prompts))],
    }
    with atomic_directory(out) as tmp:
        for name, image in zip(names, images):
            image.save(tmp / name, format="PNG")
        captioned_grid(images, prompts).save(tmp / "grid.png", format="PNG")
        (tmp / "prompts.json").write_text(json.dumps(record, indent=2) + "\n")
    reporter.info(f"{STAGE}: wrote {len(images)} images and grid.png to {out}")
    return StageResult(metrics={"images": float(len(images))}, artifacts=[out])


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Draw the params' prompts with the trained text-to-image model.", run,
        lambda r: f"wrote {int(r.metrics['images'])} images to {r.artifacts[0]}", argv,
    )


if __name__ == "__main__":
    sys.exit(main())
