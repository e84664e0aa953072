"""Aspect-ratio buckets: the bucket list, each image's bucket and fit, batches of one size in a seeded and
resumable order, and a VAE trained on images of three shapes."""

import dataclasses
import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.buckets import bucket_sizes, check_buckets, fit_to_bucket, nearest_bucket, png_size, to_square
from ldm.data.images import resize_center_crop
from ldm.data.ingested import IngestedImages
from ldm.data.latent_cache import LatentCache, vae_hash, write_latent_cache
from ldm.data.order import BucketOrder, CacheOrder, EpochOrder, index_order
from ldm.diffusion.schedule import NoiseSchedule
from ldm.errors import InputError
from ldm.evaluation.grids import at_own_shapes
from ldm.evaluation.reconstruction import reconstruction_metrics
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAE
from ldm.training.distributed import DataParallel
from ldm.training.unet import UNetTrainingConfig, train_unet
from ldm.training.vae import train_vae
from stages import cache_latents as stage_cache_latents
from stages import evaluate as stage_evaluate
from stages import ingest as stage_ingest
from stages import sample as stage_sample
from stages import train_unet as stage_train_unet
from stages import train_vae as stage_train_vae
from stages.params import Params
from tests.ci_stages import RecordingReporter, ci_params
from tests.test_vae_training import CONFIG, HP, write_images


@pytest.mark.parametrize("area, multiple, max_ratio", [(64 * 64, 16, 2.0), (32 * 32, 8, 2.0), (512 * 512, 64, 4.0),
                                                       (96 * 96, 8, 1.5), (1024 * 1024, 64, 2.0)])
def test_buckets_are_about_one_area_in_multiples_of_the_factor_within_the_ratio(area, multiple, max_ratio):
    sizes = bucket_sizes(area, multiple, max_ratio)
    assert sizes == sorted(sizes, key=lambda s: s[0] / s[1]) and len(set(sizes)) == len(sizes)
    assert {(h, w) for w, h in sizes} == set(sizes)  # a portrait bucket for every landscape one
    side = int(area**0.5)
    if side % multiple == 0:
        assert (side, side) in sizes
    for w, h in sizes:
        assert w % multiple == 0 and h % multiple == 0
        assert max(w / h, h / w) <= max_ratio
        # Not over the area, and short of it by less than one row of `multiple` pixels along the longer side.
        assert area - multiple * max(w, h) < w * h <= area
    check_buckets(sizes, multiple)


def test_the_64_px_buckets_and_their_errors():
    assert bucket_sizes(64 * 64, 16, 2.0) == [(48, 80), (64, 64), (80, 48)]
    with pytest.raises(InputError, match="holds no 16x16 bucket"):
        bucket_sizes(100, 16, 2.0)
    with pytest.raises(InputError, match="below 1"):
        bucket_sizes(4096, 16, 0.5)
    with pytest.raises(InputError, match=r"\[\(60, 64\)\] are not multiples of 16"):
        check_buckets([(64, 64), (60, 64)], 16)


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    buckets = bucket_sizes(64 * 64, 16, 2.0)
    assert nearest_bucket(100, 200, buckets) == (48, 80)
    assert nearest_bucket(300, 200, buckets) == (80, 48)
    assert nearest_bucket(120, 110, buckets) == (64, 64)
    assert nearest_bucket(1000, 100, buckets) == (80, 48)  # beyond the max ratio: the widest bucket
    # Log space: 2:1 and 1:2 are as far from square; 1.25:1 is nearer 1:1 (log 0.22) than 5:3 (log 0.29).
    assert nearest_bucket(125, 100, buckets) == (64, 64)


def test_a_bucket_keeps_what_a_square_crop_cuts_off():
    # A 2:1 drawing with a red band down its left fifth: the square crop of the centre loses the band, the
    # 80x48 bucket keeps most of it.
    image = Image.new("RGB", (160, 80), "white")
    image.paste((255, 0, 0), (0, 0, 32, 80))
    bucketed, square = fit_to_bucket(image, (80, 48)), resize_center_crop(image, 64)
    assert bucketed.size == (80, 48) and square.size == (64, 64)
    assert bucketed.getpixel((2, 24))[1] < 40  # red at its left edge
    assert all(square.getpixel((x, 32)) == (255, 255, 255) for x in range(0, 64, 8))


