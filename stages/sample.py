"""DVC stage `sample`: draw the params' prompts with the trained text-to-image model.

reads:  paths.text2img; paths.eval/metrics.json (the model's evaluation, when there is one); params seed,
        device, sample (prompts, negative prompt, sampler, steps, guidance, seed, batch size)
writes: paths.samples/000.png ...           one PNG per prompt (prompt i drawn with seed sample.seed + i)
        paths.samples/grid.png              all of them, each captioned with its prompt
        paths.samples/prompts.json          which file shows which prompt, how it was drawn, and the model's
                                            evaluation headline (so samples are never read apart from it)

In dvc.yaml the evaluation is a dependency, so `dvc repro sample` evaluates the model before drawing from it.

    python -m stages.sample [--params params.yaml]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from ldm.data.images import tensor_to_pil
from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.evaluation.grids import prompt_sheet
from ldm.models.text_encoder import TextEncoderNotFoundError
from ldm.training.checkpoint import atomic_directory
from stages.params import Params, resolve_device
from stages.reporting import Reporter, StageResult, stage_main

STAGE = "sample"


def load_pipeline(path: str, sampler: str, device: torch.device) -> Text2Image:
    try:
        pipeline = Text2Image.from_pretrained(path, device=device)
    except (FileNotFoundError, TextEncoderNotFoundError, ValueError) as e:
        raise InputError(f"{e} (to train the model: `dvc repro train_unet`)") from None
    pipeline.sampler = sampler
    return pipeline


def evaluation_headline(eval_dir: str, reporter: Reporter) -> dict | None:
    """The `headline` of the model's evaluation in `eval_dir`, or None (said in the log) when it has none."""
    path = Path(eval_dir) / "metrics.json"
    try:
        headline = json.loads(path.read_text())["headline"]
    except FileNotFoundError:
        reporter.info(f"{STAGE}: the model has no evaluation ({path} does not exist; `dvc repro evaluate` makes it)")
        return None
    except (ValueError, KeyError) as e:
        raise InputError(f"{path} is not an evaluation ({e!r}); run `dvc repro evaluate` again") from None
    reporter.info(f"{STAGE}: the model's evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in headline.items()))
    return headline


def run(params: Params, reporter: Reporter) -> StageResult:
    section = params.sample
    device = resolve_device(params.device)
    pipeline = load_pipeline(params.paths.text2img, section.sampler, device)
    headline = evaluation_headline(params.paths.eval, reporter)
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
            width=section.width, height=section.height,
        )
        images.extend(tensor_to_pil(image) for image in drawn.cpu())
        reporter.progress(STAGE, len(images), len(prompts))

    out = Path(params.paths.samples)
    names = [f"{i:03d}.png" for i in range(len(prompts))]
    record = {
        "sampler": section.sampler, "steps": section.steps, "guidance_scale": section.guidance_scale,
        "negative_prompt": section.negative_prompt, "evaluation_headline": headline,
        "width": images[0].width, "height": images[0].height,
        "images": [{"file": n, "prompt": p, "seed": section.seed + i} for i, (n, p) in enumerate(zip(names, prompts))],
    }
    with atomic_directory(out) as tmp:
        for name, image in zip(names, images):
            image.save(tmp / name, format="PNG")
        prompt_sheet(images, prompts).save(tmp / "grid.png", format="PNG")
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
