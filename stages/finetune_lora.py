"""DVC stage `finetune_lora`: teach the trained model a new concept with a LoRA adapter, and measure that it did.

reads:  finetune_lora.concept (images + captions of the concept, a source as ingest reads it: by default
        hexagons, a shape the base data never had), paths.text2img, paths.ingested (real base images: trained
        on beside the concept's, for the attribute classifier and the base prompts); params seed, image_size,
        device, text_encoder, finetune_lora
writes: paths.lora                          the adapter only: adapter_model.safetensors + adapter_config.json
        paths.lora_checkpoints              resumable training state (not versioned)
        paths.metrics/finetune_lora.json    adherence before and after, training numbers
        paths.metrics/headline/finetune_lora.json   the DVC metric: concept adherence with the LoRA
        paths.plots/finetune_lora/loss.csv  step, loss, lr (a DVC plot)
        paths.plots/finetune_lora/concept.png   concept prompts: the base model (top), with the LoRA (middle),
                                             real concept images (bottom), each column captioned

The concept's images are encoded once (VAE posterior mean, text encoder) and the LoRA trains on the
attention projections of the frozen UNet (`ldm.training.lora`). Its effect is measured on held-out concept
captions (the concept's val split) and on captions of the base data's val images, with the base model and
with the LoRA at scale 1:

- on any data, by the denoising loss at fixed draws (`ldm.training.denoising.fixed_draw_loss`): the
  concept's should fall, the base images' should hold (a rise is what the adapter made the model forget);
- when both the concept and the base data are shapes data, also by prompt adherence: one-object captions
  drawn and read by an attribute classifier learnt from real base and concept images. The concept's adherence
  should rise from near zero and the base prompts' should hold.

The default concept is the built-in hexagons, which only mean something to a model trained on shapes data. On
other data, without a concept of your own named in `finetune_lora.concept.source`, the stage trains nothing:
`status` in its metrics says `no_concept`, the adapter folder holds only `status.json`, `concept.png` says
what to set, and no model version is registered.

    python -m stages.finetune_lora [--params params.yaml]
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch

from ldm.data.images import png_to_tensor
from ldm.data.shapes import Scene
from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.evaluation.attributes import adherence
from ldm.evaluation.grids import captioned_grid, notice
from ldm.models.lora import LoraSpec, save_lora
from ldm.models.modeling import atomic_path
from ldm.models.text_encoder import TextEmbedding, TextEncoderNotFoundError
from ldm.training.checkpoint import atomic_directory
from ldm.training.denoising import fixed_draw_loss
from ldm.training.lora import LoraTrainingConfig, finetune_lora
from stages.evaluation import RealImages, fit_attribute_classifier, generate
from stages.params import Params, resolve_device
from stages.reporting import (
    Reporter,
    StageResult,
    flatten,
    stage_main,
    training_progress,
    write_csv,
    write_headline,
    write_json,
)
from stages.sources import SourceError, read_source

STAGE = "finetune_lora"
LOSS_COLUMNS = ("step", "loss", "lr")
_ENCODE_BATCH = 256
_GENERATE_BATCH = 100
GRID_PROMPTS = 8
NO_CONCEPT = (
    "No concept to learn: the concept is the built-in shapes hexagons, which mean nothing to a model trained on "
    "{source}. Name a folder (or Parquet) of your concept's images and captions in finetune_lora.concept.source, "
    "read as ingest reads a source, then `dvc repro finetune_lora`."
)


class ConceptImages:
    """The concept source's accepted images, captions and (for shapes data) scenes, one split of them."""

    def __init__(self, rows: list[dict], split: str):
        rows = [row for row in rows if row["split"] == split]
        self.images = torch.stack([png_to_tensor(row["image"]) for row in rows]) if rows else torch.empty(0)
        self.captions: list[str] = [row["caption"] for row in rows]
        attributes = [row["attributes"] for row in rows]
        self.scenes: list[Scene] | None = (
            [Scene.from_dict(json.loads(a)) for a in attributes] if rows and None not in attributes else None
        )

    def __len__(self) -> int:
        return len(self.captions)


