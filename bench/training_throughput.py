"""UNet training throughput at the default config: from the latent cache vs encoding on the fly vs diffusers' UNet.

    python bench/training_throughput.py                  # params.yaml's train_unet batch size, 10 timed steps each
    python bench/training_throughput.py --repeats 12 --batch-size 64
    python bench/training_throughput.py --compile        # also both UNets under torch.compile (about a minute each)

One optimizer step is what `ldm.training.unet.train_unet` does per micro-batch at params.yaml's defaults:
a batch, the v-prediction loss, backward, gradient-norm clipping and an AdamW step (no EMA, no LR schedule).
Variants, each training its own copy of the same initial weights on the same rows in the same order:

  1. ours, from the cache        LatentCache rows: a posterior sample and the cached caption embeddings
  2. ours, encoding on the fly   the same rows' ingested PNGs decoded, encoded by the frozen VAE, and their
                                 captions by the text encoder, every step (what the cache saves)
  3. diffusers, from the cache   as 1 with diffusers' UNet2DConditionModel converted from our weights
  4, 5. with --compile           1 and 3 with the UNet under torch.compile, captions padded to the cache's
                                 longest so that one graph serves every batch (the compile time is printed)

Every variant's time includes producing its batch. Timings are medians of interleaved steps (the variants
take turns, so the noise of a shared machine hits them alike), together with a 2048^3 fp32 matmul whose
rate is the peak the training FLOP/s are compared with; a profile of ours then splits the step's time
between the ops that do its FLOPs (convolutions, matrix multiplies, attention) and all the others. Before
timing, ours and diffusers' take one step's loss and gradients on the same weights and batch: they must
agree, so a speed-up can't come from doing less.

Needs the DVC workspace's data (`dvc repro cache_latents` builds it): paths from params.yaml.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from timing import interleaved_medians
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ldm.data.ingested import IngestedDataError, IngestedImages
from ldm.data.latent_cache import LatentCache, TextTable
from ldm.data.order import CacheOrder
from ldm.diffusion.schedule import NoiseSchedule
from ldm.errors import InputError
from ldm.interop.diffusers import to_diffusers
from ldm.models.text_encoder import TextEmbedding, TextEncoder
from ldm.models.unet import UNet
from ldm.models.vae import VAE
from ldm.training.denoising import denoising_loss
from ldm.training.optim import adamw
from stages.params import Params, ParamsError, TrainUNetParams, load_params
from stages.train_unet import open_inputs, unet_config

WARMUP_STEPS = 2  # per variant, untimed: thread pool, allocator, the first caption-table reads
MATMUL_SIZE = 2048
PROFILED_STEPS = 3
# The aten ops that do a UNet step's FLOPs on a CPU, under the names FlopCounterMode and the profiler give them
# (the profiler's for a convolution's own time is the oneDNN kernel's).
FLOP_OPS = {
    "convolutions": ("convolution", "_convolution", "mkldnn_convolution", "convolution_backward"),
    "matrix multiplies": ("mm", "addmm", "bmm"),
    "attention": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
}
CLASS_OF_OP = {op: op_class for op_class, ops in FLOP_OPS.items() for op in ops}

Batch = tuple[torch.Tensor, TextEmbedding]  # latents in the diffusion model's space (B, C, h, w), context
BatchSource = Callable[[], Batch]
ModelCall = Callable[..., torch.Tensor]  # (noisy, t, hidden_states, mask) -> prediction, as UNet.forward

# FlopCounterMode knows the CUDA attention kernels only; on a CPU scaled_dot_product_attention runs these.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad_out, query, key, value
        )
    ),
}


# ---- the two batch sources -----------------------------------------------------------------------------


def cache_batches(
    cache: LatentCache, text: TextTable, batch_size: int, caption_dropout: float, seed: int
) -> BatchSource:
    """Batches as `train_unet` reads them: cache rows, a fresh posterior sample, cached captions (some dropped)."""
    order = CacheOrder(cache, batch_size, seed)
    generator = torch.Generator().manual_seed(seed)

    def next_batch() -> Batch:
        batch = order.next_batch()
        latents = cache.sample(batch.mean, batch.logvar, generator)
        dropped = torch.rand(len(batch), generator=generator) < caption_dropout
        return latents, text.lookup(torch.where(dropped, text.empty_index, batch.text_index))

    return next_batch


def planned_rows(
    cache: LatentCache, images: IngestedImages, batch_size: int, seed: int, steps: int
) -> list[tuple[list[int], list[str]]]:
    """The (ingested image indices, captions) of the first `steps` batches that cache_batches(seed) yields.

    Drawn before timing, so the on-the-fly source's time is its own work only, not a read of the cache.
    """
    first_row_of = {}
    for index, image_id in enumerate(images.ids):
        first_row_of.setdefault(image_id, index)  # an image's rows (one per caption) share its PNG
    order = CacheOrder(cache, batch_size, seed)
    plan = []
    for _ in range(steps):
        batch = order.next_batch()
        missing = [image_id for image_id in batch.id if image_id not in first_row_of]
        if missing:
            raise InputError(
                f"image {missing[0]} of the latent cache is not among the ingested train images: the cache is "
                "older than the ingested data; rebuild it with `dvc repro cache_latents`"
            )
        plan.append(([first_row_of[image_id] for image_id in batch.id], batch.caption))
    return plan


def encoded_batches(
    plan: list[tuple[list[int], list[str]]],
    images: IngestedImages,
    vae: VAE,
    text_encoder: TextEncoder,
    caption_dropout: float,
    seed: int,
) -> BatchSource:
    """The planned rows as a trainer without the cache makes them: decode the PNGs, run the VAE and the text encoder."""
    rows = itertools.cycle(plan)
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def next_batch() -> Batch:
        indices, captions = next(rows)
        pixels = torch.stack([images[i] for i in indices])
        latents = vae.scale_latents(vae.encode(pixels).sample(generator))  # as the cache's rows are scaled
        dropped = (torch.rand(len(captions), generator=generator) < caption_dropout).tolist()
        return latents, text_encoder.encode(["" if drop else caption for caption, drop in zip(captions, dropped)])

    return next_batch


# ---- the two models and the one training step ----------------------------------------------------------


def diffusers_call(unet: UNet2DConditionModel) -> ModelCall:
    """diffusers' UNet called as `denoising_loss` calls ours: (noisy, t, hidden_states, mask) -> prediction."""

    def call(noisy: torch.Tensor, t: torch.Tensor, hidden_states: torch.Tensor, mask: torch.Tensor | None):
        return unet(noisy, t, hidden_states, encoder_attention_mask=mask).sample

    return call


def padded_call(call: ModelCall, length: int) -> ModelCall:
    """`call` with every batch's captions padded to `length` tokens (masked), so torch.compile sees one shape."""

    def padded(noisy: torch.Tensor, t: torch.Tensor, hidden_states: torch.Tensor, mask: torch.Tensor | None):
        pad = length - hidden_states.shape[1]
        return call(noisy, t, F.pad(hidden_states, (0, 0, 0, pad)), F.pad(mask, (0, pad)))

    return padded


def longest_caption(text: TextTable) -> int:
    """The most tokens of any caption in the cache's text table."""
    return int(pq.read_table(text.path, columns=["length"]).column("length").to_numpy().max())


def diffusers_twin(unet: UNet) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel holding our UNet's weights (strict load: every parameter is carried)."""
    config, state = to_diffusers(unet)
    twin = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    twin.load_state_dict(state)
    return twin.train()


@dataclass(frozen=True)
class Trainee:
    """A model being trained: how to call it, its optimizer, and the generator of its timesteps and noise."""

    call: ModelCall
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def make_trainee(model: torch.nn.Module, call: ModelCall, hp: TrainUNetParams, seed: int) -> Trainee:
    parameters = list(model.parameters())
    optimizer = adamw(parameters, hp.lr, hp.weight_decay)  # as train_unet builds it
    return Trainee(call, parameters, optimizer, torch.Generator().manual_seed(seed))


def diffusion_loss(
    call: ModelCall, generator: torch.Generator, batch: Batch, schedule: NoiseSchedule, hp: TrainUNetParams
) -> torch.Tensor:
    """`train_unet`'s micro-batch loss for a batch of latents and contexts; timesteps and noise from `generator`."""
    latents, context = batch
    b = len(latents)
    t = torch.randint(schedule.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    if hp.noise_offset:
        noise = noise + hp.noise_offset * torch.randn(b, latents.shape[1], 1, 1, generator=generator)
    return denoising_loss(call, schedule, latents, noise, t, context, hp.min_snr_gamma, torch.device("cpu"))


def training_step(trainee: Trainee, next_batch: BatchSource, schedule: NoiseSchedule, hp: TrainUNetParams) -> None:
    trainee.optimizer.zero_grad(set_to_none=True)
    diffusion_loss(trainee.call, trainee.generator, next_batch(), schedule, hp).backward()
    torch.nn.utils.clip_grad_norm_(trainee.parameters, hp.grad_clip)
    trainee.optimizer.step()


def ours_vs_diffusers(
    ours: UNet, theirs: UNet2DConditionModel, batch: Batch, schedule: NoiseSchedule, hp: TrainUNetParams, seed: int
) -> tuple[float, float, float]:
    """One loss and its gradients from each model on the same batch, timesteps and noise.

    Returns the two losses and the largest gradient difference relative to the largest gradient, over all
    parameters (ours read under diffusers' names, fused projections split).
    """
    losses = []
    for model, call in ((ours, ours), (theirs, diffusers_call(theirs))):
        loss = diffusion_loss(call, torch.Generator().manual_seed(seed), batch, schedule, hp)
        loss.backward()
        losses.append(loss.item())
    # A model whose weights are our gradients, so that to_diffusers renames and splits them as it does weights.
    ours_grads = UNet.from_state_dict(ours.config, {n: p.grad for n, p in ours.named_parameters()}, "gradients")
    ours_by_name = to_diffusers(ours_grads)[1]
    theirs_by_name = {name: p.grad for name, p in theirs.named_parameters()}
    largest_diff = max((ours_by_name[name] - grad).abs().max().item() for name, grad in theirs_by_name.items())
    largest = max(grad.abs().max().item() for grad in theirs_by_name.values())
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    return losses[0], losses[1], largest_diff / largest


def step_breakdown(step: Callable[[], None]) -> dict[str | None, tuple[float, int]]:
    """Seconds per step and FLOPs per step of each FLOP_OPS class (None: every other op), from a profile of
    PROFILED_STEPS steps; times are the ops' own (self) CPU time."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    flops: dict[str | None, int] = {}
    for op, count in counter.get_flop_counts()["Global"].items():  # op: aten.mm, ...
        op_class = CLASS_OF_OP.get(str(op).removeprefix("aten."))
        flops[op_class] = flops.get(op_class, 0) + count
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(PROFILED_STEPS):
            step()
    seconds: dict[str | None, float] = {}
    for event in profiled.key_averages():
        op_class = CLASS_OF_OP.get(event.key.removeprefix("aten::"))  # key: aten::mm, ...
        seconds[op_class] = seconds.get(op_class, 0.0) + event.self_cpu_time_total / 1e6 / PROFILED_STEPS
    return {op_class: (seconds.get(op_class, 0.0), flops.get(op_class, 0)) for op_class in (*FLOP_OPS, None)}


# ---- the run ---------------------------------------------------------------------------------------------


def run(params: Params, batch_size: int, repeats: int, compile: bool) -> None:
    hp = params.train_unet
    cache, vae = open_inputs(params)
    vae.eval().requires_grad_(False)
    config = unet_config(params, cache)
    schedule = NoiseSchedule(**hp.schedule.model_dump())
    text = cache.open_text(cache_groups=None)  # as train_unet keeps every caption group decoded
    images = IngestedImages(params.paths.ingested, "train")
    text_encoder = TextEncoder.from_pretrained(params.text_encoder.name, max_length=params.text_encoder.max_length)
    seed = params.seed

    def from_cache() -> BatchSource:  # every one yields the same rows, dropouts and posterior samples
        return cache_batches(cache, text, batch_size, hp.caption_dropout, seed)

    def step_of(model: torch.nn.Module, call: ModelCall, source: BatchSource) -> Callable[[], None]:
        return partial(training_step, make_trainee(model, call, hp, seed), source, schedule, hp)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # train_unet's initial weights
        ours = UNet(config).train()
    theirs = diffusers_twin(ours)
    ours_on_the_fly = copy.deepcopy(ours)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {list(config.block_out_channels)} "
        f"({ours.num_parameters() / 1e6:.2f}M parameters) on {tuple(cache.latent_shape)} latents, batch {batch_size}, "
        f"AdamW, grad clip {hp.grad_clip}, {hp.schedule.prediction_type}, caption dropout {hp.caption_dropout}"
    )
    ours_loss, theirs_loss, grad_diff = ours_vs_diffusers(ours, theirs, from_cache()(), schedule, hp, seed)
    print(
        f"same weights and batch: loss ours {ours_loss:.6f}, diffusers {theirs_loss:.6f} "
        f"(rel. diff {abs(ours_loss - theirs_loss) / abs(theirs_loss):.1e}); gradients rel. diff {grad_diff:.1e}"
    )

    # Counted and profiled on a copy of its own: the counter's and the profiler's dispatch would slow a timed
    # step, and the variants below all start from the initial weights and the first batch.
    counted = copy.deepcopy(ours)
    breakdown = step_breakdown(step_of(counted, counted, from_cache()))
    flops = sum(class_flops for _, class_flops in breakdown.values())

    plan = planned_rows(cache, images, batch_size, seed, WARMUP_STEPS + repeats)
    on_the_fly = encoded_batches(plan, images, vae, text_encoder, hp.caption_dropout, seed)
    steps = {
        "ours, from the cache": step_of(ours, ours, from_cache()),
        "ours, encoding on the fly": step_of(ours_on_the_fly, ours_on_the_fly, on_the_fly),
        "diffusers, from the cache": step_of(theirs, diffusers_call(theirs), from_cache()),
    }
    if compile:
        length = longest_caption(text)
        for name, model, call in (("ours", ours, lambda m: m), ("diffusers", theirs, diffusers_call)):
            twin = copy.deepcopy(model)
            step = step_of(twin, padded_call(call(torch.compile(twin, dynamic=False)), length), from_cache())
            start = time.perf_counter()
            step()
            print(f"torch.compile of {name}' UNet, its first step: {time.perf_counter() - start:.1f} s")
            steps[f"{name}, compiled, from the cache"] = step

    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    product = torch.empty(MATMUL_SIZE, MATMUL_SIZE)
    matmul = f"fp32 matmul {MATMUL_SIZE}^3"
    medians = interleaved_medians({**steps, matmul: lambda: torch.mm(a, b, out=product)}, repeats, WARMUP_STEPS)

    print(f"medians of {repeats} interleaved steps each, after {WARMUP_STEPS} warm-up steps:")
    for name in steps:
        print(f"    {name:35s} {medians[name] * 1e3:8.1f} ms/step  {batch_size / medians[name]:7.0f} samples/s")
    cached_s, on_the_fly_s, diffusers_s = (medians[name] for name in list(steps)[:3])
    print(f"    cache / on the fly:  {on_the_fly_s / cached_s:5.2f}x faster from the cache (target >= 3x)")
    print(f"    ours / diffusers:    {diffusers_s / cached_s:5.2f}x faster than diffusers (target >= 1.2x)")
    if compile:
        ours_compiled = medians["ours, compiled, from the cache"]
        theirs_compiled = medians["diffusers, compiled, from the cache"]
        print(
            f"    compiled:            ours {cached_s / ours_compiled:.2f}x and diffusers "
            f"{diffusers_s / theirs_compiled:.2f}x their eager step; ours / diffusers compiled "
            f"{theirs_compiled / ours_compiled:.2f}x"
        )
    peak = 2 * MATMUL_SIZE**3 / medians[matmul]
    achieved = flops / cached_s
    print(
        f"FLOPs of one step of ours, from the cache (forward + backward): {flops / 1e9:.2f} GFLOP -> "
        f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of this machine's fp32 matmul peak "
        f"({peak / 1e9:.1f} GFLOP/s, {matmul}: {medians[matmul] * 1e3:.1f} ms)"
    )
    profiled_s = sum(seconds for seconds, _ in breakdown.values())
    print(f"where a step of ours goes (profiled over {PROFILED_STEPS} steps: {profiled_s * 1e3:.0f} ms per step):")
    for op_class, (seconds, class_flops) in breakdown.items():
        rate = class_flops / seconds
        rate_note = f"{rate / 1e9:6.1f} GFLOP/s = {rate / peak:4.0%} of peak" if class_flops else ""
        share = seconds / profiled_s
        print(f"    {op_class or 'every other op':18s} {seconds * 1e3:6.1f} ms {share:4.0%}  {rate_note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the params file (paths and the train_unet section)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median reported)")
    parser.add_argument("--batch-size", type=int, help="rows per step (default: params' train_unet.batch_size)")
    parser.add_argument("--compile", action="store_true", help="also time both UNets under torch.compile")
    args = parser.parse_args()
    try:
        params = load_params(args.params)
        run(params, args.batch_size or params.train_unet.batch_size, args.repeats, args.compile)
    except (ParamsError, InputError, IngestedDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
