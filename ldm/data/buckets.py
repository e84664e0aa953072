"""Aspect-ratio buckets: training sizes of about one pixel area in several shapes, so that a portrait or a
landscape image is resized whole instead of losing its sides to a square crop (as kohya sd-scripts,
SimpleTuner and OneTrainer train; NovelAI's write-up of SD fine-tuning introduced it).

A bucket is a (width, height) whose sides are multiples of `multiple` (the VAE's downsampling factor times
the UNet's, so every latent level divides evenly). `bucket_sizes` derives the list from a target area and a
largest aspect ratio; an image goes to the bucket of nearest aspect ratio (compared in log space, so 2:1 and
1:2 are equally far from 1:1), is scaled to cover it and centre-cropped: at most a sliver of one side is cut.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm.errors import InputError

Size = tuple[int, int]  # (width, height) in pixels, as PIL gives it


def bucket_sizes(area: int, multiple: int, max_ratio: float) -> list[Size]:
    """Every (width, height) with sides multiples of `multiple`, width * height <= area, no side longer than
    `max_ratio` times the other, that no other such size contains (a wider one of the same height, or a
    taller one of the same width): about `area` pixels each. Sorted by aspect ratio, portrait first.

    At 64 x 64 px and a multiple of 16: 48x80, 64x64 and 80x48 for a max ratio of 2."""
    if multiple < 1 or area < multiple * multiple:
        raise InputError(f"a bucket area of {area} pixels holds no {multiple}x{multiple} bucket")
    if max_ratio < 1:
        raise InputError(f"max aspect ratio {max_ratio} is below 1; give the longer side over the shorter")
    feasible = []
    for width in range(multiple, area // multiple + 1, multiple):
        # The tallest height this width allows: within the area and no more than max_ratio times the width.
        height = min(area // width, int(width * max_ratio)) // multiple * multiple
        if height >= multiple and width <= height * max_ratio:
            feasible.append((width, height))
    # A size that another one holds whole (as wide and as tall) would only train on fewer pixels.
    largest = [s for s in feasible if not any(t != s and t[0] >= s[0] and t[1] >= s[1] for t in feasible)]
    return sorted(largest, key=lambda s: s[0] / s[1])


def check_buckets(sizes: list[Size], multiple: int) -> None:
    """InputError unless every size is positive and a multiple of `multiple` on both sides."""
    if not sizes:
        raise InputError("the bucket list is empty; give at least one [width, height]")
    bad = [s for s in sizes if min(s) < multiple or s[0] % multiple or s[1] % multiple]
    if bad:
        raise InputError(
            f"buckets {bad} are not multiples of {multiple} (the VAE's downsampling factor times the UNet's) "
            "on both sides; round them to multiples of it"
        )


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest (in log space) to width / height; the first of ties."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


def fit_to_bucket(image: Image.Image, bucket: Size) -> Image.Image:
    """Scale `image` (Lanczos) to cover `bucket` and cut the centred bucket-sized part."""
    return ImageOps.fit(image, bucket, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def png_size(png: bytes) -> Size:
    """(width, height) of PNG bytes from the IHDR chunk's header, without decoding the pixels."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise InputError("not PNG bytes (no PNG signature and IHDR chunk); ingest the dataset again")
    return struct.unpack(">II", png[16:24])


def to_square(images: torch.Tensor, side: int) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, side, side)
    """Images of any shape resized (bilinear, antialiased) to side x side squares: the common canvas that
    measures comparing images of several buckets use. Squashing, not cropping, keeps all of each image; real
    and generated images of one bucket are squashed alike."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