def read_concept(params: Params, reporter: Reporter) -> list[dict]:
    """The concept source's rows; each rejected input is reported with its reason, and none accepted stops."""
    knobs = params.finetune_lora.concept
    try:
        total, described, outcomes = read_source(knobs, params.image_size, params.seed, f"{STAGE}.concept")
    except SourceError as e:
        raise InputError(f"{STAGE}.concept: {e}") from None
    reporter.info(f"{STAGE}: concept: {described}")
    rows, rejected = [], 0
    for name, outcome in outcomes:
        if isinstance(outcome, list):
            rows.extend(outcome)
        else:
            rejected += 1
            reporter.info(f"{STAGE}: concept input {name} rejected ({outcome.reason}): {outcome.detail}")
    if not rows:
        raise InputError(f"{STAGE}.concept: none of its {total} inputs was accepted; see the rejects above")
    if rejected:
        reporter.info(f"{STAGE}: concept: {rejected} of {total} inputs rejected, {len(rows)} rows kept")
    return rows


@torch.no_grad()
def encode(pipeline: Text2Image, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, TextEmbedding]:
    """Clean diffusion-space latents (VAE posterior mean) and text embeddings of the concept's train rows."""
    latents, contexts = [], []
    for start in range(0, len(captions), _ENCODE_BATCH):
        batch = images[start : start + _ENCODE_BATCH].to(pipeline.device)
        latents.append(pipeline.vae.scale_latents(pipeline.vae.encode(batch).mode()).cpu())
        contexts.append(pipeline.text_encoder.encode(captions[start : start + _ENCODE_BATCH]).to("cpu"))
    return torch.cat(latents), TextEmbedding.cat(contexts)


def run(params: Params, reporter: Reporter) -> StageResult:
    paths, section = params.paths, params.finetune_lora
    device = resolve_device(params.device)
    try:
        pipeline = Text2Image.from_pretrained(paths.text2img, device=device)
    except (FileNotFoundError, TextEncoderNotFoundError, ValueError) as e:
        raise InputError(f"{e} (to train the model: `dvc repro train_unet`)") from None
    base_val = RealImages(paths.ingested, "val", None, params.seed, params.image_size)
    if section.concept.source == "shapes" and base_val.scenes is None:
        return nothing_to_learn(params, NO_CONCEPT.format(source=params.ingest.source), reporter)
    rows = read_concept(params, reporter)
    concept_train, concept_val = ConceptImages(rows, "train"), ConceptImages(rows, "val")
    if not len(concept_train):
        raise InputError(f"{STAGE}.concept: all {len(rows)} rows fell in the val split; lower its val_fraction")

    # Prior preservation (as DreamBooth does): base images train beside the concept's, so the adapter learns
    # the concept without redrawing what the model already knew.
    prior = RealImages(paths.ingested, "train", section.prior_images, params.seed + 1, params.image_size) if section.prior_images else None
    images = concept_train.images if prior is None else torch.cat([concept_train.images, prior.images])
    latents, contexts = encode(pipeline, images, concept_train.captions + (prior.captions if prior else []))
    hp = LoraTrainingConfig(**section.model_dump(include=set(LoraTrainingConfig.__dataclass_fields__)))
    reporter.info(
        f"{STAGE}: {len(concept_train)} concept train images (+ {len(prior) if prior else 0} base ones), "
        f"{len(concept_val)} val; LoRA rank {hp.rank} on the attention projections, {hp.max_steps} steps of "
        f"{hp.batch_size} on {device}"
    )

    on_step = training_progress(reporter, STAGE)
    empty = pipeline.text_encoder.empty_embedding
    adapted, metrics, history = finetune_lora(
        copy.deepcopy(pipeline.unet), latents, contexts, empty, pipeline.schedule, hp, paths.lora_checkpoints,
        params.seed, device, on_step, reporter.info,
    )
    base_weights = Path(paths.text2img) / "unet" / "model.safetensors"
    with atomic_directory(paths.lora) as tmp:
        save_lora(adapted, tmp, metadata={
            "base_unet_sha256": hashlib.sha256(base_weights.read_bytes()).hexdigest(),
            "concept_source": section.concept.source,
            "example_caption": concept_train.captions[0],
        })

    metrics["status"] = "trained"
    metrics["concept_train_images"] = float(len(concept_train))
    adapted = copy.copy(pipeline)
    adapted.unet = copy.deepcopy(pipeline.unet)
    adapted.load_loras([LoraSpec(Path(paths.lora), 1.0)], merge=True)
    evaluated = concept_val if len(concept_val) else concept_train
    if not len(concept_val):
        reporter.info(f"{STAGE}: the concept has no val rows, so its loss is measured on its train rows")
    metrics["held_out_loss"] = held_out_losses(params, pipeline, adapted, evaluated, base_val, device, reporter)
    if concept_val.scenes is not None and base_val.scenes is not None and len(concept_val):
        metrics.update(evaluate_concept(params, pipeline, adapted, concept_train, concept_val, base_val, device,
                                        reporter))
    else:
        reporter.info(f"{STAGE}: the concept or the base data is not shapes data, so prompt adherence is not "
                      "measured (the held-out loss is)")
    grid = concept_grid(params, pipeline, adapted, evaluated, reporter)
    return write_outputs(params, metrics, history, grid, model_dir=Path(paths.lora))


