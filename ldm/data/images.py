"""Decoding untrusted image files safely, and turning them into training-size RGB PNGs.

    image = load_image(data, max_pixels=50_000_000, min_size=16)   # RGB, upright; or raises ImageRejected
    png = to_png(resize_center_crop(image, 32))

`load_image` is the edge where bytes from outside become pixels: anything it cannot turn into a sane
RGB image raises `ImageRejected` with a short `reason` code (for counting) and a message (for people),
never another exception.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import InputError

# Decoders for the formats image datasets actually use; the many rarer formats Pillow can read are left
# closed, as each one is more decoder code exposed to untrusted bytes. (JPEG also opens cameras' MPO files.)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

REASONS = ("empty_file", "not_an_image", "corrupt_image", "decompression_bomb", "too_small", "unsupported_image")

_WHITE = (255, 255, 255)


class ImageRejected(InputError):
    """An image that cannot be used: `reason` is a short code from REASONS, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_image(data: bytes, max_pixels: int, min_size: int = 1) -> Image.Image:
    """Decode `data` fully into an upright RGB image.

    Rejects an empty file, anything that is not an image in FORMATS, a truncated or corrupt image, one
    of more than `max_pixels` pixels (checked on the header, before any pixel is decoded), and one whose
    shorter side is under `min_size`. Grayscale, palette, CMYK and 16-bit images become RGB; transparency
    is composited on white; the EXIF orientation is applied.

    It scopes a warnings filter (warnings.catch_warnings), which is process-wide: call it from one thread,
    or from several processes.
    """
    if not data:
        raise ImageRejected("empty_file", "the file is empty (0 bytes)")
    # Pillow warns, rather than raises, between its own limit and twice that; any image that large is
    # refused here, so the warning is raised as an error to reject it before decoding.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageRejected(
                "not_an_image", f"not a readable image (accepted formats: {', '.join(FORMATS)})"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", f"refused as a decompression bomb: {e}") from None
        except Exception as e:  # noqa: BLE001 - hostile bytes make Pillow raise almost anything
            raise ImageRejected("corrupt_image", f"corrupt image header ({type(e).__name__}: {e})") from None

        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected(
                "decompression_bomb",
                f"{width}x{height} = {width * height} pixels is more than the limit of {max_pixels}; "
                "raise the limit if such large images are expected",
            )
        if min(width, height) < min_size:
            raise ImageRejected(
                "too_small", f"{width}x{height} is too small: the shorter side must be at least {min_size} pixels"
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", f"refused as a decompression bomb: {e}") from None
        except Exception as e:  # noqa: BLE001 - see above
            raise ImageRejected(
                "corrupt_image", f"truncated or corrupt {image.format} image ({type(e).__name__}: {e})"
            ) from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    # An RGB image can be transparent too: a colour key in its `transparency`.
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if mode == "RGB" and not has_alpha:
        return image
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageRejected("unsupported_image", f"cannot convert a {mode} image to RGB ({e})") from None


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips these modes to 0..255 instead of scaling them, which turns a 16-bit
    # image almost white. 16-bit modes are scaled by their range; 32-bit integer and float images carry
    # no range, so values up to 255 (or 1.0 for float) are taken as 8-bit (or unit) data and larger
    # ones as 16-bit.
    # NaN pixels of a float image become 0 first: np.nanmax would warn on an image of nothing else. The
    # infinities stay, and are clipped below (as finite stand-ins they would overflow when scaled).
    values = np.asarray(image, dtype=np.float64)
    values = np.where(np.isnan(values), 0.0, values)
    if image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    elif image.mode != "F" and (image.mode.startswith("I;16") or values.max(initial=0) > 255):
        values = values / 257.0
    gray = np.clip(values, 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (Lanczos) and cut the centred size x size square."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def to_png(image: Image.Image) -> bytes:
    """RGB PNG bytes that depend only on the pixels: no metadata, fixed compression."""
    # A fresh image from the raw pixels drops ICC profiles, EXIF and text chunks that the PNG writer
    # would otherwise copy over from image.info.
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as the pipelines' input image: (1, 3, H, W) float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0


def map_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """A mask or a control map: (1, channels, H, W) float in [0, 1]; one channel reads the image as grayscale
    (white = 1), three as RGB."""
    if channels not in (1, 3):
        raise InputError(f"a map has 1 (grayscale) or 3 (RGB) channels, not {channels}")
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None, None] if channels == 1 else tensor.permute(2, 0, 1)[None]


def png_to_tensor(png: bytes) -> torch.Tensor:
    """PNG bytes -> (3, H, W) float in [-1, 1]."""
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB PIL image."""
    array = image.detach().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
