"""Fine-tuning a LoRA on a frozen UNet: teaching it a concept from a handful of captioned latents.

Each step, for a batch of rows of the (small) training set:

    t       ~ U{0, T-1};  noise ~ N(0, I)
    z_t     = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * noise          z0: the clean latents, diffusion space
    context = the row's text embedding, or the empty prompt's with probability caption_dropout
    loss    = mean((unet(z_t, t, context) - target)^2)                 target: as the schedule predicts

the same loss as `ldm.training.unet`, with gradients only for the LoRA matrices (`ldm.models.lora.add_lora`). AdamW
with linear warmup and cosine decay, gradient-norm clipping. Batches come from a fresh seeded permutation
each epoch. Checkpoints hold what a bit-for-bit resume needs and nothing of the base: the LoRA weights,
optimizer, LR schedule, generator states and the data position.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.order import EpochOrder
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.lora import add_lora
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet
from ldm.training.checkpoint import ResumableRun, TrainingState, run_fingerprint
from ldm.training.loss_history import LossHistory
from ldm.training.optim import adamw, warmup_cosine

logger = logging.getLogger(__name__)

# Fields that change neither the weights reached at a step nor the data seen: a run may resume across them.
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "nonfinite_skips", "log_every")

StepCallback = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True, kw_only=True)
class LoraTrainingConfig:
    """The LoRA fine-tuning hyperparameters."""

    rank: int
    alpha: float  # the update is scaled by alpha / rank
    dropout: float  # on the LoRA branch's input
    batch_size: int
    max_steps: int  # optimizer steps
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float  # max global gradient norm
    caption_dropout: float  # probability of training a row on the empty prompt
    checkpoint_every: int
    keep_checkpoints: int
    nonfinite_skips: int = 0  # steps with a NaN/inf loss or gradient to skip (counted) before stopping
    log_every: int


class LoraTrainingResult(NamedTuple):
    unet: UNet  # the base UNet carrying the trained adapter "default", eval mode, on the training device
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per logged step: step, loss, lr (kept across resumes)


def _digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and bytes: the identity of a base model or a training set."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_inputs(unet: UNet, latents: torch.Tensor, contexts: TextEmbedding, empty_context: TextEmbedding) -> None:
    config = unet.config
    if latents.ndim != 4 or latents.shape[1] != config.in_channels:
        raise ValueError(
            f"latents have shape {tuple(latents.shape)}; the UNet takes (N, {config.in_channels}, h, w) latents"
        )
    if len(contexts) != len(latents):
        raise ValueError(f"{len(latents)} latents but {len(contexts)} text embeddings; pass one caption per latent")
    if len(empty_context) != 1:
        raise ValueError(f"empty_context holds {len(empty_context)} prompts; pass the empty prompt's embedding alone")
    for name, embedding in (("contexts", contexts), ("empty_context", empty_context)):
        width = embedding.hidden_states.shape[-1]
        if width != config.cross_attention_dim:
            raise ValueError(
                f"{name} are {width} wide but the UNet cross-attends to {config.cross_attention_dim}; encode the "
                f"captions with the text encoder the UNet was trained with"
            )


def finetune_lora(
    unet: UNet,
    latents: torch.Tensor,
    contexts: TextEmbedding,
    empty_context: TextEmbedding,
    schedule: NoiseSchedule,
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
        base=_digest(unet.state_dict().items()),
        schedule=schedule.to_dict(),
        training={k: v for k, v in asdict(hp).items() if k not in _BOOKKEEPING},
        seed=seed,
        data=_digest([("latents", latents), ("contexts", contexts.hidden_states),
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
        optimizer = adamw(params, hp.lr, hp.weight_decay)
        lr_schedule = warmup_cosine(optimizer, hp.warmup_steps, hp.max_steps)
        data_seed, noise_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        data_generator = torch.Generator().manual_seed(data_seed)
        noise_generator = torch.Generator().manual_seed(noise_seed)
        order = EpochOrder(len(latents), hp.batch_size, data_generator)
        state = TrainingState(
            # The LoRA matrices alone: the base is the caller's and is identified by the fingerprint.
            modules={"lora": nn.ParameterList(params)},
            optimizers={"optimizer": optimizer},
            schedulers={"lr": lr_schedule},
            generators={"data": data_generator, "noise": noise_generator},
        )
        run = ResumableRun(checkpoint_dir, fingerprint, state, order, hp, "LoRA", log)

        step_rows: list[str] = []  # indices into `latents`: the inputs have no ids of their own

        def batch_loss() -> torch.Tensor:
            rows = torch.tensor(order.next_batch())
            step_rows[:] = [str(r) for r in rows.tolist()]
            clean = latents[rows]  # (B, C, h, w)
            b = len(rows)
            dropped = torch.rand(b, generator=noise_generator) < hp.caption_dropout
            context = text[torch.where(dropped, empty_index, rows)].to(device)
            t = torch.randint(schedule.num_train_timesteps, (b,), generator=noise_generator)
            noise = torch.randn(clean.shape, generator=noise_generator)
            noisy = schedule.add_noise(clean, noise, t).to(device)
            target = schedule.training_target(clean, noise, t).to(device)
            mask = None if context.attention_mask.all() else context.attention_mask
            prediction = unet(noisy, t.to(device), context.hidden_states, mask)
            return F.mse_loss(prediction.float(), target)

        losses = LossHistory(("loss",), hp.log_every, hp.max_steps, device, run.history)
        with run.session():
            for step in range(run.start + 1, hp.max_steps + 1):
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss()
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
                row = None
                if run.finite(step, loss, grad_norm, step_rows):
                    lr = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    row = losses.add(step, loss.detach(), lr)
                lr_schedule.step()
                run.end_step(step)
                if row is not None and on_step is not None:
                    on_step(step, hp.max_steps, LossHistory.values(row))
        train_seconds = run.train_seconds()

    metrics = {
        "train_loss_final": run.history[-1]["loss"] if run.history else float("nan"),
        "steps": float(hp.max_steps),
        # Over the whole run, resumed sessions included: a session that resumes at the last step trains none.
        "samples_per_second": hp.max_steps * hp.batch_size / train_seconds,
        "train_seconds": train_seconds,
        "trainable_parameters": float(sum(p.numel() for p in params)),
    }
    return LoraTrainingResult(unet.eval(), metrics, run.history)
