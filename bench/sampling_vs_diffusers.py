"""Text to image, prompts in and images out: `Text2Image` vs the loop of diffusers' StableDiffusionPipeline.

    python bench/sampling_vs_diffusers.py                  # default model (1 and 16 prompts), sd15 one step
    python bench/sampling_vs_diffusers.py --only default
    python bench/sampling_vs_diffusers.py --only sd15 --sd15-compile   # also sd15 compiled (minutes to compile)

The whole call is timed: tokenizing and encoding the prompts, the guided DPM-Solver++(2M) loop, VAE decode.
Ours is `Text2Image.from_pretrained("models/text2img")`, the trained default model with the sampler, steps
and guidance it was saved with, called as a user calls it: eager, and built with `compile=True` (the one-off
compile time of its first call is printed). Theirs does what `StableDiffusionPipeline.__call__` does on every
call, spelled out: diffusers' `UNet2DConditionModel` and `AutoencoderKL` holding our converted weights, the
transformers text model inside our `TextEncoder` (its tokenizer settings; the text mask goes to the UNet as
`encoder_attention_mask`), and a `DPMSolverMultistepScheduler` configured like our schedule. The 1-prompt call
is also timed stage by stage, to show where the gap is.

sd15 (random weights at Stable Diffusion v1.5's shapes): one guided denoising step, the UNet on the
(negative, prompt) pair of 77 CLIP tokens at 64x64 latents, then guidance and the solver step.

Timings are medians of interleaved repeats; a ratio is diffusers / ours (above 1 means we are faster).
Images (in [-1, 1]) and sd15 latents are compared too, so a speed-up can't come from doing less.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from timing import interleaved_medians

from ldm.data.shapes import ShapesConfig, caption, sample_scene
from ldm.diffusion.pipeline import Text2Image, compile_for_sampling, denoise
from ldm.diffusion.schedule import NoiseSchedule
from ldm.interop.diffusers import from_diffusers, to_diffusers, unet_config_to_diffusers
from ldm.models.presets import preset
from ldm.models.text_encoder import SD_CONTEXT_LENGTH, TextEmbedding

DEFAULT_MODEL = Path("models/text2img")
# Captions as the default model was trained on, half of them of two objects: lengths differ, so a batch is
# padded and the text mask matters.
PROMPTS = [caption(sample_scene(ShapesConfig(two_object_fraction=0.5), random.Random(i))) for i in range(16)]
SEED = 0
SD15_GUIDANCE = 7.5  # StableDiffusionPipeline's default


def timed_interleaved(fns: dict[str, Callable], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Medians of interleaved repeats, and what each function returned on its untimed warm-up call (the
    output that is compared: a second call just for that would cost ~10 s per function at sd15)."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up: allocator, thread pool, first-call dispatch
    return interleaved_medians(fns, repeats, warmup=0), outputs


def report(medians: dict[str, float], outputs: dict[str, torch.Tensor], theirs: str = "diffusers") -> None:
    for name, median in medians.items():
        if name == theirs:
            print(f"    {name:16s} {median * 1e3:9.1f} ms")
        else:
            ratio = medians[theirs] / median
            diff = (outputs[name] - outputs[theirs]).abs().max().item()
            print(f"    {name:16s} {median * 1e3:9.1f} ms   ratio {ratio:5.2f}x   max abs diff {diff:.1e}")


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def diffusers_scheduler(schedule: NoiseSchedule, spacing: str) -> DPMSolverMultistepScheduler:
    """The scheduler our `dpmpp_2m` sampler equals, for this schedule and timestep spacing."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule, prediction_type=schedule.prediction_type, timestep_spacing=spacing,
    )


