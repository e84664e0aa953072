"""ldm: latent diffusion (Stable Diffusion) written from scratch in PyTorch."""

from ldm.pipeline import Text2Image
from ldm.text_encoder import TextEncoder
from ldm.unet import UNet
from ldm.vae import VAE

__all__ = ["VAE", "UNet", "TextEncoder", "Text2Image"]
