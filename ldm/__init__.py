"""ldm: latent diffusion (Stable Diffusion) written from scratch in PyTorch.

The four public classes are imported on first use, so that `import ldm.<module>` (the `ldm` command among
them) does not pay for torch models, transformers and the samplers it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["VAE", "UNet", "TextEncoder", "Text2Image"]

_HOMES = {
    "VAE": "ldm.models.vae",
    "UNet": "ldm.models.unet",
    "TextEncoder": "ldm.models.text_encoder",
    "Text2Image": "ldm.diffusion.pipeline",
}

if TYPE_CHECKING:
    from ldm.diffusion.pipeline import Text2Image
    from ldm.models.text_encoder import TextEncoder
    from ldm.models.unet import UNet
    from ldm.models.vae import VAE


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'ldm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
