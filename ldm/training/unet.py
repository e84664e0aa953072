"""Training the text-conditioned UNet from the latent cache: neither the VAE nor the text encoder runs in the loop.

Each step, for a batch of cached rows: a fresh posterior sample of each row's cached latents, in diffusion
space, is the clean z0 of the denoising objective (`ldm.training.denoising`), with the caption's cached hidden
states as its context:

    z0      = (mean + exp(logvar / 2) * e - shift) * scale
    loss    = denoising_loss(unet, z0, t, noise, context)

The loop is the engine's (`ldm.training.engine`): AdamW with linear warmup and cosine decay, gradient-norm
clipping, gradient accumulation (`batch_size` rows per micro-batch, `grad_accumulation` micro-batches per
optimizer step), autocast, and an EMA of the weights that is the model sampling uses. Checkpoints hold
everything a bit-for-bit resume needs: weights, EMA, optimizer, LR schedule, generator states and the data
position (epoch and batches consumed in it).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image

from ldm.data.latent_cache import LatentCache, TextTable
from ldm.data.order import CacheOrder, check_lanes
from ldm.diffusion.pipeline import denoise
from ldm.diffusion.schedule import Schedule
from ldm.errors import InputError
from ldm.evaluation.grids import captioned_grid
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE
from ldm.training.checkpoint import run_fingerprint
from ldm.training.denoising import (
    DenoisingConfig,
    denoising_loss,
    draw_noise,
    fixed_draw_loss,
)
from ldm.training.distributed import SINGLE_PROCESS, DataParallel
from ldm.training.engine import StepCallback, train, trajectory

logger = logging.getLogger(__name__)

# on_validation(step, {"val_loss": ...}, the grid or None without a Validation)
ValidationCallback = Callable[[int, dict[str, float], Image.Image | None], None]
RISE_TOLERANCE = 0.02  # a val loss this much above its best counts as rising


@dataclass(frozen=True, kw_only=True)
class UNetTrainingConfig(DenoisingConfig):
    """The training hyperparameters (the params schema's `train_unet` section holds their defaults)."""

    batch_size: int  # rows per micro-batch
    validate_every: int  # steps between validations, the val loss and a grid (and one at the end)
    data_lanes: int | None = None  # streams a batch is drawn from (CacheOrder); None: one per rank


class UNetTrainingResult(NamedTuple):
    unet: UNet  # the raw trained weights, eval mode, on the training device
    ema: UNet  # the EMA weights: the model to sample with
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, lr (kept across resumes)
    validations: list[dict[str, float]]  # one row per validation: step, val_loss (kept across resumes)


def data_lanes(hp: UNetTrainingConfig, ranks: DataParallel) -> int:
    """The lanes a run reads (`CacheOrder`): hp.data_lanes, or one per rank; ValueError when they do not split."""
    lanes = ranks.world_size if hp.data_lanes is None else hp.data_lanes
    check_lanes(hp.batch_size, lanes, ranks)
    return lanes


def validation_prompts(cache: LatentCache, count: int) -> list[tuple[str, int]]:
    """The first `count` distinct captions of the cache's val split (train when it has none), with their text rows."""
    split = "val" if "val" in cache.splits else "train"
    chosen: dict[str, int] = {}
    for shape in cache.latent_shapes(split):
        for batch in cache.iter_batches(split, 256, shape=shape):
            for caption, index in zip(batch.caption, batch.text_index.tolist()):
                chosen.setdefault(caption, index)
                if len(chosen) == count:
                    return list(chosen.items())
    return list(chosen.items())


@torch.no_grad()
def validation_grid(
    unet: UNet,
    vae: VAE,
    schedule: Schedule,
    cond: TextEmbedding,
    uncond: TextEmbedding,
    captions: list[str],
    seeds: list[int],
    guidance_scale: float,
    steps: int,
    sampler: str,
    spacing: str,
) -> Image.Image:
    """One row per seed, one column per prompt (`cond`, B rows, captioned with `captions`), from the same seeds
    at every call."""
    device = next(unet.parameters()).device
    context = TextEmbedding.cat([uncond.repeat_interleave(len(cond)) if len(uncond) == 1 else uncond, cond])
    context = context.to(device)
    rows = []
    for seed in seeds:
        shape = (len(cond), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = denoise(
            unet, context, guidance_scale, shape, schedule, sampler=sampler, steps=steps, spacing=spacing, seed=seed
        )
        rows.append(vae.decode(vae.unscale_latents(latents)).cpu())
    return captioned_grid(rows, captions, [f"seed {seed}" for seed in seeds])


@dataclass(frozen=True)
class Validation:
    """What the periodic validation grid shows and how it is sampled."""

    vae: VAE
    prompts: int = 8
    seeds: tuple[int, ...] = (0, 1)
    guidance_scale: float = 4.0
    steps: int = 20
    sampler: str = "dpmpp_2m"
    spacing: str = "trailing"


def train_unet(
    config: UNetConfig,
    cache: LatentCache,
    schedule: Schedule,
    hp: UNetTrainingConfig,
    checkpoint_dir,
    seed: int,
    device: str | torch.device,
    validation: Validation | None = None,
    on_step: StepCallback | None = None,
    on_validation: ValidationCallback | None = None,
    log: Callable[[str], None] = logger.info,
    ranks: DataParallel = SINGLE_PROCESS,
) -> UNetTrainingResult:
    """Train a UNet from `config` on `cache`'s train split, resuming from the newest checkpoint of the same run.

    Data-parallel (`ranks` of a torchrun world): each rank trains on its share of every batch (`CacheOrder`)
    and draws the whole batch's noise, keeping its own rows, so that with the same `data_lanes` the run is the
    one a single process makes. Rank 0 alone checkpoints, validates and calls back; on the other ranks the
    result's metrics are empty.

    `on_step(step, max_steps, {"loss", "lr"})` is called every `log_every` steps (and at the last) with the
    means since the previous call, after any checkpoint of that step is written; `on_validation(step,
    {"val_loss"}, grid)` every `validate_every` steps and at the last, with the EMA model's val loss (fixed
    timesteps and noise over the val split) and grid (None without `validation`). Metrics: train_loss_final,
    val_loss (the last validation's), val_loss_best, val_loss_rising (1 when `val_loss_rising` warned: logged
    too), steps, samples_per_second and train_seconds (the loop alone, both over all sessions of a resumed
    run).
    """
    device = torch.device(device)
    if config.cross_attention_dim != cache.manifest.text_encoder.hidden_size:
        raise InputError(
            f"the UNet cross-attends to {config.cross_attention_dim}-wide tokens but the cache's text encoder "
            f"{cache.manifest.text_encoder.name!r} gives {cache.manifest.text_encoder.hidden_size}; set "
            f"cross_attention_dim to {cache.manifest.text_encoder.hidden_size}"
        )
    latent_shape = tuple(cache.latent_shape)
    if (config.in_channels, config.sample_size, config.sample_size) != latent_shape:
        raise InputError(
            f"the cache holds {latent_shape} latents but the UNet takes ({config.in_channels}, {config.sample_size}, "
            f"{config.sample_size}); match in_channels and sample_size to the cache"
        )
    lanes = data_lanes(hp, ranks)
    fingerprint = run_fingerprint(
        unet=config.model_dump(mode="json"),
        schedule=schedule.to_dict(),
        training=trajectory(hp, ("validate_every",)) | {"data_lanes": lanes},
        seed=seed,
        cache=hashlib.sha256("".join(s.sha256 for s in cache.manifest.shards).encode()).hexdigest(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet(config)
    unet.to(device).train()
    data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    noise_generator = torch.Generator().manual_seed(noise_seed)
    order = CacheOrder(cache, hp.batch_size, data_seed, lanes, ranks)
    mine = ranks.share(hp.batch_size, "batch_size")
    # Keep every caption's hidden states decoded: batches draw captions from all over the table.
    text = cache.open_text(cache_groups=None)

    def micro_batch(net: torch.nn.Module) -> tuple[torch.Tensor, list[str]]:
        batch = order.next_batch()
        # Every rank draws for the whole batch, in one order, and keeps its rows: the draws a single process makes.
        b, shape = hp.batch_size, (hp.batch_size, *batch.mean.shape[1:])  # one latent shape (bucket) a batch
        eps = torch.randn(shape, generator=noise_generator)[mine]
        latents = cache.sample(batch.mean, batch.logvar, noise=eps)  # (B, C, h, w)
        dropped = (torch.rand(b, generator=noise_generator) < hp.caption_dropout)[mine]
        context = text.lookup(torch.where(dropped, text.empty_index, batch.text_index))
        t = schedule.draw_timesteps(b, noise_generator, shape[-2:])[mine]
        noise = draw_noise(shape, hp.noise_offset, noise_generator, mine)
        loss = denoising_loss(net, schedule, latents, noise, t, context, hp.min_snr_gamma, device)
        return loss.reshape(1), batch.id

    grid_inputs, prompts = None, []
    if validation is not None:
        prompts = validation_prompts(cache, validation.prompts)
        grid_inputs = (text.lookup([i for _, i in prompts]), text.lookup([text.empty_index]))

    def validate(step: int, model: UNet) -> dict[str, float] | None:
        if not ranks.is_main:
            return None
        model.eval()
        loss = validation_loss(model, cache, text, schedule, hp.batch_size, seed)
        values = {} if math.isnan(loss) else {"val_loss": loss}  # NaN: the cache has no val split
        grid = None
        if validation is not None:
            cond, uncond = grid_inputs
            grid = validation_grid(
                model, validation.vae, schedule, cond, uncond, [c for c, _ in prompts], list(validation.seeds),
                validation.guidance_scale, validation.steps, validation.sampler, validation.spacing,
            )
        model.train()
        if on_validation is not None:
            on_validation(step, values, grid)
        return values

    trained = train(
        "UNet", unet, micro_batch, order, hp, checkpoint_dir, fingerprint, device,
        generators={"noise": noise_generator}, ranks=ranks, log=log, on_step=on_step,
        validate=validate, validate_every=hp.validate_every,
    )
    raw, averaged = unet.eval(), trained.ema.module.eval()
    if not ranks.is_main:
        return UNetTrainingResult(raw, averaged, {}, trained.history, [])
    rising = val_loss_rising(trained.validations, trained.history)
    if rising:
        log(rising)
    scored = [v["val_loss"] for v in trained.validations]
    metrics = {
        **trained.metrics(hp.max_steps, hp.batch_size * hp.grad_accumulation),
        "val_loss": scored[-1] if scored else float("nan"),  # the last validation's: the EMA after the last step
        "val_loss_best": min(scored, default=float("nan")),
        "val_loss_rising": float(bool(rising)),
    }
    return UNetTrainingResult(raw, averaged, metrics, trained.history, trained.validations)


def val_loss_rising(validations: list[dict[str, float]], history: list[dict[str, float]]) -> str | None:
    """A warning when the last val loss is above its best by more than RISE_TOLERANCE while the train loss fell
    since that best: the model learns its train images rather than the data (more steps make it worse;
    fewer steps, more data, or augmentation help). None when it is not so."""
    if len(validations) < 2:
        return None
    best, last = min(validations, key=lambda v: v["val_loss"]), validations[-1]

    def train_loss_at(step: float) -> float | None:
        rows = [r["loss"] for r in history if r["step"] <= step]
        return rows[-1] if rows else None

    train_then, train_now = train_loss_at(best["step"]), train_loss_at(last["step"])
    if last["val_loss"] <= best["val_loss"] * (1 + RISE_TOLERANCE) or None in (train_then, train_now):
        return None
    if train_now >= train_then:
        return None
    return (
        f"warning: the val loss rose from {best['val_loss']:.4f} at step {best['step']:.0f} to "
        f"{last['val_loss']:.4f} at step {last['step']:.0f} while the train loss fell from {train_then:.4f} to "
        f"{train_now:.4f}: the model is memorising its train images. Fewer steps (about {best['step']:.0f} here), "
        "more images or augmentation (cache_latents.flip) help"
    )


def validation_loss(
    unet: UNet, cache: LatentCache, text: TextTable, schedule: Schedule, batch_size: int, seed: int
) -> float:
    """`fixed_draw_loss` over the val split (each row's posterior mean: no sampling noise in the score), with
    the draws fixed by `seed`, so two runs' values compare. NaN without a val split."""
    if "val" not in cache.splits:
        return float("nan")
    batches = (
        (cache.scale_latents(batch.mean), text.lookup(batch.text_index))
        for shape in cache.latent_shapes("val")
        for batch in cache.iter_batches("val", batch_size, shape=shape)
    )
    return fixed_draw_loss(unet, schedule, batches, next(unet.parameters()).device, seed)
