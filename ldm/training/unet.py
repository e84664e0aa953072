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
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from ldm.data.images import tensor_to_pil
from ldm.data.latent_cache import LatentCache, TextTable
from ldm.data.order import CacheOrder, check_lanes
from ldm.diffusion.pipeline import denoise
from ldm.diffusion.schedule import NoiseSchedule
from ldm.errors import InputError
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE
from ldm.training.checkpoint import run_fingerprint
from ldm.training.denoising import DenoisingConfig, denoising_loss, draw_noise
from ldm.training.distributed import SINGLE_PROCESS, DataParallel
from ldm.training.engine import StepCallback, train, trajectory

logger = logging.getLogger(__name__)

ValidationCallback = Callable[[int, Image.Image], None]


@dataclass(frozen=True, kw_only=True)
class UNetTrainingConfig(DenoisingConfig):
    """The training hyperparameters (the params schema's `train_unet` section holds their defaults)."""

    batch_size: int  # rows per micro-batch
    validate_every: int  # steps between validation grids (and one at the end)
    data_lanes: int | None = None  # streams a batch is drawn from (CacheOrder); None: one per rank


class UNetTrainingResult(NamedTuple):
    unet: UNet  # the raw trained weights, eval mode, on the training device
    ema: UNet  # the EMA weights: the model to sample with
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, lr (kept across resumes)


def data_lanes(hp: UNetTrainingConfig, ranks: DataParallel) -> int:
    """The lanes a run reads (`CacheOrder`): hp.data_lanes, or one per rank; ValueError when they do not split."""
    lanes = ranks.world_size if hp.data_lanes is None else hp.data_lanes
    check_lanes(hp.batch_size, lanes, ranks)
    return lanes


def validation_prompts(cache: LatentCache, count: int) -> list[tuple[str, int]]:
    """The first `count` distinct captions of the cache's val split (train when it has none), with their text rows."""
    split = "val" if "val" in cache.splits else "train"
    chosen: dict[str, int] = {}
    for batch in cache.iter_batches(split, 256):
        for caption, index in zip(batch.caption, batch.text_index.tolist()):
            chosen.setdefault(caption, index)
            if len(chosen) == count:
                return list(chosen.items())
    return list(chosen.items())


@torch.no_grad()
def validation_grid(
    unet: UNet,
    vae: VAE,
    schedule: NoiseSchedule,
    cond: TextEmbedding,
    uncond: TextEmbedding,
    seeds: list[int],
    guidance_scale: float,
    steps: int,
    sampler: str,
    spacing: str,
) -> Image.Image:
    """One row per seed, one column per prompt (`cond`, B rows), from the same seeds at every call."""
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
    return tensor_to_pil(make_grid(torch.cat(rows), nrow=len(cond), pad_value=0.0))


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
    schedule: NoiseSchedule,
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
    means since the previous call, after any checkpoint of that step is written; `on_validation(step, grid)`
    every `validate_every` steps and at the last, with the EMA model's grid. Metrics: train_loss_final,
    val_loss (EMA model, fixed timesteps and noise over the val split), steps, samples_per_second and
    train_seconds (the loop alone, both over all sessions of a resumed run).
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
        b, shape = hp.batch_size, (hp.batch_size, *latent_shape)
        eps = torch.randn(shape, generator=noise_generator)[mine]
        latents = cache.sample(batch.mean, batch.logvar, noise=eps)  # (B, C, h, w)
        dropped = (torch.rand(b, generator=noise_generator) < hp.caption_dropout)[mine]
        context = text.lookup(torch.where(dropped, text.empty_index, batch.text_index))
        t = torch.randint(schedule.num_train_timesteps, (b,), generator=noise_generator)[mine]
        noise = draw_noise(shape, hp.noise_offset, noise_generator, mine)
        loss = denoising_loss(net, schedule, latents, noise, t, context, hp.min_snr_gamma, device)
        return loss.reshape(1), batch.id

    grid_inputs = None
    if validation is not None:
        prompts = validation_prompts(cache, validation.prompts)
        grid_inputs = (text.lookup([i for _, i in prompts]), text.lookup([text.empty_index]))

    def emit_validation(step: int, model: UNet) -> None:
        if validation is None or on_validation is None or not ranks.is_main:
            return
        cond, uncond = grid_inputs
        model.eval()
        grid = validation_grid(
            model, validation.vae, schedule, cond, uncond, list(validation.seeds), validation.guidance_scale,
            validation.steps, validation.sampler, validation.spacing,
        )
        model.train()
        on_validation(step, grid)

    trained = train(
        "UNet", unet, micro_batch, order, hp, checkpoint_dir, fingerprint, device,
        generators={"noise": noise_generator}, ranks=ranks, log=log, on_step=on_step,
        validate=emit_validation, validate_every=hp.validate_every,
    )
    raw, averaged = unet.eval(), trained.ema.module.eval()
    if not ranks.is_main:
        return UNetTrainingResult(raw, averaged, {}, trained.history)
    metrics = {
        **trained.metrics(hp.max_steps, hp.batch_size * hp.grad_accumulation),
        "val_loss": validation_loss(averaged, cache, text, schedule, hp.batch_size, seed),
    }
    return UNetTrainingResult(raw, averaged, metrics, trained.history)


@torch.no_grad()
def validation_loss(
    unet: UNet, cache: LatentCache, text: TextTable, schedule: NoiseSchedule, batch_size: int, seed: int
) -> float:
    """Unweighted MSE to the training target over the val split, with noise and timesteps fixed by `seed`.

    Every row is scored at the same stratified timesteps, so two runs' values compare. NaN without a val split.
    """
    if "val" not in cache.splits:
        return float("nan")
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in cache.iter_batches("val", batch_size):
        latents = cache.scale_latents(batch.mean)  # the posterior mean: no sampling noise in the score
        b = len(batch)
        t = (torch.arange(b) * schedule.num_train_timesteps // b + count) % schedule.num_train_timesteps
        noise = torch.randn(latents.shape, generator=generator)
        context = text.lookup(batch.text_index).to(device)
        mask = None if context.attention_mask.all() else context.attention_mask
        prediction = unet(schedule.add_noise(latents, noise, t).to(device), t.to(device), context.hidden_states, mask)
        target = schedule.training_target(latents, noise, t).to(device)
        total += F.mse_loss(prediction.float(), target, reduction="sum").item() / target[0].numel()
        count += b
    return total / count