def test_png_size_reads_the_header():
    buffer = io.BytesIO()
    Image.new("RGB", (48, 80)).save(buffer, format="PNG")
    assert png_size(buffer.getvalue()) == (48, 80)
    with pytest.raises(InputError, match="not PNG bytes"):
        png_size(b"GIF89a" + bytes(30))


SIZES = [(48, 80)] * 30 + [(64, 64)] * 61 + [(80, 48)] * 9  # 100 images in 3 buckets, mixed in dataset order
SIZES = [SIZES[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(0))]


def test_bucket_batches_are_one_size_in_proportion_to_each_bucket_and_seeded():
    order = BucketOrder(SIZES, 8, torch.Generator().manual_seed(1))
    assert order.batches_per_epoch == 30 // 8 + 61 // 8 + 9 // 8 == 11
    epochs = [[order.next_batch() for _ in range(11)] for _ in range(3)]
    for epoch in epochs:
        assert all(len(batch) == 8 and len({SIZES[i] for i in batch}) == 1 for batch in epoch)
        seen = [i for batch in epoch for i in batch]
        assert len(seen) == len(set(seen)) == 88  # no image twice in an epoch; each bucket's remainder left out
        assert [sum(SIZES[b[0]] == size for b in epoch) for size in [(48, 80), (64, 64), (80, 48)]] == [3, 7, 1]
    assert epochs[0] != epochs[1]  # a new order each epoch
    again = BucketOrder(SIZES, 8, torch.Generator().manual_seed(1))
    assert [again.next_batch() for _ in range(11)] == epochs[0]


def test_bucket_order_resumes_from_its_state_and_generator():
    generator = torch.Generator().manual_seed(2)
    order = BucketOrder(SIZES, 8, generator)
    for _ in range(15):
        order.next_batch()
    state, generator_state = order.state_dict(), generator.get_state()
    expected = [order.next_batch() for _ in range(20)]
    restored_generator = torch.Generator()
    restored_generator.set_state(generator_state)
    restored = BucketOrder(SIZES, 8, restored_generator)
    restored.load_state_dict(state)
    assert [restored.next_batch() for _ in range(20)] == expected


def test_one_size_keeps_the_epoch_order_and_no_full_batch_is_an_error():
    assert isinstance(index_order([(32, 32)] * 10, 4, torch.Generator()), EpochOrder)
    assert isinstance(index_order(SIZES, 4, torch.Generator()), BucketOrder)
    with pytest.raises(InputError, match="no image size \\(bucket\\) has a batch of 40 images, the largest 30"):
        BucketOrder([(48, 80)] * 30 + [(80, 48)] * 20, 40, torch.Generator())


def mixed_images(count, seed):
    """Squares of a colour on grey at three shapes of about 16x16 pixels: portrait, square, landscape."""
    generator = torch.Generator().manual_seed(seed)
    shapes, colors = [(12, 20), (16, 16), (20, 12)], [(220, 20, 20), (20, 160, 40), (30, 70, 230), (250, 220, 0)]
    images = []
    for _ in range(count):
        w, h = shapes[int(torch.randint(3, (1,), generator=generator))]
        image = Image.new("RGB", (w, h), (235, 235, 235))
        x, y = (int(torch.randint(n - 6, (1,), generator=generator)) for n in (w, h))
        image.paste(colors[int(torch.randint(4, (1,), generator=generator))], (x, y, x + 6, y + 6))
        images.append(image)
    return images


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    images = mixed_images(216, seed=0)
    directory = write_images(tmp_path_factory.mktemp("mixed"), images, ["a square"] * 216, num_train=192)
    return IngestedImages(directory, "train"), IngestedImages(directory, "val")