def write_outputs(params: Params, metrics: dict, history: list[dict], grid, model_dir: Path | None) -> StageResult:
    """The metrics, the loss curve and the picture: every declared output, whatever the stage found to do."""
    metrics_path = write_json(Path(params.paths.metrics) / f"{STAGE}.json", metrics)
    # No adherence without shapes data nor without a concept: the headline is then empty, not a made-up number.
    adherence = metrics.get("headline", {}).get("concept_adherence_after")
    write_headline(params.paths.metrics, STAGE, {} if adherence is None else {"adherence": adherence})
    plots = Path(params.paths.plots) / STAGE
    plots.mkdir(parents=True, exist_ok=True)
    write_csv(plots / "loss.csv", history, LOSS_COLUMNS)
    with atomic_path(plots / "concept.png") as tmp:
        grid.save(tmp, format="PNG")
    numbers = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    return StageResult(metrics=numbers, artifacts=[metrics_path, plots / "loss.csv", plots / "concept.png"],
                       model_dir=model_dir)


def nothing_to_learn(params: Params, why: str, reporter: Reporter) -> StageResult:
    """No adapter: the declared outputs say so (`status: no_concept`), and nothing is registered."""
    reporter.info(f"{STAGE}: {why}")
    Path(params.paths.lora_checkpoints).mkdir(parents=True, exist_ok=True)  # declared, even with nothing in it
    with atomic_directory(params.paths.lora) as tmp:
        (tmp / "status.json").write_text(json.dumps({"adapter": None, "why": why}, indent=2) + "\n")
    return write_outputs(params, {"status": "no_concept"}, [], notice(why), model_dir=None)


def held_out_losses(
    params: Params, pipeline: Text2Image, adapted: Text2Image, concept: ConceptImages, base_val: RealImages,
    device: torch.device, reporter: Reporter,
) -> dict[str, float]:
    """The denoising loss at fixed draws of the concept's held-out images and of the base data's val images,
    without and with the LoRA: the concept's should fall, the base images' should hold."""
    count = params.finetune_lora.eval_prompts
    losses = {}
    for name, images, captions in (("concept", concept.images[:count], concept.captions[:count]),
                                   ("base", base_val.images[:count], base_val.captions[:count])):
        latents, contexts = encode(pipeline, images, captions)
        for model_name, model in (("before", pipeline), ("after", adapted)):
            batches = ((latents[i : i + _ENCODE_BATCH], contexts[i : i + _ENCODE_BATCH])
                       for i in range(0, len(latents), _ENCODE_BATCH))
            losses[f"{name}_{model_name}"] = fixed_draw_loss(
                model.unet, pipeline.schedule, batches, device, params.seed
            )
    losses["concept_drop"] = losses["concept_before"] - losses["concept_after"]
    losses["base_rise"] = losses["base_after"] - losses["base_before"]
    reporter.info(
        f"{STAGE}: held-out denoising loss with the LoRA: concept {losses['concept_before']:.4f} -> "
        f"{losses['concept_after']:.4f}, base images {losses['base_before']:.4f} -> {losses['base_after']:.4f}"
    )
    return losses


