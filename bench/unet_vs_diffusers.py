"""Our UNet and sampling loop vs diffusers' on the same converted weights, timed side by side in one run.

    python bench/unet_vs_diffusers.py               # cpu preset and sd15 (one step, batch 1)
    python bench/unet_vs_diffusers.py --only cpu

For each preset: the UNet forward alone, and (cpu) a 25-step DPM-Solver++ text-to-latent loop with
classifier-free guidance (ours: `ldm.samplers.sample`; theirs: `UNet2DConditionModel` +
`DPMSolverMultistepScheduler`). Timings are medians of interleaved repeats; the ratio is diffusers / ours
(above 1 means we are faster). The outputs are compared too, so a speed-up can't come from doing less.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

from ldm.diffusers_interop import from_diffusers, unet_config_to_diffusers
from ldm.presets import preset
from ldm.samplers import sample
from ldm.schedule import NoiseSchedule

TEXT_TOKENS = 10  # a shapes caption under the MiniLM tokenizer
SD_TEXT_TOKENS = 77  # CLIP's padded context in Stable Diffusion


def interleaved_medians(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: allocator, thread pool, first-call dispatch
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_pair(preset_name: str) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    config = unet_config_to_diffusers(preset(preset_name).unet)
    theirs = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ours = from_diffusers(config, theirs.state_dict())
    return ours, theirs


def report(title: str, medians: dict[str, float], max_diff: float) -> None:
    ratio = medians["diffusers"] / medians["ldm"]
    print(f"{title:58s} ldm {medians['ldm'] * 1e3:9.1f} ms  diffusers {medians['diffusers'] * 1e3:9.1f} ms  "
          f"ratio {ratio:5.2f}x  max|diff| {max_diff:.1e}")


@torch.inference_mode()
def bench_forward(preset_name: str, batch: int, tokens: int, repeats: int) -> None:
    ours, theirs = build_pair(preset_name)
    c = preset(preset_name).unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, tokens, c.cross_attention_dim, generator=gen)
    diff = (ours(x, t, context) - theirs(x, t, context).sample).abs().max().item()
    medians = interleaved_medians(
        {"ldm": lambda: ours(x, t, context), "diffusers": lambda: theirs(x, t, context).sample}, repeats
    )
    report(f"{preset_name}: UNet forward, batch {batch}, {tokens} tokens", medians, diff)


@torch.inference_mode()
def bench_sampling_loop(preset_name: str, prompts: int, steps: int, repeats: int, guidance: float = 5.0) -> None:
    ours, theirs = build_pair(preset_name)
    c = preset(preset_name).unet
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2 * prompts, TEXT_TOKENS, c.cross_attention_dim, generator=gen)  # [uncond; cond]
    noise = torch.randn(prompts, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    schedule = NoiseSchedule()

    def guided(unet_call):
        def model(x, t):
            uncond, cond = unet_call(torch.cat([x, x]), t.reshape(-1).expand(2 * len(x)), context).chunk(2)
            return uncond + guidance * (cond - uncond)
        return model

    ours_model = guided(lambda x, t, ctx: ours(x, t, ctx))
    theirs_model = guided(lambda x, t, ctx: theirs(x, t, ctx).sample)

    def run_ours():
        return sample(ours_model, noise, schedule, sampler="dpmpp_2m", steps=steps, spacing="leading")

    def run_theirs():
        scheduler = DPMSolverMultistepScheduler(timestep_spacing="leading")
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = theirs_model(scheduler.scale_model_input(latents, t), t)
            latents = scheduler.step(out, t, latents).prev_sample
        return latents

    diff = (run_ours() - run_theirs()).abs().max().item()
    medians = interleaved_medians({"ldm": run_ours, "diffusers": run_theirs}, repeats)
    report(f"{preset_name}: {steps}-step DPM-Solver++ loop, guidance, {prompts} prompts", medians, diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cpu", "sd15"], help="run one preset only")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "cpu"):
        bench_forward("cpu", batch=2, tokens=TEXT_TOKENS, repeats=args.repeats * 5)
        bench_forward("cpu", batch=128, tokens=TEXT_TOKENS, repeats=args.repeats)
        bench_sampling_loop("cpu", prompts=1, steps=25, repeats=args.repeats)
        bench_sampling_loop("cpu", prompts=16, steps=25, repeats=args.repeats)
    if args.only in (None, "sd15"):
        bench_forward("sd15", batch=1, tokens=SD_TEXT_TOKENS, repeats=max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
