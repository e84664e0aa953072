"""Control maps, the images a ControlNet is conditioned on: Canny edges of an image (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from ldm.data.images import png_to_tensor, tensor_to_pil
from ldm.errors import InputError

CONTROL_MAPS = ("canny",)


# The shapes images are 16-32 px with antialiased edges; the dimmest edge, yellow on white, is a grey step of
# about 50 whose Sobel response (up to 4x the step, less where antialiasing spreads it) is near the usual
# 100/200: a 16 px yellow ring gets no edge at all there. At 50/100 every shape, colour and size of
# ldm.data.shapes on white has its outline, and flat regions (zero gradient) stay empty.
DEFAULT_LOW_THRESHOLD = 50


DEFAULT_HIGH_THRESHOLD = 100


def _check_kind(kind: str) -> None:
    if kind not in CONTROL_MAPS:
        raise InputError(f"unknown control map kind {kind!r}; supported kinds: {', '.join(CONTROL_MAPS)}")


def control_map(
    kind: str,
    image: Image.Image,
    low_threshold: int = DEFAULT_LOW_THRESHOLD,
    high_threshold: int = DEFAULT_HIGH_THRESHOLD,
) -> torch.Tensor:
    """The control map of `image`: (C, H, W) float in [0, 1]. "canny": (1, H, W), 1 on edges, 0 elsewhere.

    Canny's hysteresis thresholds are on the Sobel gradient of the grayscale image (0-255 scale).
    """
    _check_kind(kind)
    if not 0 <= low_threshold <= high_threshold:
        raise InputError(f"canny thresholds low={low_threshold}, high={high_threshold}: need 0 <= low <= high")
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low_threshold, high_threshold)  # (H, W) uint8, 255 on edges
    return torch.from_numpy(edges).float().div(255.0)[None]


def control_maps_from_pngs(
    kind: str,
    pngs: list[bytes],
    low_threshold: int = DEFAULT_LOW_THRESHOLD,
    high_threshold: int = DEFAULT_HIGH_THRESHOLD,
) -> torch.Tensor:
    """Control maps of ingested PNG images (the dataset's `image` column): (N, C, H, W) float in [0, 1]."""
    _check_kind(kind)
    # Decoded as training decodes them (RGB, via png_to_tensor); the [-1, 1] round trip is exact for uint8.
    maps = [control_map(kind, tensor_to_pil(png_to_tensor(png)), low_threshold, high_threshold) for png in pngs]
    sizes = sorted({tuple(m.shape[1:]) for m in maps})
    if len(sizes) > 1:
        raise InputError(f"the PNGs have several sizes {sizes}; control maps of one batch need one size")
    return torch.stack(maps)
