"""Named model sizes: `tiny` for tests, `cpu` for a 2-core machine, `sd15` for Stable Diffusion v1's shapes."""

from __future__ import annotations

from dataclasses import dataclass

from ldm.errors import InputError
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAEConfig

MINILM_WIDTH = 384  # hidden size of the default offline text encoder


@dataclass(frozen=True)
class Preset:
    vae: VAEConfig
    unet: UNetConfig
    image_size: int


PRESETS: dict[str, Preset] = {
    # Seconds-scale tests: f=2, two UNet levels, attention everywhere.
    "tiny": Preset(
        vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16),
        unet=UNetConfig(
            block_out_channels=(16, 32), layers_per_block=1, attention_levels=(True, True), num_heads=2,
            cross_attention_dim=MINILM_WIDTH, norm_num_groups=4, sample_size=8,
        ),
        image_size=16,
    ),
    # What 2 CPU cores can train in minutes (../shared/FEASIBILITY.md): 32x32 images, f=4, 8x8x4 latents.
    "cpu": Preset(
        vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32),
        unet=UNetConfig(
            block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, True), num_heads=4,
            cross_attention_dim=MINILM_WIDTH, norm_num_groups=8, sample_size=8,
        ),
        image_size=32,
    ),
    # Stable Diffusion v1.x: the defaults of both configs (CLIP ViT-L/14 text width 768, 512x512, f=8).
    "sd15": Preset(vae=VAEConfig(), unet=UNetConfig(), image_size=512),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
