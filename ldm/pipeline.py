"""Text-to-image: text encoder -> sampler over the UNet with classifier-free guidance -> VAE decoder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config

from ldm.modeling import atomic_path
from ldm.samplers import SAMPLERS, sample
from ldm.schedule import NoiseSchedule
from ldm.text_encoder import TextEmbedding, TextEncoder
from ldm.unet import UNet
from ldm.vae import VAE

PIPELINE_CONFIG_NAME = "pipeline.json"
# A trained model's folder keeps the raw UNet weights here, beside the EMA weights in `unet/` that sampling uses.
RAW_UNET_FOLDER = "unet_raw"


def compile_for_sampling(unet: UNet) -> Callable:
    """The UNet through `torch.compile` with frozen weights, for sampling (gradients off).

    Freezing folds the weights into the compiled graph as constants, prepacked for the CPU's conv and
    matmul kernels: 1.7x the eager forward at the cpu preset, where `torch.compile` without it gains
    about 1.2x. It is an inductor-wide setting, but inductor applies it only to graphs compiled with
    gradients disabled, so training graphs are unaffected.
    """
    torch._inductor.config.freezing = True
    return torch.compile(unet)


def denoise(
    unet: Callable,
    context: TextEmbedding,
    guidance_scale: float,
    shape: tuple[int, int, int, int],
    schedule: NoiseSchedule,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    spacing: str = "leading",
    karras: bool = False,
    eta: float = 0.0,
    seed: int | list[int] = 0,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample latents (B, C, h, w) in the diffusion model's space from the UNet's text context.

    With guidance (guidance_scale > 1) `context` is (2B, S, D): the B unconditional (or negative) rows
    first, then the B prompts; without, it is (B, S, D). The initial latents are drawn on the CPU from
    `seed`, and the same generator then feeds the sampler's noise. With one seed per image, image i's
    initial latents come from its own seed, so with a deterministic sampler (all but ddpm, euler_ancestral
    and ddim with eta > 0) an image does not depend on the batch it is drawn in.
    """
    guided = guidance_scale > 1.0
    if len(context) != (2 if guided else 1) * shape[0]:
        raise ValueError(f"{len(context)} context rows for {shape[0]} images with guidance={guided}")
    device, dtype = context.hidden_states.device, context.hidden_states.dtype
    # Prompts of equal length need no mask, and attention without one takes a faster kernel.
    mask = None if context.attention_mask.all() else context.attention_mask

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return unet(x, t, context.hidden_states, mask)
        out = unet(torch.cat([x, x]), torch.cat([t, t]), context.hidden_states, mask)
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    if isinstance(seed, int):
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
    else:
        if len(seed) != shape[0]:
            raise ValueError(f"{len(seed)} seeds for {shape[0]} images; give one seed, or one per image")
        generators = [torch.Generator("cpu").manual_seed(s) for s in seed]
        noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
        generator = generators[0]
    noise = noise.to(device, dtype)
    return sample(
        model, noise, schedule, sampler=sampler, steps=steps, spacing=spacing, karras=karras, eta=eta,
        generator=generator, callback=callback,
    )


