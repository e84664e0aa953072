"""Choosing the torch device by name: the same rule for the pipeline's `device` param and `ldm --device`."""

from __future__ import annotations

import torch

from ldm.errors import InputError


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when this machine has one, else the CPU; any other name must be a torch device
    (cpu, cuda, cuda:1, mps, ...) and a CUDA one needs a usable GPU. ValueError names the choices otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"{name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{name!r} but this machine has no usable CUDA GPU; use auto or cpu")
    return device


def use_threads(threads: int | None) -> int:
    """Sets the CPU threads torch computes with (`torch.set_num_threads`) when `threads` is given, else leaves
    torch's choice (one per core); returns the number in use.

    Fewer threads than cores pay on a machine that other processes are using: PyTorch's OpenMP threads wait
    for each other at every operation, so one thread descheduled stalls them all (a training step measured
    10x slower on 2 busy cores; 1 thread gave it back)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
