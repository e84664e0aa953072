"""Training the KL-VAE: a plain loop, resumable bit for bit from its checkpoints.

    loss = reconstruction(x_hat, x) + kl_weight * KL(q(z|x) || N(0, I))

The reconstruction term is a mean over pixels and batch (l1, mse, or their sum), so its size does not
depend on the image size. The KL term is summed over each sample's latent elements and averaged over the
batch, as Stable Diffusion and diffusers do; against a per-pixel reconstruction term a given `kl_weight`
therefore weighs the KL 3*H*W times more than Stable Diffusion's (which sums the reconstruction over pixels).
With the small weights used (1e-5) the posterior stays nearly deterministic and the latents keep the scale
the encoder chooses, which is measured after training and stored as the config's shift and scaling factors.

The loop is the engine's (`ldm.training.engine`): AdamW, a linear warmup then cosine decay to zero,
gradient-norm clipping, gradient accumulation, autocast, and an optional EMA of the weights; with an EMA, the
EMA weights are the trained model. Data order is a fresh seeded permutation each epoch (the last incomplete
batch of an epoch is dropped, so every batch has the same size). With `flip`, each image is mirrored left to
right with probability 1/2 (drawn from the data generator, so a resumed run draws the same flips): the VAE
reads no captions, so a mirrored image is a new image to reconstruct on any data, even where captions say
left or right; it narrowed the gap between train and val PSNR on 700 drawings.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ldm.data.ingested import IngestedImages
from ldm.data.order import index_order
from ldm.errors import InputError
from ldm.evaluation.reconstruction import reconstruction_metrics
from ldm.models.vae import VAE, VAEConfig
from ldm.training.checkpoint import run_fingerprint
from ldm.training.distributed import SINGLE_PROCESS, DataParallel
from ldm.training.engine import StepCallback, TrainingConfig, train, trajectory

logger = logging.getLogger(__name__)

RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,
    "mse": F.mse_loss,
    "l1+mse": lambda x_hat, x: F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x),
}



@dataclass(frozen=True, kw_only=True)
class VAETrainingConfig(TrainingConfig):
    """The training hyperparameters (the params schema's `train_vae` section holds their defaults)."""

    batch_size: int  # images per micro-batch
    recon_loss: str  # a key of RECONSTRUCTION_LOSSES
    kl_weight: float
    scaling_batches: int  # train batches whose latents set the shift and scaling factors
    flip: bool = False  # mirror each image left to right with probability 1/2

    def __post_init__(self) -> None:
        if self.recon_loss not in RECONSTRUCTION_LOSSES:
            raise InputError(f"recon_loss={self.recon_loss!r} is unknown; use one of {sorted(RECONSTRUCTION_LOSSES)}")


class VAETrainingResult(NamedTuple):
    vae: VAE  # in eval mode, on the training device, with the measured shift and scaling factors
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, recon, kl, lr (kept across resumes)




@torch.no_grad()
def latent_statistics(
    vae: VAE, data: IngestedImages, batch_size: int, num_batches: int, generator: torch.Generator
) -> tuple[float, float]:
    """Mean and std over every element of posterior *samples* of `num_batches` random batches of `data`.

    Samples, not means: the diffusion model is trained on samples (as in Stable Diffusion), so those are
    what must come out centred with unit variance; with a small KL weight the two barely differ.
    """
    device = next(vae.parameters()).device
    chosen = torch.randperm(len(data), generator=generator)[: batch_size * num_batches]
    samples = [
        vae.encode(data.batch(group).to(device)).sample(generator).double().cpu().flatten()
        for indices in chosen.split(batch_size)
        for group in data.by_size(indices.tolist())
    ]
    std, mean = torch.std_mean(torch.cat(samples))
    return mean.item(), std.item()


def train_vae(
    config: VAEConfig,
    train_data: IngestedImages,
    val_data: IngestedImages,
    hp: VAETrainingConfig,
    checkpoint_dir: str | Path,
    seed: int,
    device: str | torch.device,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = logger.info,
    ranks: DataParallel = SINGLE_PROCESS,
) -> VAETrainingResult:
    """Train a VAE from `config`, resuming from the newest checkpoint of the same run in `checkpoint_dir`.

    Data-parallel (`ranks` of a torchrun world): every rank walks the same order, encodes its contiguous share
    of each batch and keeps its rows of the whole batch's posterior noise, so the run is the one a single
    process makes. Rank 0 alone checkpoints and calls back; on the other ranks the result's metrics are empty.

    `on_step(step, max_steps, {"loss", "recon", "kl", "lr"})` is called every `log_every` steps (and at the
    last) with the means since the previous call, after any checkpoint of that step is written.
    Metrics: val_psnr, val_ssim, latent_noise_to_signal (`reconstruction_metrics`), train_loss_final (the last
    logged loss), latent_mean, latent_std (raw latents, before shift and scale), and the engine's steps,
    samples_per_second, train_seconds (the loop alone, summed over resumed sessions) and skipped_steps.
    """
    device = torch.device(device)
    fingerprint = run_fingerprint(
        vae=config.model_dump(mode="json"),
        # Without flips the fingerprint is the one runs had before `flip` existed, so their checkpoints resume.
        training=trajectory(hp, ("scaling_batches",) if hp.flip else ("scaling_batches", "flip")),
        seed=seed,
        train_images=hashlib.sha256("\n".join(train_data.ids).encode()).hexdigest(),
    )
    # Weights are drawn on the CPU from the seed alone, so a seed gives the same start on any device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(config)
    vae.to(device).train()
    # CPU generators: their states are portable, and the same seed picks the same data and noise anywhere.
    data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    data_generator = torch.Generator().manual_seed(data_seed)
    noise_generator = torch.Generator().manual_seed(noise_seed)
    order = index_order(train_data.sizes, hp.batch_size, data_generator)
    reconstruction_loss = RECONSTRUCTION_LOSSES[hp.recon_loss]
    mine = ranks.share(hp.batch_size, "batch_size")
    f = vae.downsampling_factor

    def micro_batch(net: torch.nn.Module) -> tuple[torch.Tensor, list[str]]:
        indices = order.next_batch()[mine]
        images = train_data.batch(indices).to(device)  # (B, 3, H, W)
        if hp.flip:
            # Drawn for the whole batch on every rank, so a data-parallel run flips what one process would.
            mirrored = (torch.rand(hp.batch_size, generator=data_generator) < 0.5)[mine].to(device)
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        noise_shape = (hp.batch_size, config.latent_channels, images.shape[-2] // f, images.shape[-1] // f)
        noise = torch.randn(noise_shape, generator=noise_generator)[mine]
        reconstructions, posterior = net(images, noise=noise)
        recon = reconstruction_loss(reconstructions, images)
        kl = posterior.kl().mean()
        return torch.stack([recon + hp.kl_weight * kl, recon, kl]), [train_data.ids[i] for i in indices]

    trained = train(
        "VAE", vae, micro_batch, order, hp, checkpoint_dir, fingerprint, device, terms=("loss", "recon", "kl"),
        generators={"data": data_generator, "noise": noise_generator}, ranks=ranks, log=log, on_step=on_step,
    )
    model = (trained.ema.module if trained.ema is not None else vae).eval()
    if not ranks.is_main:
        return VAETrainingResult(model, {}, trained.history)

    mean, std = latent_statistics(
        model, train_data, hp.batch_size, hp.scaling_batches, torch.Generator().manual_seed(seed)
    )
    # Scaled latents (z - shift) * scale then have mean 0 and std 1 over the measured batches.
    model.config = config.model_copy(update={"shift_factor": mean, "scaling_factor": 1.0 / std})
    metrics = {
        **reconstruction_metrics(model, val_data, hp.batch_size),
        **trained.metrics(hp.max_steps, hp.batch_size * hp.grad_accumulation),
        "latent_mean": mean,
        "latent_std": std,
    }
    return VAETrainingResult(model, metrics, trained.history)
