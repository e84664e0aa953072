"""Aspect-ratio buckets: the bucket list, each image's bucket and fit, batches of one size in a seeded and
resumable order, and a VAE trained on images of three shapes."""

import dataclasses
import io

import pytest
import torch
from PIL import Image

from ldm.data.buckets import bucket_sizes, check_buckets, fit_to_bucket, nearest_bucket, png_size
from ldm.data.images import resize_center_crop
from ldm.data.ingested import IngestedImages
from ldm.data.order import BucketOrder, EpochOrder, index_order
from ldm.errors import InputError
from ldm.evaluation.reconstruction import reconstruction_metrics
from ldm.models.vae import VAE
from ldm.training.vae import train_vae
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

    class Interrupted(Exception):
        pass

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
