"""The denoising objective that the UNet, a LoRA and a ControlNet train with.

For a batch of clean latents z0 (in diffusion space):

    t       ~ U{0, T-1};  noise ~ N(0, I) (+ noise_offset * N(0, I) per sample and channel)
    z_t     = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * noise
    loss    = mean over the batch of w(t) * mean((model(z_t, t, context) - target)^2)

or, under a rectified flow's `FlowSchedule`, t logit-normal and shifted, z_t = (1 - t) z0 + t noise and the
target the velocity noise - z0 (`schedule.draw_timesteps`, `add_noise`, `training_target`).

The target is what the schedule's prediction type asks for (epsilon, v or the clean latents). w(t) is 1, or
with min-SNR-gamma min(SNR, gamma) / SNR expressed for the prediction type (Hang et al. 2023). The context is
the caption's embedding, or the empty prompt's with probability caption_dropout: that teaches the
unconditional prediction which classifier-free guidance subtracts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.diffusion.schedule import Schedule
from ldm.errors import InputError
from ldm.models.text_encoder import TextEmbedding
from ldm.training.engine import TrainingConfig

# model(z_t (B, C, h, w), t (B,), hidden_states (B, S, D), mask (B, S) or None) -> prediction (B, C, h, w)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class DenoisingConfig(TrainingConfig):
    caption_dropout: float  # probability of training a row on the empty prompt
    min_snr_gamma: float | None = None  # None: unweighted MSE
    noise_offset: float = 0.0


def loss_weights(schedule: Schedule, t: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights (B,): min(SNR, gamma) / SNR in x0-error units, converted to the prediction type.

    The MSE of an epsilon prediction is SNR times the x0 error, of a v prediction (SNR + 1) times it, so the
    same x0 weighting min(SNR, gamma) reads min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1) there.
    """
    if min_snr_gamma is None:
        return torch.ones(t.shape, dtype=torch.float32)
    if schedule.prediction_type == "flow":
        raise InputError("min_snr_gamma weighs a diffusion objective's loss; a flow objective takes none (null)")
    snr = schedule.snr(t).float()
    clipped = snr.clamp(max=min_snr_gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / snr
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def draw_noise(
    shape: tuple[int, ...], noise_offset: float, generator: torch.Generator, mine: slice = slice(None)
) -> torch.Tensor:
    """The noise of a batch of `shape` (B, C, h, w), with the per-sample, per-channel offset when asked; drawn
    for the whole batch and cut to this rank's rows `mine`, so every rank makes the draws one process makes."""
    noise = torch.randn(shape, generator=generator)[mine]
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)[mine]
    return noise


def denoising_loss(
    model: Denoiser,
    schedule: Schedule,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    context: TextEmbedding,
    min_snr_gamma: float | None,
    device: torch.device,
) -> torch.Tensor:
    """A batch's loss (the module docstring's), a 0-dim tensor. The inputs may be on the CPU: the noising is
    done there, the model's call on `device`."""
    noisy = schedule.add_noise(latents, noise, t).to(device)
    target = schedule.training_target(latents, noise, t).to(device)
    weights = loss_weights(schedule, t, min_snr_gamma).to(device)
    t, context = t.to(device), context.to(device)
    mask = None if context.attention_mask.all() else context.attention_mask
    prediction = model(noisy, t, context.hidden_states, mask)
    per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    return (weights * per_sample).mean()


@torch.no_grad()
def fixed_draw_loss(
    model: Denoiser, schedule: Schedule, batches: Iterable[tuple[torch.Tensor, TextEmbedding]],
    device: torch.device, seed: int,
) -> float:
    """The unweighted loss (MSE to the target, per element) over held-out `batches` of clean latents (B, C, h, w)
    and their context, at fixed draws: the noise comes from `seed`, and the timesteps are spread evenly over
    the schedule within each batch (offset by the rows before it). Two models, or two checkpoints of one run,
    scored on the same batches meet the same draws, so a difference is theirs. NaN without a batch."""
    generator = torch.Generator().manual_seed(seed)
    steps = schedule.num_train_timesteps
    total, count = 0.0, 0
    for latents, context in batches:
        b = len(latents)
        t = (torch.arange(b) * steps // b + count) % steps
        noise = torch.randn(latents.shape, generator=generator)
        context = context.to(device)
        mask = None if context.attention_mask.all() else context.attention_mask
        prediction = model(schedule.add_noise(latents, noise, t).to(device), t.to(device), context.hidden_states, mask)
        target = schedule.training_target(latents, noise, t).to(device)
        total += F.mse_loss(prediction.float(), target, reduction="sum").item() / target[0].numel()
        count += b
    return total / count if count else float("nan")
