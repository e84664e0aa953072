"""Text-to-image, img2img and inpainting: text encoder -> sampler over the UNet with classifier-free guidance
(optionally steered by a ControlNet, optionally with LoRA adapters) -> VAE decoder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ldm.diffusion.names import FLOW_SAMPLERS, SAMPLERS
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedule import FlowSchedule, NoiseSchedule, Schedule, schedule_from_dict
from ldm.errors import InputError, InputNotFoundError
from ldm.models.modeling import atomic_path
from ldm.models.text_encoder import TextEmbedding, TextEncoder
from ldm.models.unet import UNet
from ldm.models.vae import VAE

if TYPE_CHECKING:
    from ldm.models.controlnet import ControlNet
    from ldm.models.lora import LoraSpec

PIPELINE_CONFIG_NAME = "pipeline.json"
# A trained model's folder keeps the raw UNet weights here, beside the EMA weights in `unet/` that sampling uses.
RAW_UNET_FOLDER = "unet_raw"
# Latents up to this size sample faster with the UNet's weights channels-last: oneDNN's convolutions then skip
# a reorder per call, which is much of their time on small maps (the cpu preset's 8x8: 1.16x per call, 1.10x
# at 16 prompts); at Stable Diffusion's 64x64 it cost 6-8% (bench/sampling_vs_diffusers.py).
CHANNELS_LAST_MAX_LATENT = 32


def compile_for_sampling(unet: UNet) -> Callable:
    """The UNet through `torch.compile` with frozen weights, for sampling (gradients off).

    Freezing folds the weights into the compiled graph as constants, prepacked for the CPU's conv and
    matmul kernels: 1.7x the eager forward at the cpu preset, where `torch.compile` without it gains
    about 1.2x. It is set for this compile alone (inductor applies it only to graphs compiled with gradients
    disabled), so the process's other compiles, training graphs among them, keep inductor's defaults.
    """
    return torch.compile(unet, options={"freezing": True})


@dataclass(frozen=True)
class InitLatents:
    """Where img2img and inpainting start. latents: (B, C, h, w) the input image's clean latents in the
    diffusion space; strength: how much of the schedule is re-run (see `ldm.diffusion.samplers.sample`); mask:
    (B, 1, h, w), 1 where the image is regenerated and 0 where the input is kept, or None for img2img."""

    latents: torch.Tensor
    strength: float
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Control:
    """A ControlNet and what it is shown: images (B, C, H, W) in [0, 1] at pixel resolution, and the scale of
    its residuals (0 turns it off, 1 is as trained)."""

    net: ControlNet
    images: torch.Tensor
    scale: float = 1.0


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec.
    3.4): pull the guided prediction's per-sample std back to the conditional one's, which keeps high guidance
    from over-exposing, mixed with the plain guided prediction by `rescale` in [0, 1]. (B, ...) -> (B, ...)"""
    dims = tuple(range(1, guided.dim()))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


