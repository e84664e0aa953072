"""Stage `cache_latents`: encode every ingested image with the trained VAE and every distinct caption with the
text encoder, once, into the Parquet latent cache that UNet training streams (ldm.data.latent_cache).

Reads `paths.ingested` and `paths.vae`; params `device`, `text_encoder`, `cache_latents`; writes
`paths.latents/` (shards, text_embeddings.parquet, manifest.json), `paths.metrics/cache_latents.json` and its
headline `paths.metrics/headline/cache_latents.json` (the DVC metric: rows).

    python -m stages.cache_latents [--params params.yaml]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ldm.data.ingested import shard_paths
from ldm.data.latent_cache import MANIFEST_NAME, vae_hash, write_latent_cache
from ldm.errors import InputError
from ldm.models.modeling import CONFIG_NAME, WEIGHTS_NAME
from ldm.models.text_encoder import TextEncoder
from ldm.models.vae import VAE
from stages.params import Params, resolve_device
from stages.reporting import REBUILD_INGESTED, Reporter, StageResult, stage_main, write_headline, write_json

STAGE = "cache_latents"
METRICS_NAME = "cache_latents.json"


def run(params: Params, reporter: Reporter) -> StageResult:
    started = time.perf_counter()
    paths, knobs = params.paths, params.cache_latents
    vae_dir = Path(paths.vae)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (vae_dir / name).is_file()]
    if missing:
        raise InputError(f"no trained VAE in {vae_dir} ({', '.join(missing)} missing); run `dvc repro train_vae` first")
    try:
        shard_paths(paths.ingested)  # fails with what to run before the models take seconds to load
    except InputError as e:
        raise InputError(f"{e} ({REBUILD_INGESTED})") from None
    device = resolve_device(params.device)
    vae = VAE.from_pretrained(vae_dir, device=device)
    text_encoder = TextEncoder.from_pretrained(params.text_encoder.name, params.text_encoder.max_length, device=device)
    reporter.info(f"{STAGE}: encoding {paths.ingested} with the VAE in {vae_dir} and {text_encoder.name!r} on {device}")

    encoding = time.perf_counter()
    summary = write_latent_cache(
        paths.ingested,
        paths.latents,
        vae,
        vae_hash(vae_dir),
        text_encoder,
        batch_size=knobs.batch_size,
        flip=knobs.flip,
        rows_per_shard=knobs.rows_per_shard,
        rows_per_group=knobs.rows_per_group,
        progress=lambda done, total: reporter.progress(STAGE, done, total),
    )
    finished = time.perf_counter()
    rows = sum(summary.rows.values())
    metrics = {
        "rows": rows,
        **{f"rows_{split}": n for split, n in sorted(summary.rows.items())},
        "images": summary.images,
        "encoded_images": summary.encoded_images,
        "captions": summary.captions,
        "seconds": round(finished - started, 3),
        # Of the encoding and writing alone, without loading the models.
        "rows_per_second": round(rows / (finished - encoding), 1),
        # Of the scaled posterior means: near 0 and 1 when the VAE's scaling and shift factors fit its latents.
        "latent_mean": summary.latent_mean,
        "latent_std": summary.latent_std,
    }
    metrics_path = write_json(Path(paths.metrics) / METRICS_NAME, metrics)
    write_headline(paths.metrics, STAGE, {"rows": rows})
    reporter.metrics(metrics)
    return StageResult(metrics=metrics, artifacts=[metrics_path, Path(paths.latents) / MANIFEST_NAME])


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Encode the ingested images (trained VAE) and captions (text encoder) into the latent cache.", run,
        lambda r: f"cached {r.metrics['rows']} rows ({r.metrics['images']} images, {r.metrics['captions']} captions) "
        f"in {r.metrics['seconds']:.1f} s",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
