"""The denoising loss on held-out data at fixed draws: the same timesteps and noise for every model and every
call, so two models (the base UNet and one with a LoRA, or two checkpoints of one run) compare on equal terms,
and a difference is the models' and not the draws'. The loss is on any data: it needs no classifier."""

from __future__ import annotations

import torch

from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.text_encoder import TextEmbedding
from ldm.training.denoising import Denoiser, denoising_loss


@torch.no_grad()
def fixed_draw_loss(
    model: Denoiser, schedule: NoiseSchedule, latents: torch.Tensor, context: TextEmbedding, device: torch.device,
    draws: int = 4, seed: int = 0, batch_size: int = 256,
) -> float:
    """Mean denoising loss (MSE to the schedule's target, unweighted) of `model` on clean `latents` (N, C, h, w)
    with their `context`, over `draws` passes. The timesteps are spread evenly over the schedule (one per
    sample and pass, in a seeded order), which lowers the variance against drawing them at random."""
    count = len(latents)
    generator = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0, schedule.num_train_timesteps - 1, draws * count).round().long()
    timesteps = spread[torch.randperm(draws * count, generator=generator)].view(draws, count)
    total = 0.0
    for d in range(draws):
        noise = torch.randn(latents.shape, generator=generator)
        for start in range(0, count, batch_size):
            rows = slice(start, start + batch_size)
            loss = denoising_loss(model, schedule, latents[rows], noise[rows], timesteps[d, rows], context[rows],
                                  None, device)
            total += loss.item() * len(latents[rows])
    return total / (draws * count)
