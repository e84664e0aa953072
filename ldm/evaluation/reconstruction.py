"""How well a VAE gives its images back: PSNR, SSIM and latent noise-to-signal, and a picture of it."""

from __future__ import annotations

import torch
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.data.ingested import IngestedImages
from ldm.evaluation.grids import captioned_grid, on_white
from ldm.models.vae import VAE


@torch.no_grad()
def reconstruction_metrics(vae: VAE, data: IngestedImages, batch_size: int) -> dict[str, float]:
    """PSNR (mean of per-image values, dB) and SSIM of `decode(posterior mode)`, clamped, over all of `data`;
    and the posterior's noise over its signal in the noisiest latent channel: the mean posterior std over the
    std of the posterior means. Above 1 the sampled latents the UNet learns from are mostly noise.

    Both on images mapped to [0, 1] with data_range 1: SSIM's stabilising constants assume non-negative
    intensities, so on [-1, 1] it would not be the standard SSIM (PSNR is the same either way).
    """
    device = next(vae.parameters()).device
    # One process sees all of `data`: no syncing with the other ranks of a data-parallel run, which have left.
    psnr = PeakSignalNoiseRatio(
        data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3), sync_on_compute=False
    ).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
    means, stds = [], []
    for _, images in data.iter_batches(batch_size):
        images = images.to(device)
        posterior = vae.encode(images)
        reconstructions = vae.decode(posterior.mode())
        psnr.update((reconstructions + 1) / 2, (images + 1) / 2)
        ssim.update((reconstructions + 1) / 2, (images + 1) / 2)
        means.append(posterior.mean.transpose(0, 1).flatten(1).cpu())  # (L, B*h*w)
        stds.append(posterior.std.transpose(0, 1).flatten(1).cpu())
    signal, noise = torch.cat(means, dim=1).std(dim=1), torch.cat(stds, dim=1).mean(dim=1)
    return {
        "val_psnr": psnr.compute().item(),
        "val_ssim": ssim.compute().item(),
        "latent_noise_to_signal": (noise / signal).max().item(),
    }


@torch.no_grad()
def reconstruction_grid(vae: VAE, images: list[torch.Tensor]) -> Image.Image:
    """Originals (top row) over their reconstructions from the posterior mode (bottom row), upscaled, each
    column captioned with its PSNR.

    images: (3, H, W) each in [-1, 1], of any sizes (aspect-ratio buckets): each is reconstructed at its own
    size and shown whole, centred on a white square as large as the largest side.
    """
    device = next(vae.parameters()).device
    originals = [image.cpu() for image in images]
    reconstructions = [vae.decode(vae.encode(x[None].to(device)).mode())[0].cpu().clamp(-1, 1) for x in originals]
    mse = torch.stack([(r - x).square().mean() for r, x in zip(reconstructions, originals)]).clamp(min=1e-10)
    psnr = 10 * torch.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]: the PSNR of [0, 1] images at data_range 1
    side = max(max(x.shape[-2:]) for x in originals)
    return captioned_grid([on_white(originals, side), on_white(reconstructions, side)],
                          [f"{p:.1f} dB" for p in psnr.tolist()], ["real", "reconstructed"])
