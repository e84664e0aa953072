"""Fine-tuning a LoRA on a frozen UNet: teaching it a concept from a handful of captioned latents.

Each step, for a batch of rows of the (small) training set, the denoising objective of the UNet's own
training (`ldm.training.denoising`: min-SNR weighting and noise offset included) on the row's clean latents
and caption, with gradients only for the LoRA matrices (`ldm.models.lora.add_lora`). The loop is the engine's
(`ldm.training.engine`). Batches come from a fresh seeded permutation each epoch. Checkpoints hold what a
bit-for-bit resume needs and nothing of the base: the LoRA weights (and their EMA), optimizer, LR schedule,
generator states and the data position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ldm.data.order import EpochOrder
from ldm.diffusion.schedule import Schedule
from ldm.errors import InputError
from ldm.models.lora import add_lora
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet
from ldm.training.checkpoint import run_fingerprint, tensors_digest
from ldm.training.denoising import DenoisingConfig, denoising_loss, draw_noise
from ldm.training.engine import StepCallback, train, trajectory

logger = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class LoraTrainingConfig(DenoisingConfig):
    """The LoRA fine-tuning hyperparameters."""

    rank: int
    alpha: float  # the update is scaled by alpha / rank
    dropout: float  # on the LoRA branch's input
    batch_size: int  # rows per micro-batch


class LoraTrainingResult(NamedTuple):
    unet: UNet  # the base UNet carrying the trained adapter "default", eval mode, on the training device
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, lr (kept across resumes)


def _check_inputs(unet: UNet, latents: torch.Tensor, contexts: TextEmbedding, empty_context: TextEmbedding) -> None:
    config = unet.config
    if latents.ndim != 4 or latents.shape[1] != config.in_channels:
        raise InputError(
            f"latents have shape {tuple(latents.shape)}; the UNet takes (N, {config.in_channels}, h, w) latents"
        )
    if len(contexts) != len(latents):
        raise InputError(f"{len(latents)} latents but {len(contexts)} text embeddings; pass one caption per latent")
    if len(empty_context) != 1:
        raise InputError(f"empty_context holds {len(empty_context)} prompts; pass the empty prompt's embedding alone")
    for name, embedding in (("contexts", contexts), ("empty_context", empty_context)):
        width = embedding.hidden_states.shape[-1]
        if width != config.cross_attention_dim:
            raise InputError(
                f"{name} are {width} wide but the UNet cross-attends to {config.cross_attention_dim}; encode the "
                f"captions with the text encoder the UNet was trained with"
            )


def finetune_lora(
    unet: UNet,
    latents: torch.Tensor,
    contexts: TextEmbedding,
    empty_context: TextEmbedding,
    schedule: Schedule,
    hp: LoraTrainingConfig,
    checkpoint_dir: str | Path,
    seed: int,
    device: str | torch.device,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = logger.info,
) -> LoraTrainingResult:
    """Train a LoRA (adapter "default") on the frozen base `unet`, resuming from the newest checkpoint of the run.

    latents: (N, C, h, w) clean latents, already scaled into diffusion space; contexts: N rows, one caption per
    latent; empty_context: 1 row, the empty prompt (caption dropout's target). `unet` is adapted in place and
    must carry no adapter yet; a resumed session passes the same base weights again.

    `on_step(step, max_steps, {"loss", "lr"})` is called every `log_every` steps (and at the last) with the means
    since the previous call, after any checkpoint of that step is written. Metrics: train_loss_final, steps,
    samples_per_second and train_seconds (the loop alone, over all sessions of a resumed run),
    trainable_parameters.
    """
    device = torch.device(device)
    _check_inputs(unet, latents, contexts, empty_context)
    fingerprint = run_fingerprint(
        unet=unet.config.model_dump(mode="json"),
        base=tensors_digest(unet.state_dict().items()),
        schedule=schedule.to_dict(),
        training=trajectory(hp),
        seed=seed,
        data=tensors_digest([("latents", latents), ("contexts", contexts.hidden_states),
                      ("mask", contexts.attention_mask), ("empty", empty_context.hidden_states)]),
    )
    # Batches are assembled and noised on the CPU (where the generators are), then moved to `device`.
    latents = latents.detach().cpu()
    # One table with the empty prompt as its last row, so caption dropout is an index swap.
    text = TextEmbedding.cat([contexts, empty_context]).to("cpu")
    empty_index = len(contexts)

    # The global RNG draws A (on the CPU, whatever the device) and, while training, LoRA dropout's masks: seeded
    # here and restored from a checkpoint on resume, so a run is reproducible; the caller's RNG state is kept.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        params = add_lora(unet, hp.rank, hp.alpha, hp.dropout)
        unet.to(device).train()
        data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        data_generator = torch.Generator().manual_seed(data_seed)
        noise_generator = torch.Generator().manual_seed(noise_seed)
        order = EpochOrder(len(latents), hp.batch_size, data_generator)
        # The LoRA matrices alone train and are checkpointed: the base is the caller's, identified by the fingerprint.
        adapter = nn.ParameterList(params)

        def micro_batch(net: nn.Module) -> tuple[torch.Tensor, list[str]]:
            rows = torch.tensor(order.next_batch())
            clean = latents[rows]  # (B, C, h, w)
            b = len(rows)
            dropped = torch.rand(b, generator=noise_generator) < hp.caption_dropout
            context = text[torch.where(dropped, empty_index, rows)]
            t = schedule.draw_timesteps(b, noise_generator, tuple(clean.shape[-2:]))
            noise = draw_noise(tuple(clean.shape), hp.noise_offset, noise_generator)
            loss = denoising_loss(net, schedule, clean, noise, t, context, hp.min_snr_gamma, device)
            # Indices into `latents`: the inputs have no ids of their own.
            return loss.reshape(1), [str(r) for r in rows.tolist()]

        trained = train(
            "LoRA", unet, micro_batch, order, hp, checkpoint_dir, fingerprint, device, trainable=adapter,
            generators={"data": data_generator, "noise": noise_generator}, log=log, on_step=on_step,
        )
    if trained.ema is not None:  # the EMA of the matrices is the adapter
        with torch.no_grad():
            for param, averaged in zip(params, trained.ema.module):
                param.copy_(averaged)

    metrics = {
        **trained.metrics(hp.max_steps, hp.batch_size * hp.grad_accumulation),
        "trainable_parameters": float(sum(p.numel() for p in params)),
    }
    return LoraTrainingResult(unet.eval(), metrics, trained.history)
