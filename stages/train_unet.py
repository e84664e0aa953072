"""DVC stage `train_unet`: train the text-conditioned UNet from the latent cache; save the text-to-image model.

reads:  paths.latents (the cache: latents and caption embeddings), paths.vae (only to decode validation grids
        and to ship inside the model); params seed, device, text_encoder, train_unet
writes: paths.text2img/                     the complete text-to-image model (`Text2Image.from_pretrained`):
            vae/  unet/ (EMA weights, what sampling uses)  unet_raw/ (the raw weights)  pipeline.json
        paths.metrics/train_unet.json       train_loss_final, val_loss, samples_per_second, train_seconds, ...
        paths.metrics/headline/train_unet.json   the DVC metric: val_loss
        paths.plots/train_unet/loss.csv     step, loss, lr (a DVC plot)
        paths.plots/train_unet/val_loss.csv step, val_loss: the EMA model's loss on the val split at fixed
                                            timesteps and noise, every validate_every steps (a DVC plot)
        paths.plots/train_unet/validation.png   the final validation grid (fixed val prompts x fixed seeds)
        paths.unet_checkpoints/             resumable checkpoints; an interrupted run continues from the newest,
                                            and a raised max_steps extends a finished run from its last one

A val loss that rises while the train loss falls is memorisation: the log warns and `val_loss_rising` is 1.

    python -m stages.train_unet [--params params.yaml]
    torchrun --nproc-per-node N -m stages.train_unet    # data-parallel: each rank reads its own cache shards
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from ldm.data.latent_cache import LatentCache, LatentCacheError, vae_hash
from ldm.diffusion.pipeline import RAW_UNET_FOLDER, Text2Image
from ldm.diffusion.schedule import FlowSchedule, NoiseSchedule, Schedule
from ldm.errors import InputError
from ldm.models.modeling import atomic_path
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAE
from ldm.training.checkpoint import atomic_directory
from ldm.training.distributed import DataParallel, data_parallel
from ldm.training.unet import UNetTrainingConfig, Validation, data_lanes, train_unet
from stages.params import Params, ParamsError, TrainUNetParams, resolve_device
from stages.reporting import Reporter, StageResult, stage_main, training_progress, write_csv, write_headline, write_json

STAGE = "train_unet"
LOSS_COLUMNS = ("step", "loss", "lr")
VAL_LOSS_COLUMNS = ("step", "val_loss")


def open_inputs(params: Params) -> tuple[LatentCache, VAE]:
    paths = params.paths
    try:
        cache = LatentCache(paths.latents)
        vae = VAE.from_pretrained(paths.vae)
        cache.check_compatible(
            vae_hash=vae_hash(paths.vae), text_encoder_name=params.text_encoder.name,
            text_max_length=params.text_encoder.max_length, vae_source=paths.vae,
        )
        cache.verify()  # every shard against its checksum, before hours of training read them
    except (FileNotFoundError, LatentCacheError, ValueError) as e:
        raise InputError(f"{e} (to rebuild the inputs: `dvc repro cache_latents`)") from None
    return cache, vae


def unet_config(params: Params, cache: LatentCache) -> UNetConfig:
    channels, size, _ = cache.latent_shape
    return model_config(params, channels, size, cache.manifest.text_encoder.hidden_size)


def model_config(params: Params, latent_channels: int, latent_size: int, text_width: int) -> UNetConfig:
    """train_unet.model on latents of (latent_channels, latent_size, latent_size) and text of text_width."""
    m = params.train_unet.model
    try:
        return UNetConfig(
            in_channels=latent_channels, out_channels=latent_channels, block_out_channels=tuple(m.block_out_channels),
            layers_per_block=m.layers_per_block, attention_levels=tuple(m.attention_levels), num_heads=m.num_heads,
            transformer_layers_per_block=m.transformer_layers_per_block, cross_attention_dim=text_width,
            norm_num_groups=m.norm_num_groups, sample_size=latent_size,
        )
    except ValueError as e:
        raise ParamsError(f"train_unet.model is not a valid UNet: {e}") from None


def training_config(section: TrainUNetParams) -> UNetTrainingConfig:
    """The training loop's settings: every key of the section but the model's, the objective's and validation's."""
    return UNetTrainingConfig(**section.model_dump(
        exclude={"model", "objective", "schedule", "flow", "sampling", "validation_prompts", "validation_seeds"}
    ))


def training_schedule(section: TrainUNetParams, latent_size: int) -> Schedule:
    """The objective's schedule: a flow's shift holds at the training latents' area, `latent_size` squared."""
    if section.objective == "flow":
        return FlowSchedule(
            num_train_timesteps=section.schedule.num_train_timesteps, base_latent_pixels=latent_size**2,
            **section.flow.model_dump(),
        )
    return NoiseSchedule(**section.schedule.model_dump())


