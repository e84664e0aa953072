"""Training a ControlNet beside a frozen UNet, from the latent cache and a control map per cached image.

Each step is `train_unet`'s (ldm.training.unet), with the ControlNet's residuals added to the frozen UNet:

    z0      = a fresh posterior sample of the cached latents, in diffusion space
    t       ~ U{0, T-1};  noise ~ N(0, I);  z_t = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * noise
    context = the caption's cached hidden states, or the empty prompt's with probability caption_dropout
    down, mid = controlnet(z_t, t, context, control)
    loss    = mean((unet(z_t, t, context, down_residuals=down, mid_residual=mid) - target)^2)

Only the ControlNet's weights move. Caption dropout (the paper drops half the prompts) makes the ControlNet
read the control image rather than lean on the caption. AdamW with linear warmup and cosine decay and
gradient-norm clipping; checkpoints hold what a bit-for-bit resume needs, as in `train_unet`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.latent_cache import LatentBatch, LatentCache
from ldm.data.order import CacheOrder
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.controlnet import ControlNet
from ldm.models.unet import UNet
from ldm.training.checkpoint import ResumableRun, TrainingState, run_fingerprint
from ldm.training.loss_history import LossHistory
from ldm.training.optim import adamw, warmup_cosine
from ldm.training.unet import StepCallback

logger = logging.getLogger(__name__)

# Fields that change neither the weights reached at a step nor the data seen: a run may resume across them.
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "nonfinite_skips", "log_every")

ControlSource = Callable[[list[str]], torch.Tensor]  # row ids -> control maps (B, C, H, W) in [0, 1]


@dataclass(frozen=True, kw_only=True)
class ControlNetTrainingConfig:
    batch_size: int
    max_steps: int  # optimizer steps
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float  # max global gradient norm
    caption_dropout: float  # probability of training a row on the empty prompt
    checkpoint_every: int
    keep_checkpoints: int
    nonfinite_skips: int = 0  # steps with a NaN/inf loss or gradient to skip (counted) before stopping
    log_every: int


class ControlNetTrainingResult(NamedTuple):
    controlnet: ControlNet  # the trained weights, eval mode, on the training device
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, lr (kept across resumes)


def weights_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): its weights' identity in a fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_controls(batch: LatentBatch, control_of: ControlSource) -> torch.Tensor:
    """The control maps of a batch's rows, mirrored where the cached latents are of the mirrored image."""
    control = control_of(list(batch.id))
    if control.ndim != 4 or control.shape[0] != len(batch):
        raise ValueError(
            f"control_of gave shape {tuple(control.shape)} for {len(batch)} ids; it must return (B, C, H, W)"
        )
    # A cache built with flip=True stores flipped rows under the original image's id.
    return torch.where(batch.flipped[:, None, None, None], control.flip(-1), control)


def train_controlnet(
    unet: UNet,
    controlnet: ControlNet,
    cache: LatentCache,
    control_of: ControlSource,
    schedule: NoiseSchedule,
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
        raise ValueError(
            "the ControlNet was built for another UNet config than the UNet given; "
            "build it from this UNet with ControlNet.from_unet(unet, ...)"
        )
    if unet.config.cross_attention_dim != cache.manifest.text_encoder.hidden_size:
        raise ValueError(
            f"the UNet cross-attends to {unet.config.cross_attention_dim}-wide tokens but the cache's text encoder "
            f"{cache.manifest.text_encoder.name!r} gives {cache.manifest.text_encoder.hidden_size}; train on a cache "
            "made with the UNet's text encoder"
        )
    if unet.config.in_channels != cache.latent_shape[0]:
        raise ValueError(
            f"the cache holds {tuple(cache.latent_shape)} latents but the UNet takes {unet.config.in_channels} "
            "channels; train on a cache made with the UNet's VAE"
        )
    vae_factor = 2 ** (len(cache.manifest.vae.config.block_out_channels) - 1)
    if controlnet.config.vae_downsampling_factor != vae_factor:
        raise ValueError(
            f"the ControlNet expects control images {controlnet.config.vae_downsampling_factor}x the latent size "
            f"but the cache's VAE downsamples by {vae_factor}; build it with vae_downsampling_factor={vae_factor}"
        )
    fingerprint = run_fingerprint(
        controlnet=controlnet.config.model_dump(mode="json"),
        base_unet=weights_hash(unet),
        initial_controlnet=weights_hash(controlnet),
        schedule=schedule.to_dict(),
        training={k: v for k, v in asdict(hp).items() if k not in _BOOKKEEPING},
        seed=seed,
        cache=hashlib.sha256("".join(s.sha256 for s in cache.manifest.shards).encode()).hexdigest(),
    )
    unet.to(device).eval().requires_grad_(False)
    controlnet.to(device).train()
    optimizer = adamw(controlnet.parameters(), hp.lr, hp.weight_decay)
    lr_schedule = warmup_cosine(optimizer, hp.warmup_steps, hp.max_steps)
    data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    noise_generator = torch.Generator().manual_seed(noise_seed)
    order = CacheOrder(cache, hp.batch_size, data_seed)
    state = TrainingState(
        modules={"model": controlnet},
        optimizers={"optimizer": optimizer},
        schedulers={"lr": lr_schedule},
        generators={"noise": noise_generator},
    )
    # Keep every caption's hidden states decoded: batches draw captions from all over the table.
    text = cache.open_text(cache_groups=None)

    run = ResumableRun(checkpoint_dir, fingerprint, state, order, hp, "ControlNet", log)

    step_rows: list[str] = []  # the cache row ids of the step's batch, to name them if its loss blows up

    def batch_loss() -> torch.Tensor:
        batch = order.next_batch()
        step_rows[:] = batch.id
        latents = cache.sample(batch.mean, batch.logvar, noise_generator)  # (B, C, h, w)
        b = len(batch)
        dropped = torch.rand(b, generator=noise_generator) < hp.caption_dropout
        context = text.lookup(torch.where(dropped, text.empty_index, batch.text_index)).to(device)
        t = torch.randint(schedule.num_train_timesteps, (b,), generator=noise_generator)
        noise = torch.randn(latents.shape, generator=noise_generator)
        noisy = schedule.add_noise(latents, noise, t).to(device)
        target = schedule.training_target(latents, noise, t).to(device)
        control = batch_controls(batch, control_of).to(device)  # (B, C_cond, H, W)
        t = t.to(device)
        mask = None if context.attention_mask.all() else context.attention_mask
        down, mid = controlnet(noisy, t, context.hidden_states, mask, control)
        prediction = unet(noisy, t, context.hidden_states, mask, down_residuals=down, mid_residual=mid)
        return F.mse_loss(prediction.float(), target)

    losses = LossHistory(("loss",), hp.log_every, hp.max_steps, device, run.history)
    with run.session():
        for step in range(run.start + 1, hp.max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(controlnet.parameters(), hp.grad_clip)
            row = None
            if run.finite(step, loss, grad_norm, step_rows):
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                row = losses.add(step, loss.detach(), lr)
            lr_schedule.step()
            run.end_step(step)
            if row is not None and on_step is not None:
                on_step(step, hp.max_steps, LossHistory.values(row))
    train_seconds = run.train_seconds()

    metrics = {
        "train_loss_final": run.history[-1]["loss"] if run.history else float("nan"),
        "steps": float(hp.max_steps),
        # Over the whole run, resumed sessions included: a session that resumes at the last step trains none.
        "samples_per_second": hp.max_steps * hp.batch_size / train_seconds,
        "train_seconds": train_seconds,
    }
    return ControlNetTrainingResult(controlnet.eval(), metrics, run.history)
