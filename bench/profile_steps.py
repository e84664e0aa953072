"""Seconds per training step of each profile in configs/ on this machine, VAE and UNet, and what a whole
training at that profile's max_steps would take here.

    python bench/profile_steps.py [--profiles cpu cpu64 gpu256] [--repeats 5]

A step is what the training engine does per micro-batch: forward at fp32, the loss
(the VAE's reconstruction + KL, the UNet's v/eps MSE), backward, gradient clipping and fused AdamW, on random
data of the profile's shapes (captions of 16 tokens, about a tux paint or shapes caption). CPU profiles run
at their batch size; gpu256 at batch 1 (its step at batch 64 would take minutes here); sd15 is not run
(weights, gradients and AdamW alone take 14 GB; `scripts/profile_cost.py` sizes it). Steps of the profiles
take turns, so the noise of a shared machine hits them alike; medians, with ratios to the cpu profile.
Achieved GFLOP/s divides `ldm.models.cost`'s count by the time. gpu256's bf16 is for GPUs: this CPU has no
AMX, and under bf16 autocast a 256 px VAE step ran over 10x slower than at fp32, so every profile steps at fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ldm.models.cost import unet_step_cost, vae_step_cost
from ldm.models.text_encoder import text_hidden_size
from ldm.models.unet import UNet
from ldm.models.vae import VAE
from ldm.training.optim import adamw
from stages.params import load_params
from stages.train_unet import model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENS = 16
SMALL_BATCH = {"gpu256": 1}  # profiles too large to step at their own batch size here


def _stepper(model: torch.nn.Module, loss_of):
    optimizer = adamw(model.parameters(), 1e-4, 0.0)

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_of(model).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - started

    return step


def _profile(name: str):
    """(params, {"VAE": (step, batch, flops), "UNet": (...)}) for one profile."""
    params = load_params(CONFIGS / f"{name}.yaml")
    vae_config = params.vae_config()
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    size, latent = params.image_size, params.image_size // factor
    text_width = text_hidden_size(params.text_encoder.name)
    unet_config = model_config(params, vae_config.latent_channels, latent, text_width)
    vae_batch = SMALL_BATCH.get(name, params.train_vae.batch_size)
    unet_batch = SMALL_BATCH.get(name, params.train_unet.batch_size)
    torch.manual_seed(0)
    images = torch.rand(vae_batch, 3, size, size) * 2 - 1  # (B, 3, H, W)
    latents = torch.randn(unet_batch, vae_config.latent_channels, latent, latent)  # (B, C, h, w)
    timesteps = torch.randint(0, 1000, (unet_batch,))
    context = torch.randn(unet_batch, TOKENS, text_width)  # (B, T, D)

    def vae_loss(vae: VAE) -> torch.Tensor:
        reconstructions, posterior = vae(images)
        return (reconstructions - images).abs().mean() + 1e-6 * posterior.kl().mean()

    def unet_loss(unet: UNet) -> torch.Tensor:
        return (unet(latents, timesteps, context) - latents).square().mean()

    return params, {
        "VAE": (_stepper(VAE(vae_config), vae_loss), vae_batch,
                vae_step_cost(vae_config, vae_batch, size, size).flops_per_step),
        "UNet": (_stepper(UNet(unet_config), unet_loss), unet_batch,
                 unet_step_cost(unet_config, unet_batch, latent, latent, TOKENS).flops_per_step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "cpu64", "gpu256"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model, after one warm-up step")
    args = parser.parse_args()
    profiles = {name: _profile(name) for name in args.profiles}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats + 1):
        for name, (_, models) in profiles.items():
            for model, (step, _, _) in models.items():
                times.setdefault((name, model), []).append(step())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} steps after a warm-up")
    print(f"{'profile':<8} {'model':<5} {'batch':>5} {'s/step':>8} {'x cpu':>7} {'GFLOP/s':>8} {'max_steps':>9} {'training':>9}")
    for name, (params, models) in profiles.items():
        for model, (_, batch, flops) in models.items():
            median = statistics.median(times[name, model][1:])
            baseline = statistics.median(times["cpu", model][1:]) if "cpu" in profiles else float("nan")
            section = params.train_vae if model == "VAE" else params.train_unet
            full_batch = batch == section.batch_size
            total = f"{median * section.max_steps / 60:.0f} min" if full_batch else "-"
            print(f"{name:<8} {model:<5} {batch:>5} {median:>8.3f} {median / baseline:>7.1f} {flops / median / 1e9:>8.1f} "
                  f"{section.max_steps:>9} {total:>9}")


if __name__ == "__main__":
    main()