def run(params: Params, reporter: Reporter) -> StageResult:
    with data_parallel(resolve_device(params.device)) as (ranks, device):
        return _run(params, reporter, ranks, device)


def _run(params: Params, reporter: Reporter, ranks: DataParallel, device: torch.device) -> StageResult:
    paths, section = params.paths, params.train_unet
    cache, vae = open_inputs(params)
    config = unet_config(params, cache)
    schedule = training_schedule(section, config.sample_size)
    hp = training_config(section)
    try:
        data_lanes(hp, ranks)
    except ValueError as e:
        raise ParamsError(str(e)) from None
    sampling = section.sampling
    validation = Validation(
        vae=vae.to(device), prompts=section.validation_prompts, seeds=tuple(section.validation_seeds),
        guidance_scale=sampling.guidance_scale, steps=sampling.steps, sampler=sampling.sampler, spacing=sampling.spacing,
    )
    rows = cache.num_rows("train")
    reporter.info(
        f"{STAGE}: {rows} cached train rows, {len(cache.text)} captions; UNet {list(config.block_out_channels)}, "
        f"{section.max_steps} steps of {hp.batch_size * hp.grad_accumulation} on {device}"
        + ranks.label
    )

    on_step = training_progress(reporter, STAGE)
    grids: list[Image.Image] = []

    def on_validation(step: int, values: dict[str, float], grid: Image.Image | None) -> None:
        if values:
            reporter.metrics({"val_loss_by_step": values["val_loss"]}, step)  # "val_loss" is the final metric
            reporter.info(f"{STAGE}: step {step}: val loss {values['val_loss']:.4f}")
        if grid is not None:
            grids[:] = [grid]
            reporter.image("validation", grid, step)

    unet, ema, metrics, history, validations = train_unet(
        config, cache, schedule, hp, paths.unet_checkpoints, params.seed, device, validation, on_step, on_validation,
        reporter.info, ranks,
    )
    if not ranks.is_main:  # rank 0 writes the outputs
        return StageResult()
    metrics["parameters"] = float(unet.num_parameters())

    model_dir = Path(paths.text2img)
    pipeline = Text2Image(
        vae.cpu(), ema.cpu(), TextEncoder.from_pretrained(params.text_encoder.name), schedule=schedule,
        sampler=sampling.sampler, spacing=sampling.spacing, steps=sampling.steps, guidance_scale=sampling.guidance_scale,
    )
    with atomic_directory(model_dir) as tmp:
        pipeline.save_pretrained(tmp)
        unet.cpu().save_pretrained(tmp / RAW_UNET_FOLDER)
    write_json(Path(paths.metrics) / f"{STAGE}.json", metrics)
    write_headline(paths.metrics, STAGE, {"val_loss": metrics["val_loss"]})
    plots = Path(paths.plots) / STAGE
    plots.mkdir(parents=True, exist_ok=True)
    loss_csv, val_loss_csv, grid_png = plots / "loss.csv", plots / "val_loss.csv", plots / "validation.png"
    write_csv(loss_csv, history, LOSS_COLUMNS)
    write_csv(val_loss_csv, validations, VAL_LOSS_COLUMNS)
    with atomic_path(grid_png) as tmp:
        grids[-1].save(tmp, format="PNG")

    reporter.info(
        f"{STAGE}: val loss {metrics['val_loss']:.4f}, {metrics['samples_per_second']:.0f} samples/s, "
        f"{metrics['train_seconds']:.0f} s of training; saved to {model_dir}"
    )
    return StageResult(metrics=metrics, artifacts=[grid_png, loss_csv, val_loss_csv], model_dir=model_dir / "unet")


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Train the text-conditioned UNet from the latent cache and save the text-to-image model.", run,
        lambda r: f"val loss {r.metrics['val_loss']:.4f}; saved to {r.model_dir}",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
