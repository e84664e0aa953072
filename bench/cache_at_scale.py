"""The latent cache at scale: streaming read throughput and peak memory of synthetic caches of 100k and 1M rows
(memory must not grow with the rows), and that ranks read disjoint rows that together are all of them.

    python bench/cache_at_scale.py [--rows 100000 1000000] [--dir /tmp/ldm-cache-bench] [--batch 128]

The caches are built once and kept in --dir (about 1.2 GB per million rows of (4, 8, 8) latents, the cpu
profile's), with the cache writer's own schema, row-group layout and manifest, so `LatentCache` reads them as
it reads the pipeline's. Each size is then read in a fresh process, so that its peak resident memory
(VmHWM) is its own: once as training reads it (shuffled row groups, text lookup, a posterior sample per
batch) and once as bare batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ldm.data.latent_cache import (
    EMPTY_PROMPT,
    EMPTY_TEXT_KEY,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    TEXT_ROWS_PER_GROUP,
    TEXT_TABLE_NAME,
    LatentCache,
    Manifest,
    ShardInfo,
    TextEncoderInfo,
    TextTableInfo,
    VAEInfo,
    text_key,
)

# The writer's internals, so the synthetic files have exactly the layout write_latent_cache gives.
from ldm.data.latent_cache import _TEXT_SCHEMA, _fixed_binary, _GroupedWriter, _latent_schema  # isort: skip
from ldm.models.modeling import file_sha256
from ldm.models.vae import VAEConfig

LATENT_SHAPE = (4, 8, 8)
CAPTIONS = 11_500  # distinct captions, as in the cpu profile's cache
TOKENS, HIDDEN = 16, 384
ROWS_PER_GROUP, ROWS_PER_SHARD = 1024, 131_072  # the cache_latents stage's defaults
WRITE_CHUNK = 65_536


def build(directory: Path, rows: int) -> None:
    """A cache of `rows` train rows with random posteriors and CAPTIONS captions (MiniLM-sized states)."""
    if (directory / MANIFEST_NAME).is_file():
        return
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = [f"synthetic caption {i}" for i in range(CAPTIONS)]
    keys = [text_key(c) for c in captions]

    text = _GroupedWriter(_TEXT_SCHEMA, lambda: directory / TEXT_TABLE_NAME, TEXT_ROWS_PER_GROUP, None)
    for caption, key in [(EMPTY_PROMPT, EMPTY_TEXT_KEY), *zip(captions, keys)]:
        states = rng.standard_normal((TOKENS, HIDDEN)).astype("<f2").tobytes()
        text.add(pa.RecordBatch.from_pylist(
            [{"text_key": key, "caption": caption, "length": TOKENS, "hidden_states": states}], schema=_TEXT_SCHEMA
        ))
    text.close()

    schema = _latent_schema(LATENT_SHAPE)
    shard_paths = (directory / SHARD_PATTERN.format(n) for n in range(1 << 20))
    latents = _GroupedWriter(schema, lambda: next(shard_paths), ROWS_PER_GROUP, ROWS_PER_SHARD)
    for start in range(0, rows, WRITE_CHUNK):
        n = min(WRITE_CHUNK, rows - start)
        which = rng.integers(CAPTIONS, size=n)
        latents.add(pa.RecordBatch.from_arrays(
            [
                pa.array([f"{i:064x}" for i in range(start, start + n)]),
                pa.array([captions[c] for c in which]),
                pa.array(["train"] * n),
                pa.array(np.zeros(n, dtype=bool)),
                pa.array([keys[c] for c in which]),
                _fixed_binary(rng.standard_normal((n, *LATENT_SHAPE)).astype("<f2")),
                _fixed_binary(rng.uniform(-8, -4, (n, *LATENT_SHAPE)).astype("<f2")),
                pa.nulls(n, pa.string()),
            ],
            schema=schema,
        ))
    shards = [
        ShardInfo(file=path.name, split="train", rows=sum(groups), row_groups=groups, sha256=file_sha256(path))
        for path, groups in latents.close()
    ]
    manifest = Manifest(
        format=FORMAT, version=FORMAT_VERSION,
        vae=VAEInfo(sha256="0" * 64, config=VAEConfig(block_out_channels=(128, 256, 512, 512), sample_size=32)),
        text_encoder=TextEncoderInfo(name="synthetic", max_length=77, hidden_size=HIDDEN),
        latent_shape=LATENT_SHAPE, flip=False, rows={"train": rows}, images=rows, captions=CAPTIONS, shards=shards,
        text_table=TextTableInfo(
            file=TEXT_TABLE_NAME, rows=CAPTIONS + 1, sha256=file_sha256(directory / TEXT_TABLE_NAME),
            empty_key=EMPTY_TEXT_KEY,
        ),
    )
    (directory / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1) + "\n")


def peak_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, where there is one: ru_maxrss survives exec, so a
    process started by a bigger one would report its parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read(directory: Path, batch: int, training: bool) -> dict:
    """One pass over the cache's train rows; run in its own process (see the module docstring)."""
    imported = peak_mb()
    cache = LatentCache(directory)
    text = cache.open_text(cache_groups=None) if training else None
    generator = torch.Generator().manual_seed(0)
    opened = peak_mb()
    rows, started = 0, time.perf_counter()
    for part in cache.iter_batches("train", batch, seed=0 if training else None):
        if training:
            cache.sample(part.mean, part.logvar, generator)
            text.lookup(part.text_index)
        rows += len(part)
    seconds = time.perf_counter() - started
    return {"rows": rows, "rows_per_second": rows / seconds, "imported_mb": imported, "opened_mb": opened,
            "peak_mb": peak_mb()}


