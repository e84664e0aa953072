"""DVC stage `train_vae`: train the KL-VAE on the ingested images; save it with its latent shift and scale.

reads:  paths.ingested (train and val splits); params seed, image_size, device, train_vae
writes: paths.vae/                          config.json + model.safetensors (with shift_factor, scaling_factor)
        paths.metrics/train_vae.json        val_psnr, val_ssim, train_loss_final, latent_mean, latent_std, ...
        paths.metrics/headline/train_vae.json    the DVC metric: val_psnr
        paths.plots/train_vae/loss.csv      step, loss, recon, kl, lr (a DVC plot)
        paths.plots/train_vae/reconstructions.png   val originals over their reconstructions
        paths.vae_checkpoints/              resumable checkpoints: an interrupted run continues from the
                                            newest one; checkpoints of other params or data are discarded

    python -m stages.train_vae [--params params.yaml]
    torchrun --nproc-per-node N -m stages.train_vae     # data-parallel: the same run, each rank a share of each batch
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ldm.data.ingested import IngestedImages
from ldm.errors import InputError
from ldm.evaluation.reconstruction import reconstruction_grid
from ldm.models.modeling import atomic_path
from ldm.training.checkpoint import atomic_directory
from ldm.training.distributed import DataParallel, data_parallel
from ldm.training.vae import VAETrainingConfig, train_vae
from stages.params import Params, resolve_device
from stages.reporting import (
    REBUILD_INGESTED,
    Reporter,
    StageResult,
    stage_main,
    training_progress,
    write_csv,
    write_headline,
    write_json,
)

STAGE = "train_vae"
LOSS_COLUMNS = ("step", "loss", "recon", "kl", "lr")


def load_splits(params: Params) -> tuple[IngestedImages, IngestedImages]:
    try:
        train, val = IngestedImages(params.paths.ingested, "train"), IngestedImages(params.paths.ingested, "val")
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"paths.ingested: {e} ({REBUILD_INGESTED})") from None
    expected = params.ingested_sizes()
    other = sorted(set(train.sizes + val.sizes) - expected)
    if other:
        w, h = other[0]
        wanted = "the buckets " + str(sorted(expected)) if params.ingest.aspect == "buckets" else (
            f"image_size {params.image_size}")
        raise InputError(
            f"{params.paths.ingested} holds {w}x{h} images but the params ask for {wanted}; "
            f"re-run the ingest stage (`dvc repro ingest`)"
        )
    return train, val


def run(params: Params, reporter: Reporter) -> StageResult:
    with data_parallel(resolve_device(params.device)) as (ranks, device):
        return _run(params, reporter, ranks, device)


def _run(params: Params, reporter: Reporter, ranks: DataParallel, device: torch.device) -> StageResult:
    paths, section = params.paths, params.train_vae
    train, val = load_splits(params)
    hp = VAETrainingConfig(**section.model_dump(exclude={"model", "grid_images"}))
    reporter.info(
        f"{STAGE}: {len(train)} train and {len(val)} val images, {hp.max_steps} steps on {device}"
        + ranks.label
    )

    on_step = training_progress(reporter, STAGE)
    vae, metrics, history = train_vae(
        params.vae_config(), train, val, hp, paths.vae_checkpoints, params.seed, device, on_step, reporter.info, ranks
    )
    if not ranks.is_main:  # rank 0 writes the outputs
        return StageResult()

    model_dir = Path(paths.vae)
    with atomic_directory(model_dir) as tmp:
        vae.save_pretrained(tmp)
    write_json(Path(paths.metrics) / f"{STAGE}.json", metrics)
    write_headline(paths.metrics, STAGE, {"val_psnr": metrics["val_psnr"]})
    plots = Path(paths.plots) / STAGE
    plots.mkdir(parents=True, exist_ok=True)
    loss_csv, grid_png = plots / "loss.csv", plots / "reconstructions.png"
    write_csv(loss_csv, history, LOSS_COLUMNS)
    originals = [val[i] for i in range(min(section.grid_images, len(val)))]
    with atomic_path(grid_png) as tmp:
        reconstruction_grid(vae, originals).save(tmp, format="PNG")

    reporter.info(
        f"{STAGE}: val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}, "
        f"latents mean {metrics['latent_mean']:.3f} std {metrics['latent_std']:.3f}, "
        f"{metrics['train_seconds']:.0f} s of training; saved to {model_dir}"
    )
    return StageResult(metrics=metrics, artifacts=[grid_png, loss_csv], model_dir=model_dir)


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Train the KL-VAE on the ingested images and save it with its latent shift and scale.", run,
        lambda r: f"val PSNR {r.metrics['val_psnr']:.2f} dB, SSIM {r.metrics['val_ssim']:.4f}; saved to {r.model_dir}",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
