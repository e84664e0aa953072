"""Training a ControlNet beside a frozen UNet, from the latent cache and a control map per cached image.

Each step is `train_unet`'s (ldm.training.unet), with the ControlNet's residuals added to the frozen UNet in the
denoising objective (`ldm.training.denoising`: min-SNR weighting and noise offset included):

    z0      = a fresh posterior sample of the cached latents, in diffusion space
    down, mid = controlnet(z_t, t, context, control)
    loss    = denoising_loss(unet(., down_residuals=down, mid_residual=mid), z0, t, noise, context)

Only the ControlNet's weights move. Caption dropout (the paper drops half the prompts) makes the ControlNet
read the control image rather than lean on the caption. The loop is the engine's (`ldm.training.engine`);
checkpoints hold what a bit-for-bit resume needs, as in `train_unet`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ldm.data.latent_cache import LatentBatch, LatentCache
from ldm.data.order import CacheOrder
from ldm.diffusion.schedule import Schedule
from ldm.errors import InputError
from ldm.models.controlnet import ControlNet
from ldm.models.unet import UNet
from ldm.training.checkpoint import run_fingerprint, tensors_digest
from ldm.training.denoising import DenoisingConfig, denoising_loss, draw_noise
from ldm.training.engine import StepCallback, train, trajectory

logger = logging.getLogger(__name__)

ControlSource = Callable[[list[str]], torch.Tensor]  # row ids -> control maps (B, C, H, W) in [0, 1]


@dataclass(frozen=True, kw_only=True)
class ControlNetTrainingConfig(DenoisingConfig):
    batch_size: int  # rows per micro-batch


class ControlNetTrainingResult(NamedTuple):
    controlnet: ControlNet  # the trained weights, eval mode, on the training device
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, lr (kept across resumes)


def batch_controls(batch: LatentBatch, control_of: ControlSource) -> torch.Tensor:
    """The control maps of a batch's rows, mirrored where the cached latents are of the mirrored image."""
    control = control_of(list(batch.id))
    if control.ndim != 4 or control.shape[0] != len(batch):
        raise InputError(
            f"control_of gave shape {tuple(control.shape)} for {len(batch)} ids; it must return (B, C, H, W)"
        )
    # A cache built with flip=True stores flipped rows under the original image's id.
    return torch.where(batch.flipped[:, None, None, None], control.flip(-1), control)


def train_controlnet(
    unet: UNet,
    controlnet: ControlNet,
    cache: LatentCache,
    control_of: ControlSource,
    schedule: Schedule,
    hp: ControlNetTrainingConfig,
    checkpoint_dir,
    seed: int,
    device: str | torch.device,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = logger.info,
) -> ControlNetTrainingResult:
    """Train `controlnet` in place beside the frozen `unet` (set to eval, requires_grad off) on `cache`'s train split,
    resuming from the newest checkpoint of the same run.

    `control_of(ids)` returns the control maps of those cached images at pixel resolution, e.g.
    `control_maps_from_pngs("canny", [png_of[i] for i in ids])`. `on_step(step, max_steps, {"loss", "lr"})`
    is called every `log_every` steps (and at the last) with the means since the previous call, after any
    checkpoint of that step is written. Metrics: train_loss_final, steps, samples_per_second and train_seconds
    (the loop alone, over all sessions of a resumed run).
    """
    device = torch.device(device)
    if controlnet.config.unet != unet.config:
        raise InputError(
            "the ControlNet was built for another UNet config than the UNet given; "
            "build it from this UNet with ControlNet.from_unet(unet, ...)"
        )
    if unet.config.cross_attention_dim != cache.manifest.text_encoder.hidden_size:
        raise InputError(
            f"the UNet cross-attends to {unet.config.cross_attention_dim}-wide tokens but the cache's text encoder "
            f"{cache.manifest.text_encoder.name!r} gives {cache.manifest.text_encoder.hidden_size}; train on a cache "
            "made with the UNet's text encoder"
        )
    if unet.config.in_channels != cache.latent_shape[0]:
        raise InputError(
            f"the cache holds {tuple(cache.latent_shape)} latents but the UNet takes {unet.config.in_channels} "
            "channels; train on a cache made with the UNet's VAE"
        )
    vae_factor = 2 ** (len(cache.manifest.vae.config.block_out_channels) - 1)
    if controlnet.config.vae_downsampling_factor != vae_factor:
        raise InputError(
            f"the ControlNet expects control images {controlnet.config.vae_downsampling_factor}x the latent size "
            f"but the cache's VAE downsamples by {vae_factor}; build it with vae_downsampling_factor={vae_factor}"
        )
    fingerprint = run_fingerprint(
        controlnet=controlnet.config.model_dump(mode="json"),
        base_unet=tensors_digest(unet.state_dict().items()),
        initial_controlnet=tensors_digest(controlnet.state_dict().items()),
        schedule=schedule.to_dict(),
        training=trajectory(hp),
        seed=seed,
        cache=hashlib.sha256("".join(s.sha256 for s in cache.manifest.shards).encode()).hexdigest(),
    )
    unet.to(device).eval().requires_grad_(False)
    controlnet.to(device).train()
    data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    noise_generator = torch.Generator().manual_seed(noise_seed)
    order = CacheOrder(cache, hp.batch_size, data_seed)
    # Keep every caption's hidden states decoded: batches draw captions from all over the table.
    text = cache.open_text(cache_groups=None)

    def micro_batch(net: nn.Module) -> tuple[torch.Tensor, list[str]]:
        batch = order.next_batch()
        latents = cache.sample(batch.mean, batch.logvar, noise_generator)  # (B, C, h, w)
        b = len(batch)
        dropped = torch.rand(b, generator=noise_generator) < hp.caption_dropout
        context = text.lookup(torch.where(dropped, text.empty_index, batch.text_index))
        t = schedule.draw_timesteps(b, noise_generator, tuple(latents.shape[-2:]))
        noise = draw_noise(tuple(latents.shape), hp.noise_offset, noise_generator)
        control = batch_controls(batch, control_of).to(device)  # (B, C_cond, H, W)

        def controlled_unet(noisy, t, hidden_states, mask):
            down, mid = net(noisy, t, hidden_states, mask, control)
            return unet(noisy, t, hidden_states, mask, down_residuals=down, mid_residual=mid)

        loss = denoising_loss(controlled_unet, schedule, latents, noise, t, context, hp.min_snr_gamma, device)
        return loss.reshape(1), batch.id

    trained = train(
        "ControlNet", controlnet, micro_batch, order, hp, checkpoint_dir, fingerprint, device,
        generators={"noise": noise_generator}, log=log, on_step=on_step,
    )
    if trained.ema is not None:  # the EMA weights are the trained ControlNet
        controlnet.load_state_dict(trained.ema.module.state_dict())

    metrics = trained.metrics(hp.max_steps, hp.batch_size * hp.grad_accumulation)
    return ControlNetTrainingResult(controlnet.eval(), metrics, trained.history)