def ranks_partition(directory: Path, world_size: int, batch: int) -> bool:
    """Whether `world_size` ranks read disjoint rows that together are every row."""
    cache = LatentCache(directory)
    seen = [
        {i for part in cache.iter_batches("train", batch, rank=r, world_size=world_size, seed=1) for i in part.id}
        for r in range(world_size)
    ]
    union = set().union(*seen)
    return sum(map(len, seen)) == len(union) == cache.num_rows("train")


def measure(directory: Path, batch: int, training: bool) -> dict:
    command = [sys.executable, __file__, "--read", str(directory), "--batch", str(batch)]
    done = subprocess.run(command + (["--training"] if training else []), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ldm-cache-bench"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--read", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--training", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read(args.read, args.batch, args.training)))
        return

    results = {}
    for rows in args.rows:
        directory = args.dir / f"rows-{rows}"
        started = time.perf_counter()
        build(directory, rows)
        size = sum(p.stat().st_size for p in directory.iterdir()) / 1e9
        print(f"{rows:>9,} rows: cache {size:.2f} GB ({time.perf_counter() - started:.0f} s to build or find)")
        for training in (False, True):
            r = measure(directory, args.batch, training)
            results[(rows, training)] = r
            print(f"    {'training read' if training else 'bare batches '}: {r['rows_per_second']:>10,.0f} rows/s, "
                  f"peak {r['peak_mb']:.0f} MB ({r['imported_mb']:.0f} MB after imports, {r['opened_mb']:.0f} MB "
                  "once the cache and its captions were open)")
    smallest, largest = min(args.rows), max(args.rows)
    for training in (False, True):
        ratio = results[(largest, training)]["peak_mb"] / results[(smallest, training)]["peak_mb"]
        print(f"peak memory {largest:,} / {smallest:,} rows ({'training' if training else 'bare'}): {ratio:.2f}x")
    ok = ranks_partition(args.dir / f"rows-{smallest}", args.world_size, args.batch)
    print(f"{args.world_size} ranks over {smallest:,} rows: disjoint and complete: {ok}")


if __name__ == "__main__":
    main()
