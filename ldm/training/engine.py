"""The training loop, one for every model here (the VAE, the UNet, a LoRA, a ControlNet).

A training supplies its model, its batch order and its loss (`micro_batch`); `train` runs this, visible in
one place as nanoGPT's train.py has it:

    for step in range(start + 1, max_steps + 1):
        for each of hp.grad_accumulation micro-batches:      (under DDP, gradients sync on the last one only)
            with autocast(hp.precision):
                terms, rows = micro_batch(net)                 terms[0] is the loss; the rest are logged beside it
            backward(terms[0] / hp.grad_accumulation)
        grad_norm = clip_grad_norm_(parameters, hp.grad_clip)
        ok = the step's loss and gradient norm are finite     (a tensor on the device: no wait for the host)
        optimizer.step(), skipped on the device when not ok   (fused AdamW's found_inf)
        ema.update(), skipped on the device when not ok
        lr_schedule.step()
        at a logging step, a checkpoint step or the last:    (the step's one wait for the device)
            each non-finite step since the last check is skipped (counted) or stops the run
            the loss means since the last logged row; a checkpoint when due or after a stop signal
        validate(step) every validate_every steps and at the last (before that step's checkpoint, which
        keeps what it measured)

fp16 scales the loss (`torch.amp.GradScaler`, whose state the checkpoints keep): an overflowing gradient
then skips the step without counting as a non-finite loss. bf16 needs no scaler.

`max_steps` is outside a run's fingerprint: raised, it extends a finished or interrupted run from its newest
checkpoint. The learning-rate schedule is then the one of the new length, taken up at the checkpoint's step
(the cosine of a longer run is higher there, so the rate rises again and decays to zero at the new end); a
run extended so is not the run that had the longer max_steps from the start. Lowered below the checkpoint's
step, it stops with an error rather than discard the checkpoints.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from ldm.errors import InputError
from ldm.training.checkpoint import ResumableRun, TrainingState
from ldm.training.distributed import SINGLE_PROCESS, DataParallel
from ldm.training.loss_history import LossHistory
from ldm.training.optim import adamw, warmup_cosine

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# One micro-batch: its loss terms (the loss first), stacked (K,), and the ids of its rows.
MicroBatch = Callable[[nn.Module], tuple[torch.Tensor, Sequence[str]]]
StepCallback = Callable[[int, int, dict[str, float]], None]


# Fields that change neither the weights reached at a step nor the data seen: a run may resume across them.
# max_steps changes the schedule ahead, not the steps taken: a run resumes across it (module docstring).
BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "nonfinite_skips", "log_every", "max_steps")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The hyperparameters the engine reads; each training's config adds its own (the params schema's
    training sections hold their defaults)."""

    max_steps: int  # optimizer steps
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float  # max global gradient norm
    grad_accumulation: int = 1  # micro-batches per optimizer step
    ema_decay: float | None = None  # None: no EMA
    precision: str = "fp32"  # a key of PRECISIONS: the autocast dtype of the forward passes
    checkpoint_every: int
    keep_checkpoints: int
    nonfinite_skips: int = 0  # steps with a NaN/inf loss or gradient to skip (counted) before stopping
    log_every: int


def trajectory(hp: TrainingConfig, bookkeeping: tuple[str, ...] = ()) -> dict:
    """The hyperparameters that decide a run's weights, for its fingerprint: all but the BOOKKEEPING ones
    (and the training's own `bookkeeping`), so a run resumes across a change of those."""
    return {k: v for k, v in asdict(hp).items() if k not in BOOKKEEPING + bookkeeping}


@dataclass
class Trained:
    """What a run of the engine leaves: the EMA (None without one), the logged rows of the whole run, the
    steps skipped as non-finite, the loop's time over every session, and what each validation returned
    ({"step": step, **values}, the last one after the last step)."""

    ema: AveragedModel | None
    history: list[dict[str, float]]
    skipped: list[dict]
    train_seconds: float
    validations: list[dict[str, float]]

    def metrics(self, max_steps: int, rows_per_step: int) -> dict[str, float]:
        """The loop's own numbers, which every training reports: the last logged loss, the steps, the rows
        trained per second and the seconds, both over the whole run (a session that resumes at the last step
        trains none), and the steps skipped as non-finite."""
        return {
            "train_loss_final": self.history[-1]["loss"] if self.history else float("nan"),
            "steps": float(max_steps),
            "samples_per_second": max_steps * rows_per_step / self.train_seconds,
            "train_seconds": self.train_seconds,
            "skipped_steps": float(len(self.skipped)),
        }


def check_precision(precision: str, device: torch.device) -> None:
    """InputError unless `device` can autocast to `precision`."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r} is unknown; use one of {list(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"{device} has no bfloat16 support; use precision fp16 (with loss scaling) or fp32")


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module, decay: float, ok: torch.Tensor) -> None:
    """`ema` <- lerp(ema, model, 1 - decay), the first update copying `model`; nothing where `ok` (a 0-dim
    bool tensor) is False. The same arithmetic as AveragedModel with get_ema_multi_avg_fn, decided on the
    device instead of the host."""
    averaged = [p.detach() for p in itertools.chain(ema.module.parameters(), ema.module.buffers())]
    current = [p.detach() for p in itertools.chain(model.parameters(), model.buffers())]
    # Weight 1 on the first update is a copy: lerp computes end - (end - start) * 0 there.
    weight = torch.where(ema.n_averaged == 0, 1.0, 1.0 - decay).to(ok.device) * ok
    torch._foreach_lerp_(averaged, current, weight)
    ema.n_averaged += ok.to(ema.n_averaged.device, torch.long)


def train(
    what: str,
    model: nn.Module,
    micro_batch: MicroBatch,
    data,
    hp: TrainingConfig,
    checkpoint_dir: str | Path,
    fingerprint: str,
    device: torch.device,
    *,
    terms: tuple[str, ...] = ("loss",),
    trainable: nn.Module | None = None,
    generators: dict[str, torch.Generator] | None = None,
    ranks: DataParallel = SINGLE_PROCESS,
    log: Callable[[str], None] = logger.info,
    on_step: StepCallback | None = None,
    validate: Callable[[int, nn.Module], dict[str, float] | None] | None = None,
    validate_every: int | None = None,
) -> Trained:
    """Train `model` (in train mode, on `device`) with the loop of the module docstring, resuming from the
    newest checkpoint of the same run (`fingerprint`) in `checkpoint_dir`.

    `micro_batch(net)` draws the next micro-batch from `data` (the batch order, kept in checkpoints) and
    returns its loss terms, named by `terms`, and its row ids; `net` is `model`, or its DDP wrapper in a
    data-parallel run. `trainable` holds exactly the parameters that train (default: `model`); the optimizer,
    the EMA and the checkpoints hold it, with `generators` (the training's random streams).
    `on_step(step, max_steps, {term: mean, ..., "lr"})` is called on rank 0 at each logged row, after any
    checkpoint of that step is written; `validate(step, model)` every `validate_every` steps and at the end,
    with the model to judge: the EMA's copy, or the trained module without an EMA. What it returns is kept
    (in the checkpoints too) and returned in `Trained.validations`.
    """
    check_precision(hp.precision, device)
    trainable = model if trainable is None else trainable
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    net = ranks.wrap(model)
    optimizer = adamw(parameters, hp.lr, hp.weight_decay)
    lr_schedule = warmup_cosine(optimizer, hp.warmup_steps, hp.max_steps)
    scaler = torch.amp.GradScaler(device.type) if hp.precision == "fp16" else None
    ema = None if hp.ema_decay is None else AveragedModel(trainable, use_buffers=True)
    state = TrainingState(
        modules={"model": trainable} | ({"ema": ema} if ema is not None else {}),
        optimizers={"optimizer": optimizer},
        schedulers={"lr": lr_schedule} | ({"grad_scaler": scaler} if scaler is not None else {}),
        generators=generators or {},
    )
    run = ResumableRun(checkpoint_dir, fingerprint, state, data, hp, what, log, ranks)
    if run.start:
        # The optimizer holds the rate its checkpoint's schedule set for the next step; under a changed
        # max_steps the schedule differs from here on (without a change this sets the same value).
        for group, base, factor in zip(optimizer.param_groups, lr_schedule.base_lrs, lr_schedule.lr_lambdas):
            group["lr"] = base * factor(lr_schedule.last_epoch)
    judged = trainable if ema is None else ema.module
    losses = LossHistory(terms, hp.log_every, hp.max_steps, device, run.history)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[hp.precision], enabled=hp.precision != "fp32")
    # Steps whose flags the host has not read yet: (step, [loss, grad norm, loss finite, update applied], rows).
    unchecked: list[tuple[int, torch.Tensor, list[str]]] = []

    with run.session():
        for step in range(run.start + 1, hp.max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            step_terms = torch.zeros(len(terms), device=device)
            rows: list[str] = []
            for micro in range(hp.grad_accumulation):
                last = micro == hp.grad_accumulation - 1
                # DDP all-reduces gradients in backward: once per step, on the last micro-batch.
                with net.no_sync() if isinstance(net, DistributedDataParallel) and not last else nullcontext():
                    with autocast:
                        values, ids = micro_batch(net)
                    loss = values[0].float() / hp.grad_accumulation
                    (loss if scaler is None else scaler.scale(loss)).backward()
                step_terms += values.detach().float() / hp.grad_accumulation
                rows.extend(ids)
            step_terms = ranks.mean(step_terms)  # over all ranks in one all-reduce: they skip or stop together
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, hp.grad_clip)
            loss_ok = torch.isfinite(step_terms[0])
            ok = loss_ok & torch.isfinite(grad_norm)
            if scaler is None:
                optimizer.found_inf, optimizer.grad_scale = (~ok).float(), None
                optimizer.step()
            else:
                # An overflow (finite loss, infinite gradients) is the scaler's to skip, and lowers its scale.
                scaler.step(optimizer)
                scaler.update()
            if ema is not None:
                update_ema(ema, trainable, hp.ema_decay, ok)
            lr = optimizer.param_groups[0]["lr"]
            losses.add(step_terms, ok)
            lr_schedule.step()
            unchecked.append((step, torch.stack([step_terms[0], grad_norm.float(), loss_ok, ok]).float(), rows))
            row = None
            if step % hp.log_every == 0 or step == hp.max_steps:
                row = losses.row(step, lr, _settle(run, unchecked, fp16=scaler is not None))
            if validate is not None and (validate_every and step % validate_every == 0 or step == hp.max_steps):
                _record_validation(run, step, validate(step, judged))
            run.end_step(step, before_save=lambda: _settle(run, unchecked, fp16=scaler is not None))
            if row is not None and on_step is not None and ranks.is_main:
                on_step(step, hp.max_steps, LossHistory.values(row))
    train_seconds = run.train_seconds()
    if validate is not None and run.start == hp.max_steps:
        # Resumed at the end, the loop ran no step; the caller still gets the final validation's pictures.
        _record_validation(run, hp.max_steps, validate(hp.max_steps, judged))
    return Trained(ema, run.history, run.skipped, train_seconds, run.validations)


def _record_validation(run: ResumableRun, step: int, values: dict[str, float] | None) -> None:
    """Keep what a validation measured; a step validated again (the end, after a resume there) keeps its last."""
    if values:
        run.validations[:] = [v for v in run.validations if v["step"] != step] + [{"step": step, **values}]


def _settle(run: ResumableRun, unchecked: list[tuple[int, torch.Tensor, list[str]]], fp16: bool) -> bool:
    """Judge the steps since the last check, in order, now that their flags come to the host (the wait for
    the device): each non-finite one is skipped while the run has skips left, or stops it
    (`ResumableRun.nonfinite`). Under fp16 only a non-finite loss counts: infinite gradients with a finite
    loss are an overflow, which the loss scaler skips. Returns whether the newest step's update was applied."""
    if not unchecked:
        return True
    flags = torch.stack([values for _, values, _ in unchecked]).tolist()
    for (step, _, rows), (loss, norm, loss_ok, ok) in zip(unchecked, flags):
        if not (loss_ok if fp16 else ok):
            run.nonfinite(step, loss, norm, rows)
    unchecked.clear()
    return bool(flags[-1][3])
