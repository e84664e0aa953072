"""DVC stage `train_controlnet`: train a ControlNet on edge maps beside the frozen trained UNet; test that it steers.

reads:  paths.text2img (its EMA UNet is the frozen base; its VAE's downsampling factor sizes the control maps),
        paths.latents (the cache the UNet was trained on), paths.ingested (train images, to make their control
        maps and to train the attribute classifier; val captions and scenes, for the evaluation);
        params seed, device, text_encoder, ingest.shapes.positions, train_controlnet
writes: paths.controlnet/                        config.json + model.safetensors (`ControlNet.from_pretrained`)
            control.json                         how the control maps were made (kind, Canny thresholds) and
                                                 the control_scale to sample with
        paths.metrics/train_controlnet.json      training numbers and the position evaluation below
        paths.metrics/headline/train_controlnet.json   the DVC metric: edge F1 with control
        paths.plots/train_controlnet/loss.csv    step, loss, lr (a DVC plot)
        paths.plots/train_controlnet/control.png the first 8 evaluation cases, captioned: edge maps, then the
                                                 prompts drawn without control, then with it (on shapes data
                                                 the position cases below; on any other, the edge cases)
        paths.controlnet_checkpoints/            resumable checkpoints; an interrupted run continues from the newest

Edge agreement (any data): the first `eval_prompts` val images in a seeded order give the control maps, made
as the training ones are; their captions are drawn without control and with it at `control_scale`. The
generated images' own edge maps (same Canny thresholds) are compared with the control maps
(`ldm.evaluation.edges.edge_agreement`: precision, recall and F1 within one pixel). Without control the
score is what the captions alone bring; with it, a ControlNet that steers scores well above that.

Position evaluation (shapes data only): the first `eval_prompts` one-object val scenes, in a seeded order, each with its
object moved to the next position of `ingest.shapes.positions`. The moved scene is rendered and its edge map is
the control image. Two kinds of prompt go with it: `unplaced`, the caption without positions ("a large red
circle on a white background": the place is left to the edge map), and `conflicting`, the original caption,
which names the original position. Each is drawn (seed `seed + i`, the model's saved sampler, steps and
guidance) without control and with control at `control_scale`, and an attribute classifier trained on real
train images reads where the object landed:

    position_follows_control   the image is read as one object, at the edge map's position
    position_follows_prompt    the image is read as one object, at the caption's position
    shape_color_adherence      an object is read with the caption's shape and colour (wherever it is)

`classifier.*` is the classifier's accuracy on the rendered moved scenes themselves: how far its reading is to
be trusted. On data without shapes attributes it is skipped: `position_evaluation` says `skipped`, and the log
says why.

    python -m stages.train_controlnet [--params params.yaml]
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.control_maps import control_map, control_maps_from_pngs
from ldm.data.images import image_tensor, png_to_tensor, tensor_to_pil
from ldm.data.ingested import IngestedDataError, read_table
from ldm.data.latent_cache import LatentCache, LatentCacheError, vae_hash
from ldm.data.shapes import Scene, ShapeObject, caption_without_positions, render
from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.evaluation.attributes import scene_accuracy
from ldm.evaluation.edges import edge_agreement
from ldm.evaluation.grids import captioned_grid
from ldm.models.controlnet import CONTROL_CONFIG_NAME, ControlNet
from ldm.models.text_encoder import TextEncoderNotFoundError
from ldm.training.checkpoint import atomic_directory
from ldm.training.controlnet import ControlNetTrainingConfig, train_controlnet
from stages.evaluation import RealImages, fit_attribute_classifier, generate
from stages.params import Params, TrainControlNetParams, resolve_device
from stages.reporting import (
    REBUILD_INGESTED,
    Reporter,
    StageResult,
    flatten,
    stage_main,
    training_progress,
    write_csv,
    write_headline,
    write_json,
)

STAGE = "train_controlnet"
LOSS_COLUMNS = ("step", "loss", "lr")
GRID_CASES = 8
CONTROL_MAP_CHUNK = 4096  # images turned into control maps at a time: bounds the float maps held at once


class EvaluationSkipped(Exception):
    """The data cannot show where an object lands (no shapes attributes, nothing to move); the message says why."""


def open_inputs(params: Params, device: torch.device) -> tuple[Text2Image, LatentCache]:
    """The trained text-to-image model and the latent cache its UNet was trained on, checked to belong together."""
    paths = params.paths
    try:
        pipeline = Text2Image.from_pretrained(paths.text2img, device=device)
    except (FileNotFoundError, TextEncoderNotFoundError, ValueError) as e:
        raise InputError(f"{e} (to train the model: `dvc repro train_unet`)") from None
    vae_dir = Path(paths.text2img) / "vae"
    try:
        cache = LatentCache(paths.latents)
        # The model's VAE must be the one the cache was made with, or its UNet was trained on other latents.
        cache.check_compatible(
            vae_hash=vae_hash(vae_dir), text_encoder_name=params.text_encoder.name,
            text_max_length=params.text_encoder.max_length, vae_source=str(vae_dir),
        )
        cache.verify()  # every shard against its checksum, before hours of training read them
    except (FileNotFoundError, LatentCacheError) as e:
        # `dvc repro train_unet` remakes a stale cache first, then the model trained on it.
        raise InputError(f"{e} (to rebuild the inputs: `dvc repro train_unet`)") from None
    return pipeline, cache


def control_source(params: Params, reporter: Reporter) -> tuple[Callable[[list[str]], torch.Tensor], int]:
    """`control_of(ids)` -> the control maps (B, C, H, W) in [0, 1] of those ingested train images, and how many
    distinct images it knows. The maps are made once, up front, and held as uint8 (a quarter of float32)."""
    section, directory = params.train_controlnet, params.paths.ingested
    try:
        table = read_table(directory, "train", columns=["id", "image"])
    except (FileNotFoundError, IngestedDataError) as e:
        raise InputError(f"{e} ({REBUILD_INGESTED})") from None
    # One row per caption: an image with several captions appears under one id several times.
    pngs = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    if not pngs:
        raise InputError(f"the ingested data in {directory} has no 'train' rows; ingest more data (`dvc repro ingest`)")
    ids, images = list(pngs), list(pngs.values())
    chunks = []
    for start in range(0, len(images), CONTROL_MAP_CHUNK):
        maps = control_maps_from_pngs(
            section.control_map, images[start : start + CONTROL_MAP_CHUNK], section.low_threshold,
            section.high_threshold,
        )
        chunks.append(maps.mul(255).round().to(torch.uint8))
        reporter.progress(f"{STAGE} control maps", min(start + CONTROL_MAP_CHUNK, len(images)), len(images))
    maps = torch.cat(chunks)  # (N, C, H, W) uint8
    row_of = {image_id: i for i, image_id in enumerate(ids)}

    def control_of(batch_ids: list[str]) -> torch.Tensor:
        missing = [i for i in batch_ids if i not in row_of]
        if missing:
            raise InputError(
                f"the latent cache holds train image {missing[0]} that {directory} has no train row for: the cache "
                "is of other ingested data; rebuild it (`dvc repro cache_latents`)"
            )
        return maps[[row_of[i] for i in batch_ids]].float().div(255)

    return control_of, len(ids)


def run(params: Params, reporter: Reporter) -> StageResult:
    paths, section = params.paths, params.train_controlnet
    device = resolve_device(params.device)
    pipeline, cache = open_inputs(params, device)
    control_of, distinct = control_source(params, reporter)
    controlnet = ControlNet.from_unet(
        pipeline.unet, conditioning_channels=1, vae_downsampling_factor=pipeline.vae.downsampling_factor,
        seed=params.seed,
    )
    # The section also holds control-map and evaluation knobs; the loop takes only its own.
    hp = ControlNetTrainingConfig(**{f.name: getattr(section, f.name) for f in fields(ControlNetTrainingConfig)})
    reporter.info(
        f"{STAGE}: {cache.num_rows('train')} cached train rows, {section.control_map} maps of {distinct} images; "
        f"ControlNet of {controlnet.num_parameters():,} parameters, {hp.max_steps} steps of {hp.batch_size} on {device}"
    )

    on_step = training_progress(reporter, STAGE)
    controlnet, metrics, history = train_controlnet(
        pipeline.unet, controlnet, cache, control_of, pipeline.schedule, hp, paths.controlnet_checkpoints, params.seed,
        device, on_step, reporter.info,
    )
    metrics["parameters"] = float(controlnet.num_parameters())

    model_dir = Path(paths.controlnet)
    with atomic_directory(model_dir) as tmp:
        controlnet.save_pretrained(tmp)
        (tmp / CONTROL_CONFIG_NAME).write_text(json.dumps(control_config(section), indent=2) + "\n")

    pipeline.controlnet = controlnet
    metrics["edge_agreement"], edge_grid = evaluate_edges(params, pipeline, reporter)
    evaluation, position_grid = evaluate_control(params, pipeline, device, reporter)
    metrics.update(evaluation)
    grid = position_grid or edge_grid

    metrics_path = write_json(Path(paths.metrics) / f"{STAGE}.json", metrics)
    write_headline(paths.metrics, STAGE, {"edge_f1": metrics["edge_agreement"]["with_control"]["f1"]})
    plots = Path(paths.plots) / STAGE
    # The whole folder is replaced, so a control.png of an earlier run never outlives a skipped evaluation.
    with atomic_directory(plots) as tmp:
        write_csv(tmp / "loss.csv", history, LOSS_COLUMNS)
        grid.save(tmp / "control.png", format="PNG")

    reporter.info(f"{STAGE}: final loss {metrics['train_loss_final']:.4f}; saved to {model_dir}")
    numbers = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    return StageResult(metrics=numbers, artifacts=[metrics_path, plots], model_dir=model_dir)


def control_config(section: TrainControlNetParams) -> dict:
    """What sampling needs to make control maps like the training ones, and the scale to apply them at."""
    return {
        "control_map": section.control_map,
        "low_threshold": section.low_threshold,
        "high_threshold": section.high_threshold,
        "control_scale": section.control_scale,
    }


def moved_scenes(params: Params) -> tuple[list[str], list[Scene], list[Scene]]:
    """(captions, their scenes, the scenes with the object moved) of the evaluation's one-object val scenes;
    EvaluationSkipped when the data has none."""
    positions = params.ingest.shapes.positions
    if len(positions) < 2:
        raise EvaluationSkipped(f"ingest.shapes.positions lists {positions}: an object needs a second place to move to")
    try:
        table = read_table(params.paths.ingested, "val", columns=["caption", "attributes"])
    except (FileNotFoundError, IngestedDataError) as e:
        raise InputError(f"{e} ({REBUILD_INGESTED})") from None
    attributes = table.column("attributes").to_pylist()
    if not attributes:
        raise EvaluationSkipped(f"the ingested data in {params.paths.ingested} has no val rows to take scenes from")
    if any(a is None for a in attributes):
        raise EvaluationSkipped("the ingested val data has no shapes attributes: where an object lands cannot be read")
    captions = table.column("caption").to_pylist()
    order = np.random.default_rng(params.seed).permutation(len(captions))
    chosen = []
    for i in order:
        scene = Scene.from_dict(json.loads(attributes[i]))
        if len(scene.objects) == 1:
            chosen.append((captions[i], scene))
        if len(chosen) == params.train_controlnet.eval_prompts:
            break
    if not chosen:
        raise EvaluationSkipped("the ingested val data has no one-object scenes to move")
    moved = []
    for _, scene in chosen:
        obj = scene.objects[0]
        # The next position of the list (the first for a position the list lacks): never the caption's own.
        index = positions.index(obj.position) if obj.position in positions else -1
        target = positions[(index + 1) % len(positions)]
        moved.append(Scene((ShapeObject(obj.shape, obj.color, obj.size, target),), scene.background))
    return [c for c, _ in chosen], [s for _, s in chosen], moved


def evaluate_control(
    params: Params, pipeline: Text2Image, device: torch.device, reporter: Reporter
) -> tuple[dict, Image.Image | None]:
    """The position evaluation (module docstring): its metrics and the picture of its first cases."""
    section = params.train_controlnet
    try:
        captions, scenes, moved = moved_scenes(params)
        train = RealImages(params.paths.ingested, "train", section.classifier_images, params.seed, params.image_size)
        if train.scenes is None:
            raise EvaluationSkipped("the ingested train data has no shapes attributes to train the classifier on")
    except EvaluationSkipped as e:
        reporter.info(f"{STAGE}: position evaluation skipped: {e}")
        return {"position_evaluation": "skipped"}, None

    size = pipeline.unet.config.sample_size * pipeline.vae.downsampling_factor
    rendered = [render(scene, size, random.Random(f"{STAGE}:{params.seed}:{i}")) for i, scene in enumerate(moved)]
    controls = torch.stack([
        control_map(section.control_map, image, section.low_threshold, section.high_threshold) for image in rendered
    ])  # (N, 1, H, W) in [0, 1]
    reporter.info(
        f"{STAGE}: {len(captions)} one-object val captions, each drawn with its object's edges at another position"
    )
    classifier = fit_attribute_classifier(
        train.images, train.scenes, scenes, section.classifier_steps, params.seed, device, reporter
    )
    accuracy = scene_accuracy(classifier, torch.cat([image_tensor(image) for image in rendered]), moved)
    results: dict = {"eval_prompts": len(captions), "classifier": accuracy}
    drawn = {}
    for kind, prompts in (("unplaced", [caption_without_positions(s) for s in scenes]), ("conflicting", captions)):
        for key, control in (("without_control", None), ("with_control", controls)):
            drawn[kind, key] = generate(
                pipeline, prompts, pipeline.sampler, pipeline.steps, pipeline.guidance_scale, params.seed,
                section.batch_size, reporter, f"{STAGE} {kind} {key}", controls=control,
                control_scale=section.control_scale,
            )
            r = placement(classifier.read(drawn[kind, key]), scenes, moved)
            results.setdefault(kind, {})[key] = r
            reporter.info(
                f"{STAGE}: {kind} prompts {key.replace('_', ' ')}: object at the edge map's position "
                f"{r['position_follows_control']:.0%}, at the caption's {r['position_follows_prompt']:.0%}, caption's "
                f"shape and colour {r['shape_color_adherence']:.0%} (the classifier reads {accuracy['position']:.0%} "
                "of rendered positions right)"
            )
    cases = min(GRID_CASES, len(captions))
    rows = [as_image(controls[:cases]), drawn["unplaced", "without_control"][:cases],
            drawn["unplaced", "with_control"][:cases]]
    unplaced = [caption_without_positions(s) for s in scenes[:cases]]
    return results, captioned_grid(rows, unplaced, ["edge map", "without control", "with control"])


def as_image(maps: torch.Tensor) -> torch.Tensor:
    """Control maps (N, 1, H, W) in [0, 1] as images in [-1, 1]: white edges on black."""
    return maps.expand(-1, 3, -1, -1) * 2 - 1


def evaluate_edges(params: Params, pipeline: Text2Image, reporter: Reporter) -> tuple[dict, Image.Image]:
    """Edge agreement (module docstring) of the first val images' captions drawn without and with their control
    maps: its metrics and the picture of its first cases."""
    section = params.train_controlnet
    try:
        table = read_table(params.paths.ingested, "val", columns=["image", "caption"])
    except (FileNotFoundError, IngestedDataError) as e:
        raise InputError(f"{e} ({REBUILD_INGESTED})") from None
    if not table.num_rows:
        raise InputError(f"the ingested data in {params.paths.ingested} has no val rows to measure the ControlNet "
                         "on; raise ingest.val_fraction")
    chosen = np.random.default_rng(params.seed).permutation(table.num_rows)[: section.eval_prompts].tolist()
    pngs = [table.column("image")[i].as_py() for i in chosen]
    captions = [table.column("caption")[i].as_py() for i in chosen]
    controls = control_maps_from_pngs(section.control_map, pngs, section.low_threshold, section.high_threshold)
    results, drawn = {"eval_images": len(captions)}, {}
    for key, control in (("without_control", None), ("with_control", controls)):
        drawn[key] = generate(
            pipeline, captions, pipeline.sampler, pipeline.steps, pipeline.guidance_scale, params.seed,
            section.batch_size, reporter, f"{STAGE} edges {key}", controls=control, control_scale=section.control_scale,
        )
        edges = torch.stack([
            control_map(section.control_map, tensor_to_pil(image), section.low_threshold, section.high_threshold)
            for image in drawn[key]
        ])
        results[key] = edge_agreement(edges, controls)
    without, with_control = results["without_control"]["f1"], results["with_control"]["f1"]
    reporter.info(
        f"{STAGE}: edges of {len(captions)} val captions' images against their control maps: F1 {without:.2f} "
        f"without control, {with_control:.2f} with it"
    )
    cases = min(GRID_CASES, len(captions))
    real = torch.stack([png_to_tensor(png) for png in pngs[:cases]])
    rows = [as_image(controls[:cases]), drawn["without_control"][:cases], drawn["with_control"][:cases], real]
    grid = captioned_grid(rows, captions[:cases], ["edge map", "without control", "with control", "real"])
    return results, grid


def placement(read: list[list[ShapeObject]], scenes: list[Scene], moved: list[Scene]) -> dict[str, float]:
    """Where the classifier read each image's object, against the caption's scene and the edge map's."""
    follows_control = follows_prompt = attributes = 0
    for objects, scene, target in zip(read, scenes, moved):
        want = scene.objects[0]
        places = {o.position for o in objects}
        # Exactly one object read: an image showing the object at both places follows neither.
        follows_control += places == {target.objects[0].position}
        follows_prompt += places == {want.position}
        attributes += any(o.shape == want.shape and o.color == want.color for o in objects)
    n = len(scenes)
    return {
        "position_follows_control": follows_control / n,
        "position_follows_prompt": follows_prompt / n,
        "shape_color_adherence": attributes / n,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Train a ControlNet on edge maps beside the trained UNet and measure whether it steers placement.", run,
        lambda r: (
            f"with control the object lands at the edge map's position in "
            f"{r.metrics['unplaced.with_control.position_follows_control']:.0%} of images; saved to {r.model_dir}"
            if "unplaced.with_control.position_follows_control" in r.metrics
            else f"edge F1 {r.metrics['edge_agreement.with_control.f1']:.2f} with control, "
            f"{r.metrics['edge_agreement.without_control.f1']:.2f} without; saved to {r.model_dir}"
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
