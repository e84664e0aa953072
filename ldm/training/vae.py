"""Training the KL-VAE: a plain loop, resumable bit for bit from its checkpoints.

    loss = reconstruction(x_hat, x) + kl_weight * KL(q(z|x) || N(0, I))

The reconstruction term is a mean over pixels and batch (l1, mse, or their sum), so its size does not
depend on the image size. The KL term is summed over each sample's latent elements and averaged over the
batch, as Stable Diffusion and diffusers do; against a per-pixel reconstruction term a given `kl_weight`
therefore weighs the KL 3*H*W times more than Stable Diffusion's (which sums the reconstruction over pixels).
With the small weights used (1e-5) the posterior stays nearly deterministic and the latents keep the scale
the encoder chooses, which is measured after training and stored as the config's shift and scaling factors.

AdamW, a linear warmup then cosine decay to zero, gradient-norm clipping, and an optional EMA of the weights
(`torch.optim.swa_utils.AveragedModel`); with an EMA, the EMA weights are the trained model. Data order is a
fresh seeded permutation each epoch (the last incomplete batch of an epoch is dropped, so every batch has
the same size); no flips, since left and right are part of what captions say.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ldm.data.ingested import IngestedImages
from ldm.data.order import EpochOrder
from ldm.evaluation.reconstruction import reconstruction_metrics
from ldm.models.vae import VAE, VAEConfig
from ldm.training.checkpoint import ResumableRun, TrainingState, run_fingerprint
from ldm.training.distributed import SINGLE_PROCESS, DataParallel
from ldm.training.loss_history import LossHistory
from ldm.training.optim import adamw, warmup_cosine

logger = logging.getLogger(__name__)

RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,
    "mse": F.mse_loss,
    "l1+mse": lambda x_hat, x: F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x),
}

# Fields that change neither the weights reached at a step nor the data seen: a run may resume across them.
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "nonfinite_skips", "log_every", "scaling_batches")

StepCallback = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True, kw_only=True)
class VAETrainingConfig:
    """The training hyperparameters (the params schema's `train_vae` section holds their defaults)."""

    batch_size: int
    max_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    recon_loss: str  # a key of RECONSTRUCTION_LOSSES
    kl_weight: float
    grad_clip: float  # max global gradient norm
    ema_decay: float | None  # None: no EMA, the trained weights are the model
    checkpoint_every: int
    keep_checkpoints: int
    nonfinite_skips: int = 0  # steps with a NaN/inf loss or gradient to skip (counted) before stopping
    log_every: int
    scaling_batches: int  # train batches whose latents set the shift and scaling factors

    def __post_init__(self) -> None:
        if self.recon_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"recon_loss={self.recon_loss!r} is unknown; use one of {sorted(RECONSTRUCTION_LOSSES)}")


class VAETrainingResult(NamedTuple):
    vae: VAE  # in eval mode, on the training device, with the measured shift and scaling factors
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, recon, kl, lr (kept across resumes)


def _batch(data: IngestedImages, indices: list[int], device: torch.device) -> torch.Tensor:  # (B, 3, H, W)
    return torch.stack([data[i] for i in indices]).to(device)


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
        vae.encode(_batch(data, indices.tolist(), device)).sample(generator).double().cpu()
        for indices in chosen.split(batch_size)
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
    logged loss), latent_mean, latent_std (raw latents, before shift and scale), steps, train_seconds (the loop
    alone, summed over resumed sessions).
    """
    device = torch.device(device)
    fingerprint = run_fingerprint(
        vae=config.model_dump(mode="json"),
        training={k: v for k, v in asdict(hp).items() if k not in _BOOKKEEPING},
        seed=seed,
        train_images=hashlib.sha256("\n".join(train_data.ids).encode()).hexdigest(),
    )
    # Weights are drawn on the CPU from the seed alone, so a seed gives the same start on any device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(config)
    vae.to(device).train()
    model = ranks.wrap(vae)
    ema = None
    if hp.ema_decay is not None:
        ema = AveragedModel(vae, multi_avg_fn=get_ema_multi_avg_fn(hp.ema_decay), use_buffers=True)
    optimizer = adamw(vae.parameters(), hp.lr, hp.weight_decay)
    schedule = warmup_cosine(optimizer, hp.warmup_steps, hp.max_steps)
    # CPU generators: their states are portable, and the same seed picks the same data and noise anywhere.
    data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    data_generator = torch.Generator().manual_seed(data_seed)
    noise_generator = torch.Generator().manual_seed(noise_seed)
    order = EpochOrder(len(train_data), hp.batch_size, data_generator)
    state = TrainingState(
        modules={"model": vae} | ({"ema": ema} if ema is not None else {}),
        optimizers={"optimizer": optimizer},
        schedulers={"lr": schedule},
        generators={"data": data_generator, "noise": noise_generator},
    )
    reconstruction_loss = RECONSTRUCTION_LOSSES[hp.recon_loss]

    run = ResumableRun(checkpoint_dir, fingerprint, state, order, hp, "VAE", log, ranks)
    mine = ranks.share(hp.batch_size, "batch_size")
    f = vae.downsampling_factor

    losses = LossHistory(("loss", "recon", "kl"), hp.log_every, hp.max_steps, device, run.history)
    with run.session():
        for step in range(run.start + 1, hp.max_steps + 1):
            indices = order.next_batch()[mine]
            images = _batch(train_data, indices, device)  # (B, 3, H, W)
            noise_shape = (hp.batch_size, config.latent_channels, images.shape[-2] // f, images.shape[-1] // f)
            noise = torch.randn(noise_shape, generator=noise_generator)[mine]
            reconstructions, posterior = model(images, noise=noise)
            recon = reconstruction_loss(reconstructions, images)
            kl = posterior.kl().mean()
            loss = recon + hp.kl_weight * kl

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            terms = ranks.mean(torch.stack([loss, recon, kl]).detach())  # over all ranks, in one all-reduce
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), hp.grad_clip)
            row = None
            if run.finite(step, terms[0], grad_norm, [train_data.ids[i] for i in indices]):
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(vae)
                row = losses.add(step, terms, lr)
            schedule.step()
            run.end_step(step)
            if row is not None and on_step is not None and ranks.is_main:
                on_step(step, hp.max_steps, LossHistory.values(row))
    train_seconds = run.train_seconds()
    if not ranks.is_main:
        return VAETrainingResult((ema.module if ema is not None else vae).eval(), {}, run.history)

    trained = (ema.module if ema is not None else vae).eval()
    mean, std = latent_statistics(
        trained, train_data, hp.batch_size, hp.scaling_batches, torch.Generator().manual_seed(seed)
    )
    # Scaled latents (z - shift) * scale then have mean 0 and std 1 over the measured batches.
    trained.config = config.model_copy(update={"shift_factor": mean, "scaling_factor": 1.0 / std})
    metrics = {
        **reconstruction_metrics(trained, val_data, hp.batch_size),
        "train_loss_final": run.history[-1]["loss"],
        "latent_mean": mean,
        "latent_std": std,
        "steps": float(hp.max_steps),
        "train_seconds": train_seconds,
        "skipped_steps": float(len(run.skipped)),
    }
    return VAETrainingResult(trained, metrics, run.history)
