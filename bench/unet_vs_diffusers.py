"""Our UNet and sampling loop vs diffusers' on the same converted weights, timed side by side in one run.

    python bench/unet_vs_diffusers.py               # cpu preset and sd15 (one step, batch 1)
    python bench/unet_vs_diffusers.py --only cpu

For each preset: the UNet forward alone, and (cpu) a 25-step DPM-Solver++ text-to-latent loop with
classifier-free guidance (ours: `ldm.diffusion.samplers.sample`; theirs: `UNet2DConditionModel` +
`DPMSolverMultistepScheduler`), and the same loop for a flow model with the Euler flow sampler (theirs:
`FlowMatchEulerDiscreteScheduler`). Ours runs eager and, at the cpu preset, also compiled the way
`Text2Image(compile=True)` compiles it (its one-off compile time is printed). Timings are medians of
interleaved repeats; a ratio is diffusers / ours (above 1 means we are faster). Outputs are compared too
(max difference relative to the largest value), so a speed-up can't come from doing less.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from timing import interleaved_medians

from ldm.diffusion.pipeline import compile_for_sampling
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedule import FlowSchedule, NoiseSchedule
from ldm.interop.diffusers import from_diffusers, unet_config_to_diffusers
from ldm.models.presets import preset

TEXT_TOKENS = 10  # a shapes caption under the MiniLM tokenizer
SD_TEXT_TOKENS = 77  # CLIP's padded context in Stable Diffusion


def build_pair(preset_name: str) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    config = unet_config_to_diffusers(preset(preset_name).unet)
    theirs = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ours = from_diffusers(config, theirs.state_dict())
    return ours, theirs


def compiled(unet: torch.nn.Module, warm_up: Callable) -> torch.nn.Module:
    """The UNet as Text2Image(compile=True) runs it; prints the compile time of the first call."""
    fast = compile_for_sampling(unet)
    start = time.perf_counter()
    warm_up(fast)
    print(f"    (torch.compile of the UNet for this shape: {time.perf_counter() - start:.1f} s)")
    return fast


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def report(medians: dict[str, float], diffs: dict[str, float]) -> None:
    for name, median in medians.items():
        if name == "diffusers":
            print(f"    {name:16s} {median * 1e3:9.1f} ms")
        else:
            ratio = medians["diffusers"] / median
            print(f"    {name:16s} {median * 1e3:9.1f} ms   ratio {ratio:5.2f}x   rel. diff {diffs[name]:.1e}")


def compare_loops(ours: torch.nn.Module, run_ours: Callable, run_theirs: Callable, repeats: int) -> None:
    """Our loop eager and compiled against diffusers': each result's difference from theirs, and the medians."""
    fast = compiled(ours, run_ours)
    fns = {"ldm eager": lambda: run_ours(ours), "ldm compiled": lambda: run_ours(fast)}
    expected = run_theirs()
    diffs = {name: relative_diff(fn(), expected) for name, fn in fns.items()}
    fns["diffusers"] = run_theirs
    report(interleaved_medians(fns, repeats), diffs)


def guided(unet_call: Callable, context: torch.Tensor, guidance: float) -> Callable:
    """A sampler's model(x, t): the UNet on [uncond; cond] `context` rows, combined with classifier-free guidance."""

    def model(x, t):
        t = t.reshape(-1).expand(len(x)).repeat(2)  # ours passes (B,) timesteps, diffusers' schedulers a scalar
        uncond, cond = unet_call(torch.cat([x, x]), t, context).chunk(2)
        return uncond + guidance * (cond - uncond)

    return model


@torch.inference_mode()
def bench_forward(preset_name: str, batch: int, tokens: int, repeats: int, compile: bool) -> None:
    print(f"{preset_name}: UNet forward, batch {batch}, {tokens} tokens")
    ours, theirs = build_pair(preset_name)
    c = preset(preset_name).unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, tokens, c.cross_attention_dim, generator=gen)
    expected = theirs(x, t, context).sample
    fns = {"ldm eager": lambda: ours(x, t, context)}
    if compile:
        fast = compiled(ours, lambda unet: unet(x, t, context))
        fns["ldm compiled"] = lambda: fast(x, t, context)
    diffs = {name: relative_diff(fn(), expected) for name, fn in fns.items()}
    fns["diffusers"] = lambda: theirs(x, t, context).sample
    report(interleaved_medians(fns, repeats), diffs)


@torch.inference_mode()
def bench_sampling_loop(preset_name: str, prompts: int, steps: int, repeats: int, guidance: float = 5.0) -> None:
    print(f"{preset_name}: {steps}-step DPM-Solver++ text-to-latent loop, guidance {guidance}, {prompts} prompts")
    ours, theirs = build_pair(preset_name)
    c = preset(preset_name).unet
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2 * prompts, TEXT_TOKENS, c.cross_attention_dim, generator=gen)  # [uncond; cond]
    noise = torch.randn(prompts, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    schedule = NoiseSchedule()

    theirs_model = guided(lambda x, t, ctx: theirs(x, t, ctx).sample, context, guidance)

    def run_ours(unet):
        return sample(guided(unet, context, guidance), noise, schedule, sampler="dpmpp_2m", steps=steps, spacing="leading")

    def run_theirs():
        scheduler = DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading"
        )
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = theirs_model(scheduler.scale_model_input(latents, t), t)
            latents = scheduler.step(out, t, latents).prev_sample
        return latents

    compare_loops(ours, run_ours, run_theirs, repeats)


@torch.inference_mode()
def bench_flow_loop(preset_name: str, prompts: int, steps: int, repeats: int, guidance: float = 5.0) -> None:
    """The same loop for a flow model (`train_unet.objective: flow`): our Euler flow sampler against diffusers'
    FlowMatchEulerDiscreteScheduler (shift 3, as SD3's), on the same weights."""
    print(f"{preset_name}: {steps}-step Euler flow text-to-latent loop (shift 3), guidance {guidance}, {prompts} prompts")
    ours, theirs = build_pair(preset_name)
    c = preset(preset_name).unet
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2 * prompts, TEXT_TOKENS, c.cross_attention_dim, generator=gen)
    noise = torch.randn(prompts, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    schedule = FlowSchedule(shift=3.0)

    theirs_model = guided(lambda x, t, ctx: theirs(x, t, ctx).sample, context, guidance)

    def run_ours(unet):
        return sample(guided(unet, context, guidance), noise, schedule, sampler="euler", steps=steps)

    def run_theirs():
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        latents = noise.clone()
        for t in scheduler.timesteps:
            latents = scheduler.step(theirs_model(latents, t), t, latents).prev_sample
        return latents

    compare_loops(ours, run_ours, run_theirs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cpu", "sd15"], help="run one preset only")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "cpu"):
        bench_forward("cpu", batch=2, tokens=TEXT_TOKENS, repeats=args.repeats * 5, compile=False)
        bench_forward("cpu", batch=128, tokens=TEXT_TOKENS, repeats=args.repeats, compile=False)
        bench_sampling_loop("cpu", prompts=1, steps=25, repeats=args.repeats)
        bench_sampling_loop("cpu", prompts=16, steps=25, repeats=args.repeats)
        bench_flow_loop("cpu", prompts=16, steps=25, repeats=args.repeats)
    if args.only in (None, "sd15"):
        bench_forward("sd15", batch=1, tokens=SD_TEXT_TOKENS, repeats=max(3, args.repeats // 2), compile=False)


if __name__ == "__main__":
    main()
