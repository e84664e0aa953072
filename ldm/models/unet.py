"""Text-conditioned UNet (Stable Diffusion's `UNet2DConditionModel` design).

Down path: per level, `layers_per_block` residual blocks (each followed by a spatial transformer on
attention levels) and a stride-2 downsample except at the last level. Middle: resnet, transformer, resnet.
Up path: mirror image with one extra block per level, each concatenating a skip from the down path.
Every residual block receives the timestep embedding; every transformer cross-attends to the text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from ldm.errors import InputError
from ldm.models.layers import Downsample, ResnetBlock, SpatialTransformer, TimestepMLP, Upsample, timestep_embedding
from ldm.models.modeling import ModelConfig, PretrainedModel


class UNetConfig(ModelConfig):
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | tuple[int, ...] = 8  # one number for every level, or one per level
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    sample_size: int = 64  # the latent size the model is trained at

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        levels = len(self.block_out_channels)
        if levels == 0:
            raise InputError("block_out_channels must list at least one level")
        if len(self.attention_levels) != levels:
            raise InputError(
                f"attention_levels has {len(self.attention_levels)} entries but block_out_channels has {levels}"
            )
        if isinstance(self.num_heads, tuple) and len(self.num_heads) != levels:
            raise InputError(f"num_heads has {len(self.num_heads)} entries but block_out_channels has {levels}")
        for c, heads in zip(self.block_out_channels, self.heads_per_level):
            if c % self.norm_num_groups:
                raise InputError(f"channels {c} are not divisible by norm_num_groups={self.norm_num_groups}")
            if c % heads:
                raise InputError(f"channels {c} are not divisible by num_heads={heads}")
        return self

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        if isinstance(self.num_heads, int):
            return (self.num_heads,) * len(self.block_out_channels)
        return self.num_heads


class DownLevel(nn.Module):
    def __init__(self, c: UNetConfig, level: int, in_channels: int, temb: int):
        super().__init__()
        out = c.block_out_channels[level]
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out, out, c.norm_num_groups, c.norm_eps, temb)
            for i in range(c.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            _transformer(c, out, c.heads_per_level[level]) for _ in range(c.layers_per_block if c.attention_levels[level] else 0)
        )
        self.downsample = Downsample(out) if level < len(c.block_out_channels) - 1 else None

    def forward(self, x, temb, context, context_mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context, context_mask)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    def __init__(self, c: UNetConfig, level: int, in_channels: int, temb: int):
        """`level` counts from the top of the down path, so the up path visits levels n-1 .. 0."""
        super().__init__()
        ch = c.block_out_channels
        out = ch[level]
        num_layers = c.layers_per_block + 1
        resnets = []
        for i in range(num_layers):
            # The last skip of this level comes from the level below's output (or its downsample).
            skip_channels = ch[max(level - 1, 0)] if i == num_layers - 1 else out
            resnets.append(ResnetBlock((in_channels if i == 0 else out) + skip_channels, out, c.norm_num_groups, c.norm_eps, temb))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            _transformer(c, out, c.heads_per_level[level]) for _ in range(num_layers if c.attention_levels[level] else 0)
        )
        self.upsample = Upsample(out) if level > 0 else None

    def forward(self, x, skips: list[torch.Tensor], temb, context, context_mask) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context, context_mask)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    def __init__(self, c: UNetConfig, temb: int):
        super().__init__()
        ch = c.block_out_channels[-1]
        self.resnet_in = ResnetBlock(ch, ch, c.norm_num_groups, c.norm_eps, temb)
        self.attention = _transformer(c, ch, c.heads_per_level[-1])
        self.resnet_out = ResnetBlock(ch, ch, c.norm_num_groups, c.norm_eps, temb)

    def forward(self, x, temb, context, context_mask) -> torch.Tensor:
        x = self.resnet_in(x, temb)
        x = self.attention(x, context, context_mask)
        return self.resnet_out(x, temb)


def _transformer(c: UNetConfig, channels: int, heads: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels, heads, c.cross_attention_dim, c.norm_num_groups, c.transformer_layers_per_block, c.use_linear_projection
    )


class UNet(PretrainedModel):
    kind = "unet"
    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            DownLevel(config, i, ch[max(i - 1, 0)], temb) for i in range(len(ch))
        )
        self.mid_block = MidBlock(config, temb)
        self.up_blocks = nn.ModuleList(
            UpLevel(config, level, ch[min(level + 1, len(ch) - 1)], temb) for level in reversed(range(len(ch)))
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, h, w) noisy latents; t: timestep(s), scalar or (B,); context: (B, S, D) text tokens;
        context_mask: (B, S) bool, True for real tokens. Returns the prediction, (B, C_out, h, w).

        down_residuals (one per skip tensor, in down-path order) and mid_residual are added to the skips and to
        the middle block's output, as a ControlNet's outputs are (diffusers' *_additional_residual(s))."""
        f = self.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise InputError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the UNet's factor {f}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype))
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            h, level_skips = level(h, temb, context, context_mask)
            skips.extend(level_skips)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise InputError(
                    f"got {len(down_residuals)} down_residuals but this UNet has {len(skips)} skip tensors; "
                    "pass one per skip (a ControlNet built from this UNet's config gives exactly that)"
                )
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        h = self.mid_block(h, temb, context, context_mask)
        if mid_residual is not None:
            h = h + mid_residual
        for level in self.up_blocks:
            h = level(h, skips, temb, context, context_mask)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