def concept_grid(
    params: Params, pipeline: Text2Image, adapted: Text2Image, concept: ConceptImages, reporter: Reporter
):
    """The first concept captions drawn by the base model and with the LoRA, over the concept's real images."""
    shown = min(GRID_PROMPTS, len(concept))
    prompts = concept.captions[:shown]
    rows = [
        generate(model, prompts, model.sampler, model.steps, model.guidance_scale, params.seed, _GENERATE_BATCH,
                 reporter, f"{STAGE} grid {name}")
        for name, model in (("base", pipeline), ("lora", adapted))
    ]
    return captioned_grid([*rows, concept.images[:shown]], prompts, ["base model", "with the LoRA", "real"])


def evaluate_concept(
    params: Params, pipeline: Text2Image, adapted: Text2Image, concept_train: ConceptImages,
    concept_val: ConceptImages, base_val: RealImages, device: torch.device, reporter: Reporter,
) -> dict:
    """Adherence to held-out concept captions and to one-object base captions, without and with the LoRA."""
    section = params.finetune_lora
    count = section.eval_prompts
    concept_prompts, concept_scenes = concept_val.captions[:count], concept_val.scenes[:count]
    one_object = [(c, s) for c, s in zip(base_val.captions, base_val.scenes) if len(s.objects) == 1][:count]
    base_prompts, base_scenes = [c for c, _ in one_object], [s for _, s in one_object]

    base_train = RealImages(params.paths.ingested, "train", section.classifier_images, params.seed, params.image_size)
    if base_train.scenes is None:
        raise InputError(
            f"{params.paths.ingested} has shapes attributes in val but not in train; re-run `dvc repro ingest`"
        )
    classifier = fit_attribute_classifier(
        torch.cat([base_train.images, concept_train.images]), base_train.scenes + concept_train.scenes,
        concept_scenes + base_scenes, section.classifier_steps, params.seed, device, reporter,
    )

    metrics = {}
    for model_name, model in (("base", pipeline), ("lora", adapted)):
        for prompts_name, prompts, scenes in (("concept", concept_prompts, concept_scenes),
                                              ("base_prompts", base_prompts, base_scenes)):
            images = generate(
                model, prompts, model.sampler, model.steps, model.guidance_scale, params.seed, _GENERATE_BATCH, reporter,
                f"{STAGE} {model_name} {prompts_name}",
            )
            scores = adherence(classifier.read(images.to(device)), scenes)
            metrics[f"{prompts_name}.{model_name}"] = {k: v for k, v in scores.items() if not k.endswith("images")}
    concept_before, concept_after = metrics["concept.base"]["all"], metrics["concept.lora"]["all"]
    base_before, base_after = metrics["base_prompts.base"]["all"], metrics["base_prompts.lora"]["all"]
    metrics["headline"] = {
        "concept_adherence_before": concept_before, "concept_adherence_after": concept_after,
        "base_adherence_before": base_before, "base_adherence_after": base_after,
        "base_adherence_drop": base_before - base_after,
    }
    reporter.info(
        f"{STAGE}: concept adherence {concept_before:.2%} -> {concept_after:.2%} with the LoRA; base prompts "
        f"{base_before:.2%} -> {base_after:.2%} ({len(concept_prompts)} and {len(base_prompts)} prompts)"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Fine-tune a LoRA adapter on a new concept and measure its adherence.", run,
        lambda r: ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items() if k.startswith("headline.")) or "done",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