def test_a_vae_trains_on_images_of_three_shapes_and_resumes_bitwise(mixed, tmp_path):
    train, val = mixed
    assert sorted(set(train.sizes)) == [(12, 20), (16, 16), (20, 12)]
    hp = dataclasses.replace(HP, max_steps=120, checkpoint_every=40, log_every=10, scaling_batches=4, flip=True)
    vae, metrics, history = train_vae(CONFIG, train, val, hp, tmp_path / "straight", seed=0, device="cpu")
    assert history[-1]["loss"] < history[0]["loss"] / 3, (history[0], history[-1])
    # Every val image is reconstructed at its own shape: measured 16.7 dB after 120 steps (untrained: 6.7 dB).
    assert metrics["val_psnr"] > 14 and 0 < metrics["latent_std"] < 10
    shapes = {tuple(x.shape[-2:]) for _, x in val.iter_batches(16)}
    assert shapes <= {(20, 12), (16, 16), (12, 20)} and len(shapes) > 1

    def stop_at_40(step, total, values):
        if step == 40:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_vae(CONFIG, train, val, hp, tmp_path / "resumed", seed=0, device="cpu", on_step=stop_at_40)
    resumed, resumed_metrics, resumed_history = train_vae(CONFIG, train, val, hp, tmp_path / "resumed", seed=0,
                                                          device="cpu")
    assert resumed_history == history
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), resumed.state_dict().values()))
    assert resumed_metrics["val_psnr"] == metrics["val_psnr"]


def test_reconstruction_metrics_batch_each_size_alone(mixed):
    _, val = mixed
    batches = list(val.iter_batches(5))
    assert sorted(i for indices, _ in batches for i in indices) == list(range(len(val)))
    assert all(x.shape[0] == len(indices) <= 5 and len({val.sizes[i] for i in indices}) == 1 for indices, x in batches)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        metrics = reconstruction_metrics(VAE(CONFIG).eval(), val, 5)
    assert 0 < metrics["val_psnr"] < 10  # an untrained VAE (measured 6.7 dB), on every image


# ------------------------------------------------------------------------- the latent cache and UNet training


@pytest.fixture(scope="module")
def bucketed_cache(tmp_path_factory):
    """The three-shape images with captions of their colour, a tiny f=2 VAE and their latent cache."""
    root = tmp_path_factory.mktemp("bucketed")
    images = mixed_images(120, seed=1)
    captions = [f"a square {i % 7}" for i in range(120)]
    write_images(root / "ingested", images, captions, num_train=100)
    torch.manual_seed(0)
    VAE(CONFIG).save_pretrained(root / "vae")
    vae = VAE.from_pretrained(root / "vae")
    encoder = TextEncoder.from_pretrained()
    summary = write_latent_cache(root / "ingested", root / "latents", vae, vae_hash(root / "vae"), encoder,
                                 batch_size=32, rows_per_group=8, rows_per_shard=16)
    return root, vae, summary


