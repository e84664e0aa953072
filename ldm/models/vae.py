"""KL-regularised autoencoder (Stable Diffusion's `AutoencoderKL` design).

Images (B, 3, H, W) in [-1, 1] are encoded to a diagonal Gaussian over latents (B, L, H/f, W/f) with
f = 2 ** (len(block_out_channels) - 1). The diffusion model works on *scaled* latents,
(z - shift_factor) * scaling_factor, which are close to unit variance; both numbers live in the config so
a saved VAE carries them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from ldm.errors import InputError
from ldm.models.layers import Downsample, ResnetBlock, SpatialSelfAttention, Upsample
from ldm.models.modeling import ModelConfig, PretrainedModel

NORM_EPS = 1e-6


class VAEConfig(ModelConfig):
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    sample_size: int = 512  # the image size the VAE was trained at

    @model_validator(mode="after")
    def _check(self) -> VAEConfig:
        if not self.block_out_channels:
            raise InputError("block_out_channels must list at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise InputError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.sample_size % (2 ** (len(self.block_out_channels) - 1)):
            raise InputError(f"sample_size {self.sample_size} is not a multiple of the downsampling factor")
        return self


def standard_normal(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A standard normal draw of `like`'s shape and dtype, on its device.

    Drawn on the generator's device, then moved: a CPU seed gives the same draws on any accelerator.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


class DiagonalGaussian:
    """The encoder's posterior q(z|x): independent Gaussians per latent element."""

    def __init__(self, moments: torch.Tensor):  # (B, 2L, h, w): mean then log-variance
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in Stable Diffusion so an untrained encoder cannot produce inf/0 variances.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = standard_normal(self.mean, generator)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over each sample's latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class MidBlock(nn.Module):
    """Residual block, full self-attention, residual block: the only global mixing in the VAE."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnet_in = ResnetBlock(channels, channels, groups, NORM_EPS)
        self.attention = SpatialSelfAttention(channels, groups, NORM_EPS)
        self.resnet_out = ResnetBlock(channels, channels, groups, NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet_out(self.attention(self.resnet_in(x)))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, NORM_EPS)
            for i in range(num_layers)
        )
        self.downsample = Downsample(out_channels, asymmetric_padding=True) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, NORM_EPS)
            for i in range(num_layers)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2L, H/f, W/f) Gaussian moments."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c.norm_num_groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], c.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """(B, L, h, w) -> (B, 3, h*f, w*f), unbounded (clamp for display)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = tuple(reversed(c.block_out_channels))
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], c.norm_num_groups)
        # One more resnet per level than the encoder, as in Stable Diffusion.
        self.up_blocks = nn.ModuleList(
            DecoderLevel(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c.norm_num_groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(PretrainedModel):
    kind = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # (B, 3, H, W) -> posterior over (B, L, H/f, W/f)
        f = self.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise InputError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE factor {f}; resize or crop it")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:  # (B, L, h, w) -> (B, 3, h*f, w*f)
        x = self.decoder(self.post_quant_conv(z))
        return x.clamp(-1.0, 1.0) if clamp else x

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: the unclamped reconstruction from a posterior sample, and the posterior. `noise`: the
        standard normal draw of the sample (B, L, h, w), instead of one drawn from `generator`."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator, noise), clamp=False), posterior

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the near-unit-variance space the diffusion model works in."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor
