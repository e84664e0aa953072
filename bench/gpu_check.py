"""A ready GPU check, under 8 minutes on one modern GPU: our UNet and sampling loop against diffusers' on the
same weights at Stable Diffusion v1.5's shapes, and the pipeline end to end on CUDA.

    bash bench/gpu_check.sh                  # on a CUDA machine; the table goes to bench/gpu_check.md
    bash bench/gpu_check.sh --dry-run        # the same code on the CPU at the tiny preset's shapes (the test)

1. Training: one optimizer step of the sd15 UNet on 64x64x4 latents with 77x768 text, bf16 autocast, SDPA,
   AdamW, at the largest batch (of a fixed ladder) both fit: samples/s and peak memory, eager and compiled.
2. Sampling: a 50-step 512x512 text-to-image call with guidance 7.5 and DPM-Solver++ at sd15 shapes (random
   weights, fp16, batch 1): UNet loop and VAE decode, ours against the diffusers loop, eager and compiled
   (ours as `Text2Image(compile=True)` compiles it, diffusers' UNet channels-last under torch.compile).
3. The `ci` profile's stages end to end with `device: cuda`, then its model loaded back on the CPU and sampled.

Without CUDA (and without --dry-run) it says so and exits 0. Public anchors are printed beside the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

from ldm.diffusion.pipeline import Text2Image, compile_for_sampling, denoise
from ldm.diffusion.schedule import NoiseSchedule
from ldm.interop.diffusers import to_diffusers
from ldm.models.presets import preset
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet
from ldm.models.vae import VAE
from stages import cache_latents, evaluate, ingest, sample, train_unet, train_vae
from stages.params import Params
from stages.reporting import ConsoleReporter

REPO = Path(__file__).resolve().parents[1]
ANCHORS = {
    "training": "MosaicML SD2-base, precomputed latents, 256 px: about 137 images/s per A100",
    "sampling": "diffusers SD1.5 512 px, 50 steps, batch 1, A100: about 1.6 s eager SDPA, 1.06 s compiled + channels-last",
}


class Shapes:
    """What the check runs at: sd15 on a GPU, the tiny preset for --dry-run."""

    def __init__(self, dry_run: bool, device: torch.device):
        self.dry_run, self.device = dry_run, device
        chosen = preset("tiny" if dry_run else "sd15")
        self.unet_config, self.vae_config = chosen.unet, chosen.vae
        self.latent = chosen.unet.sample_size if dry_run else 64
        self.tokens = 4 if dry_run else 77
        self.batches = (4, 2) if dry_run else (256, 192, 128, 96, 64, 48, 32, 16, 8)
        self.repeats, self.steps = (2, 3) if dry_run else (10, 50)
        self.dtype = torch.float32 if dry_run else torch.float16
        self.variants: tuple[str, ...] = ("eager", "compiled")


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one untimed call, synchronising the GPU around each."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def twins(shapes: Shapes) -> tuple[UNet, UNet2DConditionModel]:
    """Our UNet and diffusers' holding the same random weights."""
    torch.manual_seed(0)
    ours = UNet(shapes.unet_config)
    config, state = to_diffusers(ours)
    theirs = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    theirs.load_state_dict(state)
    return ours, theirs


