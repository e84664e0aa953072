"""ControlNet (Zhang et al. 2023): spatial control of a frozen text-to-image UNet by an image such as an edge map.

A trainable copy of the UNet's encoder (conv_in, time embedding, down path, middle block) reads the noisy latents
plus an embedding of the control image, and returns one residual per UNet skip tensor and one for the middle
block's output; the frozen UNet adds them (`UNet.forward(..., down_residuals=, mid_residual=)`):

    down, mid = controlnet(z_t, t, context, mask, control)              # control: (B, 1, H, W) in [0, 1]
    prediction = unet(z_t, t, context, mask, down_residuals=down, mid_residual=mid)

Every path from the copy into the UNet ends in a zero-initialised 1x1 conv ("zero convolution"), and so does
the control embedding, so before training the residuals are exactly zero and the UNet's output is unchanged;
the zero convs still receive gradient (their input is not zero), so training moves them off zero.

The control image is at pixel resolution; the conditioning embedding's stride-2 convs bring it down to latent
resolution, so their number is log2 of the VAE's downsampling factor. Control maps: `control_map`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from ldm.errors import InputError
from ldm.models.layers import TimestepMLP, timestep_embedding
from ldm.models.modeling import ModelConfig, PretrainedModel
from ldm.models.unet import DownLevel, MidBlock, UNet, UNetConfig

# Beside a trained ControlNet's config.json: how its control maps were made and the scale to sample with.
CONTROL_CONFIG_NAME = "control.json"


class ControlNetConfig(ModelConfig):
    unet: UNetConfig  # the UNet whose encoder this copies and whose skips it feeds
    conditioning_channels: int = 1  # of the control image: 1 for an edge map
    conditioning_embedding_channels: tuple[int, ...]  # e.g. (16, 32, 64); a stride-2 conv between each two
    vae_downsampling_factor: int  # pixels per latent along a side: the control image is this much larger

    @model_validator(mode="after")
    def _check(self) -> ControlNetConfig:
        if self.conditioning_channels < 1:
            raise InputError(f"conditioning_channels must be at least 1, got {self.conditioning_channels}")
        f = self.vae_downsampling_factor
        if f < 1 or f & (f - 1):
            raise InputError(f"vae_downsampling_factor must be a power of two (1, 2, 4, 8, ...), got {f}")
        channels = self.conditioning_embedding_channels
        if not channels or min(channels) < 1:
            raise InputError(f"conditioning_embedding_channels must list positive widths, got {channels}")
        strides = int(math.log2(f))
        if len(channels) - 1 != strides:
            raise InputError(
                f"conditioning_embedding_channels {channels} make {len(channels) - 1} stride-2 convs but a VAE "
                f"factor of {f} needs {strides}: list {strides + 1} widths, e.g. "
                f"{tuple(16 * 2**i for i in range(strides + 1))}"
            )
        return self

    @property
    def skip_channels(self) -> list[int]:
        """Channels of the UNet's skip tensors in down-path order: conv_in's, then each level's resnets, downsample."""
        ch = self.unet.block_out_channels
        levels = [[c] * (self.unet.layers_per_block + (i < len(ch) - 1)) for i, c in enumerate(ch)]
        return [ch[0]] + [c for level in levels for c in level]


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlConditioningEmbedding(nn.Module):
    """Control image (B, C_cond, H, W) -> features (B, C_out, H/f, W/f): 3x3 conv-SiLU layers, one stride-2 conv
    between each two widths, and a zero-initialised output conv."""

    def __init__(self, conditioning_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNet(PretrainedModel):
    kind = "controlnet"
    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config.unet
        ch = c.block_out_channels
        temb = 4 * ch[0]
        # The UNet's encoder, built as the UNet builds it so that its state dict loads into these modules.
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], temb)
        self.down_blocks = nn.ModuleList(DownLevel(c, i, ch[max(i - 1, 0)], temb) for i in range(len(ch)))
        self.mid_block = MidBlock(c, temb)
        # What ControlNet adds: the control image's way in, and the zero convs on every way out.
        self.controlnet_cond_embedding = ControlConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_channels, ch[0]
        )
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(n) for n in config.skip_channels)
        self.controlnet_mid_block = _zero_conv(ch[-1])

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        *,
        conditioning_channels: int = 1,
        conditioning_embedding_channels: tuple[int, ...] | None = None,
        vae_downsampling_factor: int,
        seed: int = 0,
    ) -> ControlNet:
        """The trainable copy of `unet`: its encoder's weights, zero convs at zero, on the UNet's device and dtype.

        `conditioning_embedding_channels` defaults to (16, 32, ...), one width per halving of the control image.
        `seed` draws the conditioning embedding's inner convs (its output conv is zero).
        """
        if conditioning_embedding_channels is None:
            halvings = int(math.log2(max(vae_downsampling_factor, 1)))
            conditioning_embedding_channels = tuple(16 * 2**i for i in range(halvings + 1))
        config = ControlNetConfig(
            unet=unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_channels=conditioning_embedding_channels,
            vae_downsampling_factor=vae_downsampling_factor,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            controlnet = cls(config)
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        weight = next(unet.parameters())
        return controlnet.to(device=weight.device, dtype=weight.dtype)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        control: torch.Tensor,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B, C, h, w) noisy latents; t, context, context_mask as for the UNet; control: (B or 1, C_cond,
        h*f, w*f) in [0, 1]. Returns (down residuals, one per UNet skip and of its shape; mid residual), times scale.
        """
        f = self.config.vae_downsampling_factor
        expected = (self.config.conditioning_channels, x.shape[-2] * f, x.shape[-1] * f)
        if control.ndim != 4 or tuple(control.shape[1:]) != expected or control.shape[0] not in (1, x.shape[0]):
            raise InputError(
                f"control has shape {tuple(control.shape)} but latents {tuple(x.shape)} need ({x.shape[0]} or 1, "
                f"{expected[0]}, {expected[1]}, {expected[2]}): the control image at pixel resolution (VAE factor {f})"
            )
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.config.unet.block_out_channels[0]).to(x.dtype))
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)

        h = self.conv_in(x) + self.controlnet_cond_embedding(control.to(x.dtype))  # (B, ch[0], h, w)
        skips = [h]
        for level in self.down_blocks:
            h, level_skips = level(h, temb, context, context_mask)
            skips.extend(level_skips)
        h = self.mid_block(h, temb, context, context_mask)

        down = [conv(skip) * scale for conv, skip in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(h) * scale
