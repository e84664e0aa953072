"""What the measuring stages share (evaluate, finetune_lora, train_controlnet): the real images of an ingested
split, prompts drawn in batches, and the attribute classifier fitted to real shapes images."""

from __future__ import annotations

import json

import numpy as np
import torch

from ldm.data.buckets import Size, png_size, to_square
from ldm.data.images import png_to_tensor
from ldm.data.ingested import IngestedDataError, read_table
from ldm.data.shapes import Scene
from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.evaluation.attributes import (
    AttributeClassifier,
    AttributeClassifierConfig,
    train_attribute_classifier,
)
from stages.reporting import REBUILD_INGESTED, Reporter


class RealImages:
    """Decoded images of one ingested split with their captions and, for shapes data, their scenes.

    `images` are on a `canvas` x `canvas` square (the training image_size): images of aspect-ratio buckets are
    squashed onto it (`to_square`), and `sizes` keeps each one's own (width, height) to draw its caption at."""

    def __init__(self, directory: str, split: str, limit: int | None, seed: int, canvas: int):
        try:
            table = read_table(directory, split, columns=["image", "caption", "attributes"])
        except (FileNotFoundError, IngestedDataError) as e:
            raise InputError(f"{e} ({REBUILD_INGESTED})") from None
        if table.num_rows == 0:
            raise InputError(f"the ingested data in {directory} has no {split!r} rows; ingest more data")
        self.all_captions = set(table.column("caption").to_pylist())  # the whole split's, before `limit`
        order = np.random.default_rng(seed).permutation(table.num_rows)[:limit]
        table = table.take(order)
        pngs = table.column("image").to_pylist()
        self.sizes: list[Size] = [png_size(png) for png in pngs]
        self.images = torch.stack([to_square(png_to_tensor(png)[None], canvas)[0] for png in pngs])  # (N, 3, S, S)
        self.captions: list[str] = table.column("caption").to_pylist()
        attributes = table.column("attributes").to_pylist()
        self.scenes: list[Scene] | None = (
            [Scene.from_dict(json.loads(a)) for a in attributes] if all(a is not None for a in attributes) else None
        )

    def __len__(self) -> int:
        return len(self.captions)


def generate(
    pipeline: Text2Image, prompts: list[str], sampler: str, steps: int, guidance: float, seed: int, batch_size: int,
    reporter: Reporter, task: str, negative_prompt: str | None = None, controls: torch.Tensor | None = None,
    control_scale: float | None = None, sizes: list[Size] | None = None, canvas: int | None = None,
) -> torch.Tensor:
    """Prompt i drawn with seed `seed + i`, in batches; with its control map when `controls` (N, C, H, W) is
    given. -> (N, 3, H, W) at the model's size; with `sizes`, prompt i is drawn at sizes[i] (width, height) (the
    bucket of the real image it is the caption of), prompts of one size batched together, and every image is
    squashed onto the `canvas` square the real images are measured on."""
    pipeline.sampler = sampler
    groups: dict[Size | None, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(None if sizes is None else sizes[i], []).append(i)
    images: list[torch.Tensor | None] = [None] * len(prompts)
    done = 0
    for size, members in groups.items():
        shape = {} if size is None else {"width": size[0], "height": size[1]}
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            control = {} if controls is None else {"control_image": controls[chunk], "control_scale": control_scale}
            drawn = pipeline([prompts[i] for i in chunk], negative_prompt=negative_prompt, steps=steps,
                             guidance_scale=guidance, seed=[seed + i for i in chunk], **shape, **control).cpu()
            for i, image in zip(chunk, drawn if size is None else to_square(drawn, canvas)):
                images[i] = image
            done += len(chunk)
            reporter.progress(task, done, len(prompts))
    return torch.stack(images)


def fit_attribute_classifier(
    images: torch.Tensor, scenes: list[Scene], other_scenes: list[Scene], steps: int, seed: int,
    device: torch.device, reporter: Reporter,
) -> AttributeClassifier:
    """The attribute classifier learnt from real `images` (N, 3, H, W) of `scenes`, reading every shape, colour
    and size that these or `other_scenes` (the prompts it will be asked about) name."""
    config = AttributeClassifierConfig(**_vocabulary(scenes + other_scenes), image_size=images.shape[-1])
    return train_attribute_classifier(
        images, scenes, config, steps=steps, batch_size=128, lr=3e-3, seed=seed, device=device, log=reporter.info
    )


def _vocabulary(scenes: list[Scene]) -> dict[str, tuple[str, ...]]:
    objects = [o for s in scenes for o in s.objects]
    return {
        "shapes": tuple(sorted({o.shape for o in objects})),
        "colors": tuple(sorted({o.color for o in objects})),
        "sizes": tuple(sorted({o.size for o in objects})),
    }
