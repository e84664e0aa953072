"""What one training step of a params profile's VAE and UNet costs: parameters, FLOPs and memory.

    python scripts/profile_cost.py configs/gpu256.yaml [--ranks N] [--text-width D]

Counted on the meta device (`ldm.models.cost`), so Stable Diffusion's shapes take seconds and no memory, on any
machine. Per model, at one rank's micro-batch (the profile's batch size over `--ranks` GPUs of a torchrun job):
parameters, GFLOP per optimizer step (forward and backward, times grad_accumulation), the activations the backward keeps
(at fp32, and the lower end of it under the profile's bf16/fp16 autocast), and the weights, gradients and
AdamW moments (16 bytes per parameter). The UNet's text width is the text encoder's (its config on this machine);
where it is not here, pass it (768 for CLIP ViT-L/14, SD 1.5's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import InputError
from ldm.models.cost import TrainingCost, unet_step_cost, vae_step_cost
from ldm.models.text_encoder import text_hidden_size
from stages.params import load_params
from stages.train_unet import model_config

GIB = 2**30


def _row(name: str, cost: TrainingCost, batch: int, accumulation: int, precision: str, shape: str) -> str:
    activations = cost.activation_bytes_at(precision)
    return (
        f"{name:<5} {cost.parameters:>13,} {shape:>12} {batch:>6} {cost.flops_per_step * accumulation / 1e9:>12,.1f} "
        f"{cost.activation_bytes / GIB:>14.2f} {activations / GIB:>12.2f} {cost.state_bytes / GIB:>10.2f} "
        f"{(activations + cost.state_bytes) / GIB:>10.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("params", type=Path, help="a params file: params.yaml or one of configs/")
    parser.add_argument("--ranks", type=int, default=1, help="GPUs (torchrun ranks) the batch is split over")
    parser.add_argument("--text-width", type=int, help="the text encoder's hidden size, if it is not on this machine")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        text_width = args.text_width or text_hidden_size(params.text_encoder.name)
    except InputError as e:
        hint = "" if args.text_width else "\n(or give the text encoder's width with --text-width)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    vae = params.vae_config()
    factor = 2 ** (len(vae.block_out_channels) - 1)
    size, latent = params.image_size, params.image_size // factor
    unet = model_config(params, vae.latent_channels, latent, text_width)
    tokens = params.text_encoder.max_length
    v, u = params.train_vae, params.train_unet
    if args.ranks < 1 or v.batch_size % args.ranks or u.batch_size % args.ranks:
        parser.error(f"--ranks {args.ranks} does not divide the batch sizes ({v.batch_size}, {u.batch_size})")
    vae_batch, unet_batch = v.batch_size // args.ranks, u.batch_size // args.ranks
    vae_cost = vae_step_cost(vae, vae_batch, size, size)
    unet_cost = unet_step_cost(unet, unet_batch, latent, latent, tokens)

    print(f"profile {params.profile} ({args.params}): {size}x{size} images, f={factor} VAE, "
          f"{latent}x{latent}x{vae.latent_channels} latents, text {tokens} tokens x {text_width}; per rank of {args.ranks}")
    print(f"{'model':<5} {'parameters':>13} {'input':>12} {'batch':>6} {'GFLOP/step':>12} "
          f"{'act fp32 GiB':>14} {'act ' + v.precision + ' GiB':>12} {'state GiB':>10} {'total GiB':>10}")
    print(_row("VAE", vae_cost, vae_batch, v.grad_accumulation, v.precision, f"3x{size}x{size}"))
    print(_row("UNet", unet_cost, unet_batch, u.grad_accumulation, u.precision,
               f"{vae.latent_channels}x{latent}x{latent}"))
    print("state: fp32 weights, gradients and AdamW's two moments; the EMA copy adds 4 bytes per parameter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
