"""What aspect-ratio buckets cost against centre-cropped squares of about the same pixel area, per training step
of a profile's VAE and UNet on this machine.

    python bench/bucketing_cost.py [--profile cpu64] [--steps 30] [--repeats 3]

Buckets change the tensor shape from batch to batch (BucketOrder shuffles the buckets' batches together), which
costs what shape-specialised kernels, allocator caches and oneDNN primitives spend on each new shape; their
pixels also differ a little from the square's (48x80 is 3,840 pixels against 64x64's 4,096). So the bench
times the same number of steps two ways, taking turns: every batch at the square size, and the batches in a
seeded shuffle of the profile's buckets (`ingest.max_aspect_ratio`, equal shares), and compares the time per
pixel. A ratio above 1 is the bucketed steps' extra cost; the target is within 10%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ldm.data.buckets import bucket_sizes
from ldm.models.text_encoder import text_hidden_size
from ldm.models.unet import UNet
from ldm.models.vae import VAE
from ldm.training.optim import adamw
from stages.params import load_params
from stages.train_unet import model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENS = 16


def _timed_steps(model: torch.nn.Module, loss_of, shapes: list[tuple[int, int]]) -> tuple[float, int]:
    """Seconds for one optimizer step per shape in `shapes` (width, height), and the pixels they covered."""
    optimizer = adamw(model.parameters(), 1e-4, 0.0)
    started, pixels = time.perf_counter(), 0
    for width, height in shapes:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, width, height).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        pixels += width * height
    return time.perf_counter() - started, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu64")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way, taking turns")
    args = parser.parse_args()
    params = load_params(CONFIGS / f"{args.profile}.yaml")
    vae_config = params.vae_config()
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    size = params.image_size
    buckets = bucket_sizes(size * size, params.bucket_multiple(), params.ingest.max_aspect_ratio)
    generator = torch.Generator().manual_seed(0)
    shuffled = [buckets[i] for i in torch.randint(len(buckets), (args.steps,), generator=generator)]
    square = [(size, size)] * args.steps
    text_width = text_hidden_size(params.text_encoder.name)
    unet_config = model_config(params, vae_config.latent_channels, size // factor, text_width)
    vae_batch, unet_batch = params.train_vae.batch_size, params.train_unet.batch_size
    torch.manual_seed(0)
    context = torch.randn(unet_batch, TOKENS, text_width)

    def vae_loss(vae: VAE, width: int, height: int) -> torch.Tensor:
        images = torch.rand(vae_batch, 3, height, width) * 2 - 1
        reconstructions, posterior = vae(images)
        return (reconstructions - images).abs().mean() + 1e-6 * posterior.kl().mean()

    def unet_loss(unet: UNet, width: int, height: int) -> torch.Tensor:
        latents = torch.randn(unet_batch, vae_config.latent_channels, height // factor, width // factor)
        t = torch.randint(0, 1000, (unet_batch,))
        return (unet(latents, t, context) - latents).square().mean()

    models = {"VAE": (VAE(vae_config), vae_loss), "UNet": (UNet(unet_config), unet_loss)}
    per_pixel: dict[tuple[str, str], list[float]] = {}
    for name, (model, loss_of) in models.items():
        _timed_steps(model, loss_of, buckets + [(size, size)])  # every shape once: warm-up
        for _ in range(args.repeats):
            for way, shapes in (("square", square), ("buckets", shuffled)):
                seconds, pixels = _timed_steps(model, loss_of, shapes)
                per_pixel.setdefault((name, way), []).append(seconds / pixels)
    print(f"profile {args.profile}: {size}x{size} squares against buckets {buckets} in a seeded shuffle; "
          f"{args.steps} steps a run, median of {args.repeats} runs, {torch.get_num_threads()} threads")
    print(f"{'model':<5} {'square us/px':>13} {'buckets us/px':>14} {'buckets/square':>15}")
    for name in models:
        square_cost = statistics.median(per_pixel[name, "square"])
        bucket_cost = statistics.median(per_pixel[name, "buckets"])
        print(f"{name:<5} {square_cost * 1e6:>13.3f} {bucket_cost * 1e6:>14.3f} {bucket_cost / square_cost:>15.3f}")


if __name__ == "__main__":
    main()
