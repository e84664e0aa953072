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