def test_the_cache_stores_each_bucket_at_its_own_shape(bucketed_cache):
    root, vae, summary = bucketed_cache
    cache = LatentCache(root / "latents")
    train = IngestedImages(root / "ingested", "train")
    expected = Counter((4, h // 2, w // 2) for w, h in train.sizes)
    assert cache.latent_shapes("train") == dict(sorted(expected.items())) and len(expected) == 3
    assert cache.latent_shape == (4, 8, 8)  # the square training size's: the VAE's 16 px over f=2
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert {tuple(s.get("latent_shape", (4, 8, 8))) for s in manifest["shards"] if s["split"] == "train"} == set(expected)
    with pytest.raises(InputError, match="aspect-ratio buckets.*shape="):
        next(cache.iter_batches("train", 4))
    index = {image_id: i for i, image_id in enumerate(train.ids)}
    for shape, rows in cache.latent_shapes("train").items():
        batches = list(cache.iter_batches("train", 5, shape=shape))
        assert sum(len(b) for b in batches) == rows == cache.num_rows("train", shape=shape)
        for batch in batches[:2]:
            assert batch.mean.shape[1:] == shape
            images = train.batch([index[i] for i in batch.id])
            with torch.no_grad():
                torch.testing.assert_close(batch.mean, vae.encode(images).mean, rtol=2**-10, atol=1e-4)


def test_cache_batches_are_one_bucket_each_in_proportion_and_resume(bucketed_cache):
    root, _, _ = bucketed_cache
    cache = LatentCache(root / "latents")
    order = CacheOrder(cache, 4, data_seed=3)
    per_shape = {shape: rows // 4 for shape, rows in cache.latent_shapes("train").items()}
    assert order.batches_per_shape == per_shape and order.batches_per_epoch == sum(per_shape.values())
    epoch = [order.next_batch() for _ in range(order.batches_per_epoch)]
    assert Counter(tuple(b.mean.shape[1:]) for b in epoch) == Counter(per_shape)
    shapes = [tuple(b.mean.shape[1:]) for b in epoch]
    assert len({s for s in shapes[:6]}) > 1  # buckets interleave, not one after another
    nxt = [order.next_batch().id for _ in range(5)]
    assert order.epoch == 1 and [b.id for b in epoch] != nxt
    again = CacheOrder(cache, 4, data_seed=3)
    again.load_state_dict({"epoch": 0, "taken": 7})
    assert [again.next_batch().id for _ in range(order.batches_per_epoch - 7)] == [b.id for b in epoch[7:]]


def test_data_parallel_ranks_read_their_share_of_each_bucket_batch(bucketed_cache):
    # Two ranks of a torchrun job, each reading its lane of every batch, together read the batch one process
    # reads with the same two lanes: the same buckets in the same order, the same rows.
    root, _, _ = bucketed_cache
    cache = LatentCache(root / "latents")
    single = CacheOrder(cache, 8, data_seed=4, lanes=2)
    ranks = [CacheOrder(cache, 8, data_seed=4, lanes=2, ranks=DataParallel(rank, 2)) for rank in range(2)]
    assert single.batches_per_epoch > 3 and len(single.batches_per_shape) == 3
    for _ in range(single.batches_per_epoch + 2):  # into the second epoch
        whole = single.next_batch()
        parts = [order.next_batch() for order in ranks]
        assert whole.id == parts[0].id + parts[1].id and len(parts[0]) == 4
        assert torch.equal(whole.mean, torch.cat([p.mean for p in parts]))


def test_a_unet_trains_on_buckets_and_resumes_bitwise(bucketed_cache, tmp_path):
    root, _, _ = bucketed_cache
    cache = LatentCache(root / "latents")
    config = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(True, True), num_heads=2,
                        cross_attention_dim=384, norm_num_groups=4, sample_size=8)
    hp = UNetTrainingConfig(
        batch_size=4, grad_accumulation=1, max_steps=40, lr=2e-3, weight_decay=0.0, warmup_steps=2, grad_clip=1.0,
        ema_decay=0.9, caption_dropout=0.1, min_snr_gamma=None, noise_offset=0.0, precision="fp32",
        checkpoint_every=10, keep_checkpoints=2, log_every=5, validate_every=20,
    )
    schedule = NoiseSchedule(prediction_type="v_prediction")
    straight = train_unet(config, cache, schedule, hp, tmp_path / "straight", 0, "cpu")
    assert torch.isfinite(torch.tensor(straight.metrics["val_loss"]))  # over the val rows of every bucket

    def stop_at_20(step, total, values):
        if step == 20:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_unet(config, cache, schedule, hp, tmp_path / "resumed", 0, "cpu", on_step=stop_at_20)
    resumed = train_unet(config, cache, schedule, hp, tmp_path / "resumed", 0, "cpu")
    assert resumed.history == straight.history
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()))
    # The trained UNet draws at every bucket's shape.
    with torch.no_grad():
        for h, w in [(10, 6), (8, 8), (6, 10)]:
            x = torch.randn(1, 4, h, w)
            context = cache.text.lookup([0])
            assert resumed.ema(x, torch.tensor([500]), context.hidden_states).shape == (1, 4, h, w)


class Interrupted(Exception):
    pass


# ----------------------------------------------------------------------- the pipeline's stages, end to end

ASPECTS = {"portrait": (60, 100), "square": (80, 80), "landscape": (100, 60)}


