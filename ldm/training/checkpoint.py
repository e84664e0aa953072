"""Resumable training checkpoints: one folder per step, one safetensors file and one JSON file, no pickle.

    step-000200/
      tensors.safetensors   every tensor: module weights (model, EMA), optimizer state, RNG states (uint8)
      state.json            everything else (step, optimizer hyperparameters, LR-schedule state, the caller's
                            `extra`, e.g. the data position), with each tensor's place marked by its name in
                            the tensors file, and the sha256 of that file

A checkpoint is written into a hidden temporary folder, state.json last, then renamed into place, so a
`step-*` folder is complete the moment it exists. `latest_checkpoint` still verifies the checksum: a disk
or a copy can lose bytes that a rename promised.

Loading restores the objects in place (module weights, optimizer and LR-schedule state, generator states,
and the global torch / CUDA / Python / NumPy RNGs), so a loop continued from a checkpoint takes the same
steps as one that was never stopped (same machine, same process layout).

A checkpoint never holds a NaN or an infinity: saving one raises NonFiniteError instead. `ResumableRun` adds
what a loop needs around that: SIGINT/SIGTERM end the run at a step boundary with a checkpoint, and a step
whose loss or gradient is not finite stops the run (or is skipped, when the run allows some skips).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ldm.errors import InputError
from ldm.models.modeling import check_finite, file_sha256
from ldm.training.distributed import SINGLE_PROCESS, DataParallel

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_NAME = "tensors.safetensors"
STATE_NAME = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Markers for what JSON cannot hold directly; no torch state dict uses these as keys.
_TENSOR, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__pairs__"


@dataclass
class TrainingState:
    """The live objects a checkpoint holds, by name: saving reads them, loading writes into them.

    The names are the checkpoint's keys, so a loop must use the same names when it saves and loads.
    """

    modules: Mapping[str, nn.Module]
    optimizers: Mapping[str, Optimizer] = field(default_factory=dict)
    schedulers: Mapping[str, LRScheduler] = field(default_factory=dict)
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    extra: dict[str, Any]  # what the caller passed to save_checkpoint, as JSON gave it back


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes: the identity of weights or of a training set, for a
    fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(**parts: Any) -> str:
    """A hash of everything that decides a run's trajectory (JSON-able parts), to tell its checkpoints apart."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict -> JSON, moving each tensor into `tensors` under its path (`name`/key/...)."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in value.items()}
        # Optimizer state is keyed by parameter index; JSON would turn those ints into strings.
        return {_PAIRS: [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{name} holds a {type(value).__name__}, which a checkpoint cannot store without pickle")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if _PAIRS in value:
            return {k: _decode(v, tensors) for k, v in value[_PAIRS]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _global_rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.view(np.uint8).copy()), position, has_gauss, cached_gauss],
    }


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    # On a machine with another GPU count the saved CUDA states do not fit: training continues, not bit for bit.
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().view(np.uint32), position, has_gauss, cached_gauss))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it replaces `path` whole, on failure it is removed.

    Readers see the old folder or the complete new one. (Between the two renames that swap an existing
    folder out, `path` is briefly absent; it never holds a mix.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            _fsync(child)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-*` folder, newest first; hidden temporary folders are not listed."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def checkpoint_folder(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:06d}"


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: TrainingState,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `directory/step-{step:06d}/` atomically; then keep only the newest `keep` (None: all) up to `step`.

    `extra` is JSON-able run state the objects do not hold (data position, run fingerprint, logged history).
    Folders of later steps than `step` are removed once this one is complete: the run went back past them
    (they were unusable, or another run's), and left there they would outrank this one. So are temporary
    folders that a killed save left behind.
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    objects = {
        "modules": {n: _encode(m.state_dict(), f"modules/{n}", tensors) for n, m in state.modules.items()},
        "optimizers": {n: _encode(o.state_dict(), f"optimizers/{n}", tensors) for n, o in state.optimizers.items()},
        "schedulers": {n: _encode(s.state_dict(), f"schedulers/{n}", tensors) for n, s in state.schedulers.items()},
        "generators": {n: _encode(g.get_state(), f"generators/{n}", tensors) for n, g in state.generators.items()},
        "rng": _encode(_global_rng_state(), "rng", tensors),
    }
    check_finite(tensors, f"the step-{step} checkpoint")
    final = checkpoint_folder(directory, step)
    with atomic_directory(final) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": str(FORMAT_VERSION)})
        record = {
            "format": FORMAT_VERSION,
            "step": step,
            "sha256": file_sha256(tmp / TENSORS_NAME),
            "extra": dict(extra or {}),
            **objects,
        }
        (tmp / STATE_NAME).write_text(json.dumps(record, indent=1) + "\n")
    found = _step_dirs(directory)
    earlier = [path for s, path in found if s <= step]
    for path in [path for s, path in found if s > step] + (earlier[keep:] if keep is not None else []):
        shutil.rmtree(path)
    _remove_leftovers(directory)
    return final


def _read_verified(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, after checking its tensors file against the recorded sha256."""
    state_file, tensors_file = path / STATE_NAME, path / TENSORS_NAME
    if not state_file.is_file():
        raise InputError(f"{path} has no {STATE_NAME}: it was not written completely")
    try:
        record = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{state_file} is not valid JSON ({e})") from None
    if record.get("format") != FORMAT_VERSION:
        raise InputError(f"{state_file} has format {record.get('format')!r}; this code reads format {FORMAT_VERSION}")
    if not tensors_file.is_file():
        raise InputError(f"{path} has no {TENSORS_NAME}")
    actual = file_sha256(tensors_file)
    recorded = str(record.get("sha256"))
    if actual != recorded:
        raise InputError(
            f"{tensors_file} is damaged: its sha256 is {actual[:12]}..., state.json recorded {recorded[:12]}..."
        )
    return record


def latest_checkpoint(directory: str | os.PathLike, log: Callable[[str], None] = logger.warning) -> Checkpoint | None:
    """The newest complete, undamaged checkpoint in `directory`, or None; each one passed over is logged with why."""
    for step, path in _step_dirs(Path(directory)):
        try:
            record = _read_verified(path)
        except ValueError as e:
            log(f"skipping checkpoint {path}: {e}")
            continue
        return Checkpoint(path=path, step=step, extra=record["extra"])
    return None


def _remove_leftovers(directory: Path) -> None:
    for leftover in directory.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_checkpoints(directory: str | os.PathLike) -> None:
    """Delete every checkpoint folder (and leftover temporary folder) in `directory`."""
    directory = Path(directory)
    for _, path in _step_dirs(directory):
        shutil.rmtree(path)
    _remove_leftovers(directory)


def resume_point(
    directory: str | os.PathLike, fingerprint: str, log: Callable[[str], None] = logger.info
) -> Checkpoint | None:
    """The newest usable checkpoint of the run identified by `fingerprint` (see `run_fingerprint`), or None.

    The fingerprint is read from `extra["fingerprint"]`. When the newest checkpoint belongs to a run with
    other params or data, every checkpoint in `directory` is removed: the fresh run must not resume from
    them, and its own checkpoints must not be pruned or outranked by theirs.
    """
    found = latest_checkpoint(directory, log)
    if found is None:
        return None
    if found.extra.get("fingerprint") != fingerprint:
        log(
            f"checkpoints in {directory} were made with other training params or data "
            f"(step {found.step}); removing them and training from scratch"
        )
        remove_checkpoints(directory)
        return None
    return found


def load_checkpoint(path: str | os.PathLike, state: TrainingState) -> Checkpoint:
    """Restore `state` (and the global RNGs) from a checkpoint folder in place; returns its step and extra."""
    path = Path(path)
    record = _read_verified(path)
    tensors = load_file(str(path / TENSORS_NAME))

    def restore(kind: str, targets: Mapping[str, Any]) -> dict[str, Any]:
        saved = record[kind]
        if set(saved) != set(targets):
            raise InputError(
                f"{path} holds {kind} {sorted(saved)} but the training loop passed {sorted(targets)}; "
                f"load it with the same names it was saved with"
            )
        return {name: _decode(saved[name], tensors) for name in targets}

    for name, value in restore("modules", state.modules).items():
        state.modules[name].load_state_dict(value)
    for name, value in restore("optimizers", state.optimizers).items():
        state.optimizers[name].load_state_dict(value)
    for name, value in restore("schedulers", state.schedulers).items():
        state.schedulers[name].load_state_dict(value)
    for name, value in restore("generators", state.generators).items():
        state.generators[name].set_state(value)
    _set_global_rng_state(_decode(record["rng"], tensors))
    return Checkpoint(path=path, step=record["step"], extra=record["extra"])


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a training run at a step boundary, after a checkpoint of that step was saved.

    A KeyboardInterrupt, so that whatever runs the loop unwinds as it does on Ctrl-C.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


class NonFiniteLoss(RuntimeError):
    """A training step's loss or gradient norm was NaN or infinite, with more such steps than the run allows."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CheckpointPolicy(Protocol):
    """The training hyperparameters ResumableRun reads (each loop's *TrainingConfig has them)."""

    max_steps: int
    checkpoint_every: int
    keep_checkpoints: int
    nonfinite_skips: int


class ResumableRun:
    """A training loop's place in its run, kept across sessions: the step it starts after (the newest
    checkpoint of the same run, or 0), its loss history, its skipped steps and its training time; and the
    checkpoints it writes.

        run = ResumableRun(checkpoint_dir, fingerprint, state, order, hp, "UNet", log)
        with run.session():                           # the clock runs; SIGINT/SIGTERM are deferred to end_step
            for step in range(run.start + 1, hp.max_steps + 1):
                ...                                   # a step; for one whose loss was not finite, later:
                run.nonfinite(step, loss, norm, rows) # counted as skipped when hp allows it, else NonFiniteLoss
                run.end_step(step)                    # saves when due or when a stop signal came, then stops
        run.train_seconds()                           # over every session of the run

    `ldm.training.engine.train` is the loop that drives it.

    `data` is the batch order: anything with `state_dict()` / `load_state_dict()` of JSON values.
    `hp` sets the run's length and checkpoints: a checkpoint every `hp.checkpoint_every` steps and at the
    last, the newest `hp.keep_checkpoints` kept, and up to `hp.nonfinite_skips` steps with a non-finite loss
    or gradient skipped (counted, and reported in `skipped`) before NonFiniteLoss stops the run.

    `ranks`: this process's place in a data-parallel run (`ldm.training.distributed`). Rank 0 alone picks, clears and
    writes checkpoints, and every rank loads the one it picked; the loss given to `finite` must be the mean
    over the ranks, so that all of them skip or stop together.
    """

    def __init__(
        self, checkpoint_dir: str | os.PathLike, fingerprint: str, state: TrainingState, data, hp: CheckpointPolicy,
        what: str, log: Callable[[str], None] = logger.warning, ranks: DataParallel = SINGLE_PROCESS,
    ):
        self.checkpoint_dir, self.fingerprint, self.state, self.data, self.hp = (
            checkpoint_dir, fingerprint, state, data, hp
        )
        self.what, self.log, self.ranks = what, log, ranks
        self.start, self.history, self.skipped, self._seconds_before = 0, [], [], 0.0
        self.validations: list[dict[str, float]] = []  # what each validation measured, with its step
        self.last_checkpoint: Path | None = None
        self._began = time.perf_counter()
        self._stop_signal: int | None = None
        # Rank 0 alone judges (and clears) the folder; every rank then loads what it chose.
        found = resume_point(checkpoint_dir, fingerprint, log) if ranks.is_main else None
        chosen = ranks.from_main(None if found is None else str(found.path))
        if chosen is not None:
            loaded = load_checkpoint(chosen, state)
            self.start = loaded.step
            data.load_state_dict(loaded.extra["data"])
            self.history, self._seconds_before = loaded.extra["history"], loaded.extra["train_seconds"]
            # Checkpoints written before steps could be skipped have no record of them.
            self.skipped = loaded.extra.get("skipped", [])
            self.validations = loaded.extra.get("validations", [])
            self.last_checkpoint = loaded.path
            if self.start > hp.max_steps:
                raise InputError(
                    f"the newest {what} checkpoint {loaded.path} is at step {self.start}, past max_steps "
                    f"{hp.max_steps}: a run can be extended, not shortened. Raise max_steps to at least "
                    f"{self.start}, or remove {checkpoint_dir} to train from scratch"
                )
            log(f"resuming {what} training from {loaded.path} (step {self.start} of {hp.max_steps})")
            if loaded.extra.get("max_steps", hp.max_steps) != hp.max_steps:
                log(
                    f"max_steps changed from {loaded.extra['max_steps']} to {hp.max_steps}: the run goes on from step "
                    f"{self.start}, with the learning-rate schedule laid over {hp.max_steps} steps from here on"
                )

    @contextmanager
    def session(self) -> Iterator[None]:
        """This session's training: starts the clock and, in the main thread, defers SIGINT and SIGTERM to the
        next `end_step`, so that the run stops at a step boundary with a checkpoint rather than mid-update.
        A second signal acts at once (the previous handlers are back by then)."""
        self._began = time.perf_counter()
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only, and only it may set handlers.
            yield
            return
        previous = {number: signal.getsignal(number) for number in _STOP_SIGNALS}

        def defer(number: int, frame) -> None:
            self._stop_signal = number
            for n, handler in previous.items():
                signal.signal(n, handler)

        for number in _STOP_SIGNALS:
            signal.signal(number, defer)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def train_seconds(self) -> float:
        return self._seconds_before + time.perf_counter() - self._began

    def nonfinite(self, step: int, loss: float, grad_norm: float, batch_ids: Sequence[str]) -> None:
        """Step `step` had a non-finite loss or gradient norm (its update was not applied): count it as skipped
        while the run has skips left, else raise NonFiniteLoss naming the step, the rows of its batch and the
        checkpoint to resume from. Either way the rows go to `nonfinite-step-NNNNNN.json` in the checkpoint
        folder, to find the data behind it. Every rank calls it for the same steps.
        """
        batch_ids = self.ranks.gather(batch_ids)
        report = Path(self.checkpoint_dir) / f"nonfinite-step-{step:06d}.json"
        if self.ranks.is_main:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(
                {"step": step, "loss": repr(loss), "grad_norm": repr(grad_norm), "rows": list(batch_ids)}, indent=1,
            ) + "\n")
        shown = ", ".join(i[:12] for i in list(batch_ids)[:4]) + (", ..." if len(batch_ids) > 4 else "")
        what = f"step {step}: the {self.what} loss is {loss} (gradient norm {grad_norm}) on rows {shown}"
        if len(self.skipped) < self.hp.nonfinite_skips:
            self.skipped.append({"step": step, "loss": repr(loss), "rows": str(report)})
            self.log(f"{what}; skipped ({len(self.skipped)} of at most {self.hp.nonfinite_skips}); every row is in {report}")
            return
        resume = (
            f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
            else "no checkpoint was saved yet"
        )
        raise NonFiniteLoss(
            f"{what}; training stopped and nothing non-finite was saved; {resume}. Every row of the batch is in "
            f"{report}. Lower the learning rate or fix those rows, or allow skipping such steps with the "
            f"stage's `nonfinite_skips` param (now {self.hp.nonfinite_skips}), then run the stage again to resume."
        )

    def end_step(self, step: int, before_save: Callable[[], None] | None = None) -> None:
        """Save a checkpoint when one is due or a stop signal came during the step (`before_save()` first);
        after a signal, stop.

        In a data-parallel run a signal to any rank stops them all after the same step, once rank 0's
        checkpoint is complete (a rank that left earlier would have torchrun kill the others mid-save)."""
        stop_signal = self.ranks.max(self._stop_signal or 0)
        if step % self.hp.checkpoint_every == 0 or step == self.hp.max_steps or stop_signal:
            if before_save is not None:
                before_save()
            self.save(step)
        if stop_signal:
            self.ranks.barrier()
            name = signal.Signals(stop_signal).name
            raise TrainingInterrupted(
                f"{self.what} training stopped by {name} after step {step} of {self.hp.max_steps}; its checkpoint "
                f"{self.last_checkpoint} is saved, and running the stage again resumes from it",
                stop_signal,
            )

    def save(self, step: int) -> None:
        extra = {
            "fingerprint": self.fingerprint,
            "max_steps": self.hp.max_steps,
            "data": self.data.state_dict(),
            "history": self.history,
            "validations": self.validations,
            "skipped": self.skipped,
            "train_seconds": self.train_seconds(),
        }
        if self.ranks.is_main:
            self.last_checkpoint = save_checkpoint(
                self.checkpoint_dir, step, self.state, extra, keep=self.hp.keep_checkpoints
            )
        else:
            self.last_checkpoint = checkpoint_folder(self.checkpoint_dir, step)