def diffusers_denoise(
    unet: UNet2DConditionModel,
    scheduler: DPMSolverMultistepScheduler,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    guidance: float,
    shape: tuple[int, ...],
    steps: int,
) -> torch.Tensor:
    """StableDiffusionPipeline's prepare_latents and denoising loop; `embeds` holds the negative rows first."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out = unet(x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents, generator=generator, return_dict=False)[0]
    return latents


class DiffusersText2Image:
    """What StableDiffusionPipeline.__call__ does on every call, on diffusers' models holding `ours`'s weights."""

    def __init__(self, ours: Text2Image):
        unet_config, unet_state = to_diffusers(ours.unet)
        self.unet = UNet2DConditionModel.from_config(_public(unet_config)).eval()
        self.unet.load_state_dict(unet_state)
        vae_config, vae_state = to_diffusers(ours.vae)
        self.vae = AutoencoderKL.from_config(_public(vae_config)).eval()
        self.vae.load_state_dict(vae_state)
        self.text_model, self.tokenizer = ours.text_encoder.model, ours.text_encoder.tokenizer
        self.max_length = ours.text_encoder.max_length
        self.scheduler = diffusers_scheduler(ours.schedule, ours.spacing)
        self.steps, self.guidance = ours.steps, ours.guidance_scale
        self.latent_shape = (ours.unet.config.in_channels, ours.unet.config.sample_size, ours.unet.config.sample_size)

    def _encode(self, texts: list[str], padding: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(texts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
        embeds = self.text_model(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return embeds, tokens.attention_mask

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """StableDiffusionPipeline.encode_prompt: the prompts, then the empty negative prompt padded to their
        length, both through the text model on every call; concatenated negative first."""
        cond, cond_mask = self._encode(prompts, "longest", self.max_length)
        uncond, uncond_mask = self._encode([""] * len(prompts), "max_length", cond.shape[1])
        return torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])

    def denoise(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shape = (len(embeds) // 2, *self.latent_shape)
        return diffusers_denoise(self.unet, self.scheduler, embeds, mask, self.guidance, shape, self.steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # StableDiffusionPipeline leaves out the VAE's shift factor (SD's is 0); ours has one, applied as
        # diffusers' SD3 pipeline applies it.
        z = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.decode(self.denoise(*self.encode_prompt(prompts)))


def load_default_model() -> Text2Image:
    if not (DEFAULT_MODEL / "pipeline.json").is_file():
        raise FileNotFoundError(
            f"{DEFAULT_MODEL} holds no trained text-to-image model: train it with `dvc repro train_unet` "
            "(or fetch it with `dvc pull`), and run this from the repository root"
        )
    return Text2Image.from_pretrained(DEFAULT_MODEL)


def with_compile(pipe: Text2Image) -> Text2Image:
    """The same pipeline built with compile=True, as a user asks for it (from_pretrained takes no such option)."""
    return Text2Image(
        vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, schedule=pipe.schedule, sampler=pipe.sampler,
        spacing=pipe.spacing, karras=pipe.karras, compile=True, steps=pipe.steps, guidance_scale=pipe.guidance_scale,
    )


def bench_text_to_image(pipe: Text2Image, theirs: DiffusersText2Image, prompts: list[str], repeats: int) -> None:
    print(f"default model: text to image, {len(prompts)} prompt(s), {pipe.sampler} {pipe.steps} steps, "
          f"guidance {pipe.guidance_scale}, {pipe.spacing} spacing, {pipe.schedule.prediction_type}")
    # Compiled as a fresh process would: after another batch shape the UNet would be recompiled for dynamic shapes.
    torch._dynamo.reset()
    fast = with_compile(pipe)
    start = time.perf_counter()
    fast(prompts, seed=SEED)
    print(f"    (compile=True: first call, compiling the UNet for this batch: {time.perf_counter() - start:.1f} s)")
    fns = {
        "ldm eager": lambda: pipe(prompts, seed=SEED),
        "ldm compiled": lambda: fast(prompts, seed=SEED),
        "diffusers": lambda: theirs(prompts),
    }
    report(*timed_interleaved(fns, repeats))


def bench_stages(pipe: Text2Image, theirs: DiffusersText2Image, prompts: list[str], repeats: int) -> None:
    """The eager call split where Text2Image.__call__ splits it; each side's stages run as its call runs them."""
    print(f"default model: the eager call by stage, {len(prompts)} prompt(s)")
    shape = (len(prompts), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    with torch.inference_mode():
        context = pipe.encode_prompts(prompts, None, guided=True)
    with torch.no_grad():
        embeds, mask = theirs.encode_prompt(prompts)
        latents = theirs.denoise(embeds, mask)

    def our_loop() -> torch.Tensor:
        return denoise(pipe.denoise, context, pipe.guidance_scale, shape, pipe.schedule, sampler=pipe.sampler,
                       steps=pipe.steps, spacing=pipe.spacing, seed=SEED)

    stages = {
        "text encoding": (lambda: pipe.encode_prompts(prompts, None, guided=True), lambda: theirs.encode_prompt(prompts)),
        "denoising loop": (our_loop, lambda: theirs.denoise(embeds, mask)),
        "VAE decode": (lambda: pipe.vae.decode(pipe.vae.unscale_latents(latents)), lambda: theirs.decode(latents)),
    }
    fns = {}
    for stage, (ours, their) in stages.items():
        fns[f"{stage} ours"] = torch.inference_mode()(ours)  # as Text2Image.__call__ runs
        fns[f"{stage} theirs"] = torch.no_grad()(their)  # as StableDiffusionPipeline.__call__ runs
    medians, _ = timed_interleaved(fns, repeats)
    for stage in stages:
        our_time, their_time = medians[f"{stage} ours"], medians[f"{stage} theirs"]
        print(f"    {stage:16s} ours {our_time * 1e3:8.1f} ms   diffusers {their_time * 1e3:8.1f} ms   "
              f"ratio {their_time / our_time:5.2f}x")


def bench_sd15_step(repeats: int, compile: bool) -> None:
    """One step of the loop at Stable Diffusion v1.5's shapes, where the UNet's convolutions dominate."""
    print(f"sd15 (random weights): one guided denoising step, the UNet at batch 2, {SD_CONTEXT_LENGTH} tokens, "
          "64x64 latents")
    config = unet_config_to_diffusers(preset("sd15").unet)
    theirs = UNet2DConditionModel.from_config(_public(config)).eval()
    ours = from_diffusers(config, theirs.state_dict())
    c = ours.config
    states = torch.randn(2, SD_CONTEXT_LENGTH, c.cross_attention_dim, generator=torch.Generator().manual_seed(SEED))
    # CLIP pads every prompt to 77 tokens and Stable Diffusion attends to all of them: no mask on either side.
    context = TextEmbedding(states, torch.ones(states.shape[:2], dtype=torch.bool))
    schedule = NoiseSchedule()  # Stable Diffusion's, predicting the noise
    scheduler = diffusers_scheduler(schedule, "trailing")
    shape = (1, c.in_channels, c.sample_size, c.sample_size)

    @torch.inference_mode()
    def our_step(unet: Callable) -> torch.Tensor:
        return denoise(unet, context, SD15_GUIDANCE, shape, schedule, steps=1, spacing="trailing", seed=SEED)

    @torch.no_grad()
    def their_step() -> torch.Tensor:
        return diffusers_denoise(theirs, scheduler, states, None, SD15_GUIDANCE, shape, steps=1)

    fns = {"ldm eager": lambda: our_step(ours)}
    if compile:
        torch._dynamo.reset()  # compiled as a fresh process would, not as a new shape of the default model's UNet
        fast = compile_for_sampling(ours)
        start = time.perf_counter()
        our_step(fast)
        print(f"    (torch.compile of the sd15 UNet: {time.perf_counter() - start:.1f} s)")
        fns["ldm compiled"] = lambda: our_step(fast)
    fns["diffusers"] = their_step
    report(*timed_interleaved(fns, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["default", "sd15"], help="run one configuration only")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of a 1-prompt call (16 prompts: a third)")
    parser.add_argument("--sd15-repeats", type=int, default=3, help="timed repeats of the sd15 step (~10 s each)")
    parser.add_argument("--sd15-compile", action="store_true", help="also time sd15 compiled (compiling takes minutes)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()  # the text model's weight-loading bar
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "default"):
        pipe = load_default_model()
        theirs = DiffusersText2Image(pipe)
        bench_text_to_image(pipe, theirs, PROMPTS[:1], args.repeats)
        bench_stages(pipe, theirs, PROMPTS[:1], args.repeats)
        bench_text_to_image(pipe, theirs, PROMPTS, max(3, args.repeats // 3))
    if args.only in (None, "sd15"):
        bench_sd15_step(args.sd15_repeats, args.sd15_compile)


if __name__ == "__main__":
    main()
