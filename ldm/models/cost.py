"""What one training step of a model costs, counted without running it: parameters, FLOPs, activation memory.

The model and its inputs are built on the meta device, so counting Stable Diffusion's shapes takes a second
and no memory. The forward and the backward of one micro-batch run under torch's FlopCounterMode
(convolutions, matrix multiplies and attention: the FLOPs that matter) while a saved-tensors hook records
what autograd keeps for the backward, which is the activation memory a step holds at its peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig

# fp32 weights, their gradients and AdamW's two moments (fp32 master weights under autocast too).
STATE_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class TrainingCost:
    parameters: int
    flops_per_step: int  # forward + backward of one micro-batch
    activation_bytes: int  # tensors saved for the backward, in fp32 (distinct storages, weights excluded)

    @property
    def state_bytes(self) -> int:
        return self.parameters * STATE_BYTES_PER_PARAMETER

    def activation_bytes_at(self, precision: str) -> int:
        """Under bf16/fp16 autocast the matmul and convolution outputs are saved at 2 bytes, norms and softmax
        at 4: the fp32 count halved is the lower end of what autocast keeps."""
        return self.activation_bytes if precision == "fp32" else self.activation_bytes // 2


def _step_cost(model: torch.nn.Module, loss_of) -> TrainingCost:
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_of(model).backward()
    return TrainingCost(
        parameters=sum(p.numel() for p in model.parameters()),
        flops_per_step=flops.get_total_flops(),
        activation_bytes=sum(saved.values()),
    )


def vae_step_cost(config: VAEConfig, batch_size: int, height: int, width: int) -> TrainingCost:
    """A VAE training step: encode, sample the posterior, decode, at `batch_size` images of height x width."""
    with torch.device("meta"):
        model = VAE(config)
        images = torch.zeros(batch_size, config.in_channels, height, width)  # (B, 3, H, W)

    def loss(vae: VAE) -> torch.Tensor:
        reconstructions, posterior = vae(images)
        return (reconstructions - images).abs().mean() + posterior.kl().mean()

    return _step_cost(model, loss)


def unet_step_cost(config: UNetConfig, batch_size: int, height: int, width: int, tokens: int) -> TrainingCost:
    """A denoising step at `batch_size` latents of height x width (latent pixels) and `tokens` of text."""
    with torch.device("meta"):
        model = UNet(config)
        latents = torch.zeros(batch_size, config.in_channels, height, width)  # (B, C, h, w)
        timesteps = torch.zeros(batch_size, dtype=torch.long)
        context = torch.zeros(batch_size, tokens, config.cross_attention_dim)  # (B, T, D)

    def loss(unet: UNet) -> torch.Tensor:
        return (unet(latents, timesteps, context) - latents).square().mean()

    return _step_cost(model, loss)