def training_step(model: torch.nn.Module, call: Callable, shapes: Shapes, batch: int) -> Callable[[], None]:
    """One bf16-autocast optimizer step on fixed random latents and text: forward, the MSE to a fixed target
    (what the loss is does not change the step's cost), backward and AdamW."""
    device = shapes.device
    latents = torch.randn(batch, 4, shapes.latent, shapes.latent, device=device)
    text = torch.randn(batch, shapes.tokens, shapes.unet_config.cross_attention_dim, device=device)
    t = torch.randint(1000, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(call(latents, t, text).float(), latents)
        loss.backward()
        optimizer.step()

    return step


def largest_batch(make_step: Callable[[int], Callable[[], None]], shapes: Shapes) -> int:
    """The largest batch of the ladder whose step runs (twice: the optimizer state is made on the first)."""
    for batch in shapes.batches:
        try:
            step = make_step(batch)
            step()
            step()
            return batch
        except torch.OutOfMemoryError:
            reset_peak(shapes.device)
    sys.exit("gpu_check: not even the smallest batch fits this GPU")


def training_rows(shapes: Shapes) -> list[list[str]]:
    ours, theirs = twins(shapes)
    ours, theirs = ours.to(shapes.device).train(), theirs.to(shapes.device).train()

    def our_call(model):
        return lambda x, t, text: model(x, t, text, None)

    def their_call(model):
        return lambda x, t, text: model(x, t, encoder_hidden_states=text).sample

    batch = min(largest_batch(lambda b: training_step(ours, our_call(ours), shapes, b), shapes),
                largest_batch(lambda b: training_step(theirs, their_call(theirs), shapes, b), shapes))
    rows = []
    wrappers = {"eager": lambda m: m, "compiled": torch.compile}
    for label in shapes.variants:
        wrap = wrappers[label]
        measured = {}
        for name, model, call in (("ours", ours, our_call), ("diffusers", theirs, their_call)):
            reset_peak(shapes.device)
            began = time.perf_counter()
            step = training_step(model, call(wrap(model)), shapes, batch)
            step()
            first = time.perf_counter() - began
            seconds = timed(step, shapes.repeats, shapes.device)
            measured[name] = (batch / seconds, peak_gib(shapes.device), first)
        (ours_rate, ours_peak, ours_first), (their_rate, their_peak, their_first) = measured["ours"], measured["diffusers"]
        rows.append([
            f"training step, {label}, batch {batch}", f"{ours_rate:.1f} samples/s, {_gib(ours_peak)}",
            f"{their_rate:.1f} samples/s, {_gib(their_peak)}", f"{ours_rate / their_rate:.2f}x",
            f"first step {ours_first:.0f} / {their_first:.0f} s" + ("" if label == "eager" else " (compiling)"),
        ])
    return rows


def sampling_rows(shapes: Shapes) -> list[list[str]]:
    device, dtype = shapes.device, shapes.dtype
    ours, theirs = twins(shapes)
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()
    torch.manual_seed(0)
    vae = VAE(shapes.vae_config).to(device, dtype).eval()
    vae_config, vae_state = to_diffusers(vae)
    their_vae = AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    their_vae.load_state_dict(vae_state)
    their_vae = their_vae.to(device, dtype).eval()
    schedule = NoiseSchedule()  # SD's, predicting the noise
    text = torch.randn(2, shapes.tokens, shapes.unet_config.cross_attention_dim, device=device, dtype=dtype)
    context = TextEmbedding(text, torch.ones(2, shapes.tokens, dtype=torch.bool, device=device))
    shape = (1, 4, shapes.latent, shapes.latent)

    def ours_call(unet) -> Callable[[], torch.Tensor]:
        return lambda: vae.decode(vae.unscale_latents(
            denoise(unet, context, 7.5, shape, schedule, sampler="dpmpp_2m", steps=shapes.steps, spacing="leading")
        ))

    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1)

    def theirs_call(unet) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            scheduler.set_timesteps(shapes.steps)
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            for t in scheduler.timesteps:
                out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
                uncond, cond = out.chunk(2)
                latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
            return their_vae.decode(latents / their_vae.config.scaling_factor).sample

        return call

    pixels = shapes.latent * 2 ** (len(shapes.vae_config.block_out_channels) - 1)
    rows = []
    for label in shapes.variants:
        if label == "eager":
            calls = {"ours": ours_call(ours), "diffusers": theirs_call(theirs)}
        else:
            channels_last = theirs.to(memory_format=torch.channels_last)
            calls = {"ours": ours_call(compile_for_sampling(ours)), "diffusers": theirs_call(torch.compile(channels_last))}
        firsts = {}
        for name, call in calls.items():
            began = time.perf_counter()
            with torch.inference_mode():
                call()
            firsts[name] = time.perf_counter() - began
        with torch.inference_mode():
            seconds = {name: timed(call, max(1, shapes.repeats // 3), device) for name, call in calls.items()}
        rows.append([
            f"{shapes.steps}-step guided DPM-Solver++ at {pixels} px, {label}",
            f"{seconds['ours']:.2f} s", f"{seconds['diffusers']:.2f} s", f"{seconds['diffusers'] / seconds['ours']:.2f}x",
            f"first call {firsts['ours']:.0f} / {firsts['diffusers']:.0f} s",
        ])
    return rows


def pipeline_rows(shapes: Shapes) -> list[list[str]]:
    """configs/ci.yaml's stages in this process on the check's device, then the model back on the CPU."""
    with tempfile.TemporaryDirectory() as root:
        raw = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
        raw["paths"] = {key: str(Path(root) / value) for key, value in raw["paths"].items()}
        raw["device"] = shapes.device.type
        params = Params(**raw)
        began = time.perf_counter()
        for stage in (ingest, train_vae, cache_latents, train_unet, evaluate, sample):
            stage.run(params, ConsoleReporter())
        seconds = time.perf_counter() - began
        model = Text2Image.from_pretrained(params.paths.text2img, device="cpu")
        image = model("a large red circle at the top left on a white background", steps=5)
        loaded = bool(torch.isfinite(image).all()) and next(model.unet.parameters()).device.type == "cpu"
    return [[f"ci profile end to end on {shapes.device.type}, loaded back on the CPU", f"{seconds:.0f} s",
             "", "", "ok" if loaded else "FAILED: the model did not sample on the CPU"]]


def _gib(value: float | None) -> str:
    return "peak n/a" if value is None else f"peak {value:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes: the code path, no figures")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile rows (compiling the training step on a CPU takes minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_check.md", help="the table (markdown)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine, so nothing to measure (--dry-run runs the code on the CPU)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = Shapes(args.dry_run, device)
    shapes.variants = ("eager",) if args.no_compile else ("eager", "compiled")
    name = "CPU (dry run, tiny shapes)" if args.dry_run else torch.cuda.get_device_name(device)
    began = time.perf_counter()
    rows = training_rows(shapes)
    reset_peak(device)  # the training models are gone with training_rows
    rows += sampling_rows(shapes) + pipeline_rows(shapes)
    lines = [
        f"GPU check on {name}, torch {torch.__version__}, {time.perf_counter() - began:.0f} s in all",
        "",
        "| check | ours | diffusers | ours over diffusers (speed) | notes |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(f"- anchor, {what}: {anchor}" for what, anchor in ANCHORS.items()),
    ]
    table = "\n".join(lines) + "\n"
    args.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