def test_the_stages_train_on_buckets_of_a_mixed_dataset_and_sample_non_square_images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    lines, generator = [], torch.Generator().manual_seed(0)
    colors = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}
    for i in range(90):
        kind = list(ASPECTS)[i % 3]
        color = list(colors)[int(torch.randint(3, (1,), generator=generator))]
        w, h = ASPECTS[kind]
        image = Image.new("RGB", (w, h), "white")
        # A band along the long side's ends: only a whole-image fit keeps both ends.
        image.paste(colors[color], (0, 0, w // 5, h) if w > h else (0, 0, w, h // 5))
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {color} {kind} picture"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    raw = ci_params(tmp_path / "run").model_dump()
    raw["ingest"] |= {"source": str(folder), "aspect": "buckets", "val_fraction": 0.2}
    raw["train_unet"] |= {"batch_size": 8, "max_steps": 20, "validate_every": 20}
    raw["sample"] |= {"prompts": ["a red portrait picture", "a blue portrait picture"], "width": 12, "height": 20}
    params = Params(**raw)
    assert params.bucket_sizes() == [(12, 20), (16, 16), (20, 12)]  # 16x16 pixels, sides multiples of 2 x 2

    reporter = RecordingReporter()
    metrics = stage_ingest.run(params, reporter).metrics
    assert (metrics["bucket_12x20"], metrics["bucket_16x16"], metrics["bucket_20x12"]) == (30, 30, 30)
    stored = IngestedImages(params.paths.ingested, None)
    by_caption = dict(zip(stored.captions, stored.sizes))
    assert by_caption["a red portrait picture"] == (12, 20) and by_caption["a red landscape picture"] == (20, 12)

    train_vae_metrics = stage_train_vae.run(params, RecordingReporter()).metrics
    assert train_vae_metrics["steps"] == params.train_vae.max_steps and train_vae_metrics["val_psnr"] > 5
    stage_cache_latents.run(params, RecordingReporter())
    cache = LatentCache(params.paths.latents)
    assert set(cache.latent_shapes("train")) == {(4, 10, 6), (4, 8, 8), (4, 6, 10)}
    unet_metrics = stage_train_unet.run(params, RecordingReporter()).metrics
    assert unet_metrics["steps"] == 20 and math.isfinite(unet_metrics["val_loss"])

    stage_evaluate.run(params, RecordingReporter())
    evaluation = json.loads((Path(params.paths.eval) / "metrics.json").read_text())
    first = evaluation["samplers"]["dpmpp_2m-5"]
    assert math.isfinite(first["frechet_distance"]) and 0 <= first["retrieval_top1"] <= 1
    assert evaluation["memorisation"]["seen"]["images"] > 0 and evaluation["diversity"]["seeds"] == 4

    stage_sample.run(params, RecordingReporter())
    record = json.loads((Path(params.paths.samples) / "prompts.json").read_text())
    assert (record["width"], record["height"]) == (12, 20)
    with Image.open(Path(params.paths.samples) / "000.png") as image:
        assert image.size == (12, 20)


def test_bucket_params_are_checked_against_the_models_factors():
    params = Params(ingest={"aspect": "buckets"})
    assert params.bucket_multiple() == 4 * 2  # the default VAE's f=4 times the UNet's two levels
    assert Params().bucket_sizes() is None  # centre-crop, as before buckets
    given = Params(ingest={"aspect": "buckets", "buckets": [[24, 40], [32, 32]]})
    assert given.bucket_sizes() == [(24, 40), (32, 32)]
    for ingest, words in (
        ({"aspect": "buckets", "buckets": [[30, 32]]}, ["ingest", "(30, 32)", "multiples of 8"]),
        ({"aspect": "buckets", "buckets": []}, ["ingest", "empty"]),
        ({"aspect": "buckets", "max_aspect_ratio": 0.5}, ["max_aspect_ratio", "greater than or equal to 1"]),
        ({"aspect": "letterbox"}, ["aspect", "'crop' or 'buckets'"]),
    ):
        with pytest.raises(ValueError) as error:
            Params(ingest=ingest)
        assert all(word in str(error.value) for word in words), str(error.value)
    with pytest.raises(ValueError, match="finetune_lora.concept.aspect must be crop"):
        Params(finetune_lora={"concept": {"aspect": "buckets"}})


def test_grids_show_squashed_canvas_images_back_at_their_own_proportions():
    portrait = torch.zeros(1, 3, 40, 24)
    portrait[:, 0] = 1.0  # red in [-1, 1]: (1, 0, 0) -> channel 0 at 1, the others at 0
    canvas = to_square(portrait, 32)
    shown = at_own_shapes(torch.cat([canvas, canvas]), [(24, 40), (32, 32)])
    width = round(24 * 32 / 40)  # 19 columns of image, the rest white
    left = (32 - width) // 2
    assert torch.equal(shown[0, :, :, :left], torch.ones(3, 32, left))
    assert torch.equal(shown[0, :, :, left + width:], torch.ones(3, 32, 32 - left - width))
    torch.testing.assert_close(shown[0, :, :, left:left + width], portrait[0, :, :32, :width].expand(3, 32, width))
    torch.testing.assert_close(shown[1], canvas[0])  # a square one stays as it was
    assert at_own_shapes(canvas, [(32, 32)]) is canvas  # all square: nothing to do