def _noised_to(schedule: Schedule, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`latents` noised with `noise` to timestep t (a sampler's, possibly fractional) in the form the network
    sees: a flow's x_t, or the VP sample at the schedule's sigma interpolated linearly in t, as the Euler
    samplers place it."""
    if isinstance(schedule, FlowSchedule):
        return schedule.add_noise(latents, noise, t)
    table = schedule.sigmas.numpy()
    sigma = float(np.interp(t[0].item(), np.arange(len(table)), table))
    alpha = (1 + sigma**2) ** -0.5
    return alpha * latents + (alpha * sigma) * noise


def denoise(
    unet: Callable,
    context: TextEmbedding,
    guidance_scale: float,
    shape: tuple[int, int, int, int],
    schedule: Schedule,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    spacing: str = "leading",
    karras: bool = False,
    eta: float = 0.0,
    seed: int | list[int] = 0,
    callback: Callable[[int, int], None] | None = None,
    guidance_rescale: float = 0.0,
    init: InitLatents | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """Sample latents (B, C, h, w) in the diffusion model's space from the UNet's text context.

    With guidance (guidance_scale > 1) `context` is (2B, S, D): the B unconditional (or negative) rows
    first, then the B prompts; without, it is (B, S, D). The initial latents are drawn on the CPU from
    `seed`, and the same generator then feeds the sampler's noise. With one seed per image, image i's
    initial latents come from its own seed, so with a deterministic sampler (all but ddpm, euler_ancestral
    and ddim with eta > 0) an image does not depend on the batch it is drawn in.

    `init` turns this into img2img (start from its latents, partly noised) or, with a mask, inpainting: before
    every network call the kept region of the sample is replaced by the input's latents noised to that step's
    level with the initial noise, so the regenerated region is denoised in the context of the kept one; the
    result keeps the input's latents outside the mask. `control` adds a ControlNet's residuals to the UNet's
    skips, for the unconditional and the conditional half alike.
    """
    guided = guidance_scale > 1.0
    if len(context) != (2 if guided else 1) * shape[0]:
        raise InputError(f"{len(context)} context rows for {shape[0]} images with guidance={guided}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise InputError(f"guidance_rescale={guidance_rescale} is out of range; use 0 (off) .. 1")
    device, dtype = context.hidden_states.device, context.hidden_states.dtype
    # Prompts of equal length need no mask, and attention without one takes a faster kernel.
    mask = None if context.attention_mask.all() else context.attention_mask
    if init is not None:
        init = InitLatents(
            init.latents.to(device, dtype), init.strength, None if init.mask is None else init.mask.to(device, dtype)
        )
    control_images = None
    if control is not None:
        control_images = control.images.to(device, dtype)
        control_images = torch.cat([control_images, control_images]) if guided else control_images

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if control is None:
            return unet(x, t, context.hidden_states, mask)
        down, mid = control.net(x, t, context.hidden_states, mask, control_images, control.scale)
        return unet(x, t, context.hidden_states, mask, down_residuals=down, mid_residual=mid)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if init is not None and init.mask is not None:
            x = init.mask * x + (1 - init.mask) * _noised_to(schedule, init.latents, noise, t)
        if not guided:
            return network(x, t)
        uncond, cond = network(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
        return rescale_guidance(out, cond, guidance_rescale) if guidance_rescale > 0 else out

    if isinstance(seed, int):
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
    else:
        if len(seed) != shape[0]:
            raise InputError(f"{len(seed)} seeds for {shape[0]} images; give one seed, or one per image")
        generators = [torch.Generator("cpu").manual_seed(s) for s in seed]
        noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
        generator = generators[0]
    noise = noise.to(device, dtype)
    latents = sample(
        model, noise, schedule, sampler=sampler, steps=steps, spacing=spacing, karras=karras, eta=eta,
        generator=generator, callback=callback, init=None if init is None else init.latents,
        strength=1.0 if init is None else init.strength,
    )
    if init is not None and init.mask is not None:
        latents = init.mask * latents + (1 - init.mask) * init.latents
    return latents


class Text2Image:
    """Generate images from prompts; from an input image too (img2img), or only inside a mask (inpainting).

    Same weights, sampler, steps and seed give the same image as the equivalent diffusers loop: the initial
    latents are `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` and the same
    generator then feeds the sampler's noise, in diffusers' order.
    """

    def __init__(
        self,
        vae: VAE,
        unet: UNet,
        text_encoder: TextEncoder,
        schedule: Schedule | None = None,
        sampler: str = "dpmpp_2m",
        spacing: str = "leading",
        karras: bool = False,
        compile: bool = False,
        steps: int = 20,
        guidance_scale: float = 5.0,
        controlnet: ControlNet | None = None,
        control_scale: float = 1.0,
    ):
        """`compile=True` runs the UNet through `compile_for_sampling`: 10-30 s of compiling on first use
        (and on a new batch shape), then sampling at the cpu preset 1.3-1.5x faster than eager (bench/).
        The weights are baked in, so build a new pipeline after changing them. `steps` and `guidance_scale`
        are the defaults of a call (a trained model saves the ones it was validated with). `controlnet`: a
        ControlNet trained for this UNet, used by calls given `control_image`, at `control_scale` by default."""
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if isinstance(schedule, FlowSchedule) and sampler not in FLOW_SAMPLERS:
            raise InputError(f"sampler {sampler!r} does not integrate a flow model; choose one of {list(FLOW_SAMPLERS)}")
        if unet.config.cross_attention_dim != text_encoder.hidden_size:
            raise InputError(
                f"the UNet cross-attends to {unet.config.cross_attention_dim}-wide text tokens but the text encoder "
                f"{text_encoder.name!r} gives {text_encoder.hidden_size}; use the encoder the UNet was trained with"
            )
        if controlnet is not None and controlnet.config.unet != unet.config:
            raise InputError(
                "the ControlNet was trained for a UNet of another architecture than this pipeline's; train one for "
                "this model"
            )
        self.vae, self.unet, self.text_encoder, self.controlnet = vae, unet, text_encoder, controlnet
        self.schedule = schedule or NoiseSchedule()
        self.sampler, self.spacing, self.karras = sampler, spacing, karras
        self.steps, self.guidance_scale, self.control_scale = steps, guidance_scale, control_scale
        self.compile = compile
        self.denoise = compile_for_sampling(unet) if compile else unet

    def use_compiled_unet(self) -> None:
        """Sample through `compile_for_sampling` from now on, as `compile=True` does: for many prompts in one
        process, where the compile time (on first use and per new batch shape) pays back."""
        self.compile, self.denoise = True, compile_for_sampling(self.unet)

    def load_loras(self, loras: Sequence[LoraSpec], merge: bool = False) -> None:
        """Apply LoRA adapters to the UNet, each at its scale (`ldm.models.lora.load_loras`); `merge` folds them into
        the weights, which samples at the base model's speed but cannot be undone."""
        from ldm.models.lora import load_loras

        self.unet = load_loras(self.unet, loras, merge=merge)
        self.denoise = compile_for_sampling(self.unet) if self.compile else self.unet

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
                raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
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
        guidance_rescale: float = 0.0,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
        mask: torch.Tensor | None = None,
        control_image: torch.Tensor | None = None,
        control_scale: float | None = None,
    ) -> torch.Tensor:
        """Returns images (B, 3, H, W) in [-1, 1]. `seed`: one for the batch, or one per prompt (see `denoise`);
        `steps` and `guidance_scale` default to the pipeline's own; `guidance_rescale` in [0, 1] (see
        `rescale_guidance`).

        img2img: `init_image` (1 or B, 3, H, W) in [-1, 1] is encoded (posterior mean) and re-generated from
        `strength` of the schedule (default 0.8): 0 returns it through the VAE, 1 is plain text-to-image.
        Inpainting: with `mask` (1 or B, 1, H, W) in [0, 1] too, only where the mask is 1 (a latent pixel is
        regenerated when at least half of its image pixels are) and from the start by default (strength 1).
        ControlNet: `control_image` (1 or B, C, H, W) in [0, 1], e.g. an edge map (`ldm.models.controlnet.control_map`),
        at the output size, its residuals scaled by `control_scale` (default: the pipeline's, which a trained
        ControlNet's control.json sets). An image or mask of one row applies to all.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps = self.steps if steps is None else steps
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        f = self.vae.downsampling_factor * self.unet.downsampling_factor
        if init_image is not None:
            height, width = height or init_image.shape[-2], width or init_image.shape[-1]
        height = height or self.unet.config.sample_size * self.vae.downsampling_factor
        width = width or height
        if height % f or width % f:
            raise InputError(f"image size {height}x{width} is not a multiple of {f} (VAE factor x UNet factor)")
        guided = guidance_scale > 1.0
        context = self.encode_prompts(prompts, negative_prompt, guided).to(self.device, self.dtype)
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae.downsampling_factor,
                 width // self.vae.downsampling_factor)
        init = self._init_latents(init_image, strength, mask, shape)
        control = None
        if control_image is not None:
            if self.controlnet is None:
                raise InputError("a control image needs a ControlNet: load the pipeline with one (`--controlnet`)")
            control = Control(self.controlnet, _per_prompt("control image", control_image, shape[0], (height, width)),
                              self.control_scale if control_scale is None else control_scale)
        latents = denoise(
            self.denoise, context, guidance_scale, shape, self.schedule, sampler=self.sampler, steps=steps,
            spacing=self.spacing, karras=self.karras, eta=eta, seed=seed, callback=callback,
            guidance_rescale=guidance_rescale, init=init, control=control,
        )
        return self.vae.decode(self.vae.unscale_latents(latents))

    def _init_latents(
        self, image: torch.Tensor | None, strength: float | None, mask: torch.Tensor | None, shape: tuple[int, ...]
    ) -> InitLatents | None:
        if image is None:
            if mask is not None or strength is not None:
                raise InputError("a mask or a strength needs an input image to start from (init_image / --init-image)")
            return None
        size = (shape[2] * self.vae.downsampling_factor, shape[3] * self.vae.downsampling_factor)
        image = _per_prompt("input image", image, shape[0], size).to(self.device, self.dtype)
        latents = self.vae.scale_latents(self.vae.encode(image).mode())
        if mask is None:
            return InitLatents(latents, 0.8 if strength is None else strength)
        mask = _per_prompt("mask", mask, shape[0], size).to(self.device, self.dtype)
        if mask.shape[1] != 1:
            raise InputError(f"the mask has {mask.shape[1]} channels; give one (white = regenerate, black = keep)")
        latent_mask = (F.interpolate(mask, size=shape[2:], mode="area") >= 0.5).to(self.dtype)
        return InitLatents(latents, 1.0 if strength is None else strength, latent_mask)

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
        controlnet: str | os.PathLike | None = None,
    ) -> Text2Image:
        """Load a folder written by `save_pretrained`; `raw_weights` takes the UNet from `unet_raw/` (the
        training weights, when the folder keeps them) instead of `unet/` (their EMA); `controlnet` is the
        folder of a ControlNet trained for this UNet."""
        directory = Path(directory)
        path = directory / PIPELINE_CONFIG_NAME
        if not path.is_file():
            raise InputNotFoundError(f"{path} is missing: {directory} is not a folder written by Text2Image.save_pretrained")
        config = json.loads(path.read_text())
        unet_dir = directory / (RAW_UNET_FOLDER if raw_weights else "unet")
        if raw_weights and not unet_dir.is_dir():
            raise InputNotFoundError(f"{directory} keeps no raw UNet weights ({RAW_UNET_FOLDER}/); load its EMA weights")
        unet = UNet.from_pretrained(unet_dir, device=device)
        if unet.config.sample_size <= CHANNELS_LAST_MAX_LATENT:  # this pipeline's own copy: no caller's UNet changes
            unet = unet.to(memory_format=torch.channels_last)
        return cls(
            vae=VAE.from_pretrained(directory / "vae", device=device),
            unet=unet,
            text_encoder=text_encoder or TextEncoder.from_pretrained(config["text_encoder"], device=device),
            schedule=schedule_from_dict(config["schedule"]),
            sampler=config["sampler"],
            spacing=config["spacing"],
            karras=config["karras"],
            steps=config.get("steps", 20),
            guidance_scale=config.get("guidance_scale", 5.0),
            controlnet=None if controlnet is None else _load_controlnet(controlnet, device),
            control_scale=1.0 if controlnet is None else _control_scale(controlnet),
        )


def _load_controlnet(folder: str | os.PathLike, device: str | torch.device | None) -> ControlNet:
    from ldm.models.controlnet import ControlNet

    if not Path(folder).is_dir():
        raise InputNotFoundError(
            f"ControlNet folder {folder} does not exist: train one (the pipeline's train_controlnet stage writes "
            "models/controlnet), or point at a folder written by ControlNet.save_pretrained"
        )
    return ControlNet.from_pretrained(folder, device=device)


def _control_scale(folder: str | os.PathLike) -> float:
    """The scale a trained ControlNet's control.json recommends; 1 for a folder without one."""
    from ldm.models.controlnet import CONTROL_CONFIG_NAME

    path = Path(folder) / CONTROL_CONFIG_NAME
    return float(json.loads(path.read_text()).get("control_scale", 1.0)) if path.is_file() else 1.0


def _per_prompt(name: str, images: torch.Tensor, count: int, size: tuple[int, int]) -> torch.Tensor:
    """(1 or count, C, H, W) -> (count, C, H, W), checking the size against the output's."""
    if images.dim() != 4 or len(images) not in (1, count):
        raise InputError(f"the {name} must be (1 or {count}, C, H, W), got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != size:
        raise InputError(
            f"the {name} is {images.shape[-1]}x{images.shape[-2]} but the output is {size[1]}x{size[0]}; "
            "resize it, or pass the output size of the image"
        )
    return images.expand(count, *images.shape[1:])
