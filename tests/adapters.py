"""A LoRA and a ControlNet that change what a pipeline draws, saved for tests of the code that loads them."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm import Text2Image, UNet
from ldm.models.controlnet import ControlNet
from ldm.models.lora import add_lora, save_lora


def save_random_lora(unet_folder: Path, directory: Path) -> Path:
    """A rank-2 LoRA for the UNet in `unet_folder` with random B matrices (a fresh one's are zero: no effect)."""
    adapted = UNet.from_pretrained(unet_folder)
    add_lora(adapted, rank=2, alpha=2)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    save_lora(adapted, directory)
    return directory


def save_random_controlnet(pipeline: Text2Image, directory: Path) -> Path:
    """A ControlNet for the pipeline's UNet with a random middle output conv (a fresh one's is zero: no effect)."""
    controlnet = ControlNet.from_unet(pipeline.unet, vae_downsampling_factor=pipeline.vae.downsampling_factor)
    with torch.no_grad():
        controlnet.controlnet_mid_block.weight.normal_(std=0.5)
    controlnet.save_pretrained(directory)
    return directory