class Text2Image:
    """Generate images from prompts.

    Same weights, sampler, steps and seed give the same image as the equivalent diffusers loop: the initial
    latents are `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` and the same
    generator then feeds the sampler's noise, in diffusers' order.
    """

    def __init__(
        self,
        vae: VAE,
        unet: UNet,
        text_encoder: TextEncoder,
        schedule: NoiseSchedule | None = None,
        sampler: str = "dpmpp_2m",
        spacing: str = "leading",
        karras: bool = False,
        compile: bool = False,
        steps: int = 20,
        guidance_scale: float = 5.0,
    ):
        """`compile=True` runs the UNet through `compile_for_sampling`: 10-30 s of compiling on first use
        (and on a new batch shape), then sampling at the cpu preset 1.3-1.5x faster than eager (bench/).
        The weights are baked in, so build a new pipeline after changing them. `steps` and `guidance_scale`
        are the defaults of a call (a trained model saves the ones it was validated with)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if unet.config.cross_attention_dim != text_encoder.hidden_size:
            raise ValueError(
                f"the UNet cross-attends to {unet.config.cross_attention_dim}-wide text tokens but the text encoder "
                f"{text_encoder.name!r} gives {text_encoder.hidden_size}; use the encoder the UNet was trained with"
            )
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.schedule = schedule or NoiseSchedule()
        self.sampler, self.spacing, self.karras = sampler, spacing, karras
        self.steps, self.guidance_scale = steps, guidance_scale
        self.denoise = compile_for_sampling(unet) if compile else unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | list[str] | None, guided: bool
    ) -> TextEmbedding:
        """The UNet's context: the prompts, preceded by the negative prompts when guidance is on. (2B or B, S, D)"""
        cond = self.text_encoder.encode(prompts)
        if not guided:
            return cond
        if negative_prompt is None:
            uncond = TextEmbedding.cat([self.text_encoder.empty_embedding] * len(prompts))
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
            uncond = self.text_encoder.encode(negatives)
        return TextEmbedding.cat([uncond, cond])

    @torch.inference_mode()
    def __call__(
        self,
        prompts: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | list[int] = 0,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Returns images (B, 3, H, W) in [-1, 1]. `seed`: one for the batch, or one per prompt (see `denoise`);
        `steps` and `guidance_scale` default to the pipeline's own."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps = self.steps if steps is None else steps
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        f = self.vae.downsampling_factor * self.unet.downsampling_factor
        height = height or self.unet.config.sample_size * self.vae.downsampling_factor
        width = width or height
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of {f} (VAE factor x UNet factor)")
        guided = guidance_scale > 1.0
        context = self.encode_prompts(prompts, negative_prompt, guided).to(self.device, self.dtype)
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae.downsampling_factor,
                 width // self.vae.downsampling_factor)
        latents = denoise(
            self.denoise, context, guidance_scale, shape, self.schedule, sampler=self.sampler, steps=steps,
            spacing=self.spacing, karras=self.karras, eta=eta, seed=seed, callback=callback,
        )
        return self.vae.decode(self.vae.unscale_latents(latents))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """A folder with `vae/`, `unet/` and `pipeline.json` (schedule, sampler defaults, text encoder name)."""
        directory = Path(directory)
        self.vae.save_pretrained(directory / "vae")
        self.unet.save_pretrained(directory / "unet")
        config = {
            "text_encoder": self.text_encoder.name,
            "schedule": self.schedule.to_dict(),
            "sampler": self.sampler,
            "spacing": self.spacing,
            "karras": self.karras,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }
        with atomic_path(directory / PIPELINE_CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        text_encoder: TextEncoder | None = None,
        device: str | torch.device | None = None,
        raw_weights: bool = False,
    ) -> Text2Image:
        """Load a folder written by `save_pretrained`; `raw_weights` takes the UNet from `unet_raw/` (the
        training weights, when the folder keeps them) instead of `unet/` (their EMA)."""
        directory = Path(directory)
        path = directory / PIPELINE_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} is not a folder written by Text2Image.save_pretrained")
        config = json.loads(path.read_text())
        unet_dir = directory / (RAW_UNET_FOLDER if raw_weights else "unet")
        if raw_weights and not unet_dir.is_dir():
            raise FileNotFoundError(f"{directory} keeps no raw UNet weights ({RAW_UNET_FOLDER}/); load its EMA weights")
        return cls(
            vae=VAE.from_pretrained(directory / "vae", device=device),
            unet=UNet.from_pretrained(unet_dir, device=device),
            text_encoder=text_encoder or TextEncoder.from_pretrained(config["text_encoder"], device=device),
            schedule=NoiseSchedule.from_dict(config["schedule"]),
            sampler=config["sampler"],
            spacing=config["spacing"],
            karras=config["karras"],
            steps=config.get("steps", 20),
            guidance_scale=config.get("guidance_scale", 5.0),
        )
