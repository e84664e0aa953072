"""Saving and loading models as self-describing folders: `config.json` + `model.safetensors`, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.errors import InputError, InputNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelConfig(BaseModel):
    """A model's architecture: typed, immutable, and rejecting keys it does not know."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class NonFiniteError(ValueError):
    """Weights (or other saved state) hold NaN or infinite values: saving them would only pass the damage on."""


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the floating-point tensors of `tensors` that hold a NaN or an infinity."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(
            f"{what} would hold NaN or infinite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}; not saved"
        )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one step, on failure it is removed.

    Readers therefore see the old file or the complete new one, never a half-written one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_config_json(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise InputNotFoundError(
            f"{directory} is not a saved model folder: {CONFIG_NAME} is missing. "
            f"Pass a folder written by save_pretrained (or convert a diffusers folder with `ldm convert from-diffusers`)."
        )
    return json.loads(path.read_text())


class PretrainedModel(nn.Module):
    """Mixin for models that save to and load from a folder.

    Subclasses set `kind` (the name written in config.json) and `config_class`, and take their config as
    the only constructor argument.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    config: ModelConfig

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        check_finite(state, f"the {self.kind} saved to {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        # Weights first, config last: a folder with a config always has its complete weights beside it.
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"kind": self.kind})
        config = {"kind": self.kind, **self.config.model_dump(mode="json")}
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def config_from_dict(cls, raw: dict, source: str) -> ModelConfig:
        if "_class_name" in raw:
            raise InputError(
                f"{source} is a diffusers {raw['_class_name']} folder; convert it first: "
                f"`ldm convert from-diffusers {source} OUT_DIR`."
            )
        kind = raw.get("kind")
        if kind != cls.kind:
            raise InputError(f"{source} holds a {kind!r} model, not a {cls.kind!r}; load it with the matching class.")
        fields = {k: v for k, v in raw.items() if k != "kind"}
        try:
            return cls.config_class(**fields)
        except ValidationError as e:
            raise InputError(f"{source}/{CONFIG_NAME} is not a valid {cls.kind} config:\n{e}") from None

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Self:
        directory = Path(directory)
        config = cls.config_from_dict(read_config_json(directory), str(directory))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise InputNotFoundError(f"{weights} is missing: the folder has a config but no weights.")
        state = load_file(str(weights), device=str(device or "cpu"))
        return cls.from_state_dict(config, state, source=str(weights), dtype=dtype)

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None
    ) -> Self:
        """Build the model without allocating random weights, then adopt `state` as its parameters."""
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise InputError(
                f"{source} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )
        model.load_state_dict(state, assign=True)
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
