"""LoRA adapters for the UNet's attention projections, built on `peft`.

A LoRA adds a trainable low-rank update to each targeted linear layer of a frozen UNet:
`W x + scale * (alpha / rank) * B A x`, with B zero at the start so the adapted UNet begins as the base.
Only the transformer attention projections are adapted (fused self-attention qkv, cross-attention q, fused
cross-attention kv, and the output projection); the VAE is never touched.

A saved LoRA is a folder in peft's own format, so peft tooling reads it:

    adapter_model.safetensors   the A and B matrices, keyed as `get_peft_model_state_dict` names them
                                (e.g. `mid_block.attention.transformer_blocks.0.attn2.to_q.lora_A.weight`);
                                its metadata holds rank, alpha, targets and what the caller added
                                (e.g. the base UNet's hash and the concept)
    adapter_config.json         the `LoraConfig` (rank, alpha, dropout, the target-module pattern)

Several LoRAs load into one UNet at once, each a named peft adapter with its own scale; `merge=True` folds
them into the base weights and leaves a plain UNet, as fast as the base. Unmerged, the UNet's own state dict
has peft's keys (`...to_q.base_layer.weight`), so save a whole UNet with `save_pretrained` only once merged.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.functional import set_adapter
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.errors import InputError, InputNotFoundError
from ldm.models.modeling import atomic_path
from ldm.models.unet import UNet

LORA_TARGETS = ("to_qkv", "to_q", "to_kv", "to_out")
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# Keys save_lora writes into the safetensors metadata itself; a caller's metadata may not overwrite them.
_RESERVED_METADATA = ("format", "rank", "alpha", "targets")
# peft's PeftModel.save_pretrained prefixes keys with this; a bare model's adapter keys have no prefix.
_PEFT_MODEL_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA folder and the scale to apply it at (1.0: as trained, 0.0: off)."""

    path: Path
    scale: float = 1.0


def parse_lora_spec(text: str) -> LoraSpec:
    """Parse the command-line syntax `PATH[:SCALE]`, e.g. `loras/cube:0.8`.

    The text is split at its last ':' only when what follows is a number, so a path may itself hold colons.
    """
    path, scale = text, 1.0
    head, colon, tail = text.rpartition(":")
    if colon:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not path:
        raise InputError(f"LoRA spec {text!r} has an empty path; write PATH or PATH:SCALE, e.g. loras/cube:0.8")
    if not math.isfinite(scale):
        raise InputError(f"LoRA spec {text!r} has the scale {scale}; give a finite number, e.g. loras/cube:0.8")
    return LoraSpec(Path(path), scale)


def _target_pattern(targets: Sequence[str]) -> str:
    """A regex for peft's `target_modules` that matches only the UNet's transformer attention projections.

    A bare name list would match by suffix anywhere in the model; anchoring on `transformer_blocks.N.attnK`
    keeps e.g. `to_out` from hitting a same-named layer outside the attention blocks.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise InputError(f"LoRA targets {list(targets)} are not a non-empty subset of {list(LORA_TARGETS)}")
    names = "|".join(re.escape(t) for t in dict.fromkeys(targets))
    return rf"(.*\.)?transformer_blocks\.\d+\.attn[12]\.({names})"


def _lora_layers(unet: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, module) for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def _require_plain(unet: nn.Module, what: str) -> None:
    if _lora_layers(unet):
        raise InputError(
            f"{what} needs a UNet without LoRA adapters, but this one already carries "
            f"{sorted(getattr(unet, 'peft_config', {}))}; start from the base UNet, or fold earlier LoRAs into it "
            f"with load_loras(..., merge=True)"
        )


def _inject(unet: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """`inject_adapter_in_model`, keeping the configs of adapters injected before in `unet.peft_config`."""
    with warnings.catch_warnings():
        # peft warns whenever a model already holds a peft_config; several adapters are what we want here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, unet, adapter_name=adapter_name)


def add_lora(
    unet: UNet,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = LORA_TARGETS,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Freeze `unet` and inject a fresh trainable LoRA adapter into its attention projections (in place).

    A is drawn from the global torch RNG (seed it for a reproducible start) and B is zero, so the output is
    unchanged until training moves B. Returns the adapter's parameters, the only ones that require grad.
    """
    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise InputError(f"LoRA alpha must be positive, got {alpha}; alpha = rank applies the update at scale 1")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout}")
    _require_plain(unet, "add_lora")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=_target_pattern(targets))
    unet.requires_grad_(False)
    _inject(unet, config, adapter_name)
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(
    unet: UNet, directory: str | os.PathLike, adapter_name: str = "default", metadata: dict[str, str] | None = None
) -> None:
    """Write adapter `adapter_name` of `unet` (its weights only, not the base) to `directory`.

    `metadata` (string keys and values) goes into the safetensors header beside rank, alpha and targets.
    """
    configs = getattr(unet, "peft_config", {})
    if adapter_name not in configs:
        raise InputError(
            f"the UNet has no LoRA adapter {adapter_name!r} (it has {sorted(configs)}); add one with add_lora"
        )
    metadata = dict(metadata or {})
    clashing = sorted(set(metadata) & set(_RESERVED_METADATA))
    if clashing:
        raise InputError(f"metadata keys {clashing} are written by save_lora itself; rename them")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(
            "LoRA metadata must map strings to strings (safetensors stores nothing else); convert with str()"
        )
    config = configs[adapter_name]
    adapter = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
    targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in state})
    header = {"format": "pt", "rank": str(config.r), "alpha": str(config.lora_alpha), "targets": ",".join(targets)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, config last, as PretrainedModel.save_pretrained: a folder with a config has its weights.
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={**header, **metadata})
    # The JSON LoraConfig.save_pretrained writes (sets as lists), but through atomic_path.
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def _lora_files(directory: Path) -> tuple[Path, Path]:
    if directory.is_file():
        raise InputNotFoundError(f"{directory} is a file; a LoRA is a folder: pass the folder that holds {WEIGHTS_NAME}")
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights, config):
        if not path.is_file():
            raise InputNotFoundError(
                f"{directory} is not a LoRA folder: {path.name} is missing. A LoRA folder holds {WEIGHTS_NAME} and "
                f"{CONFIG_NAME}, as ldm.models.lora.save_lora (or peft's save_pretrained) writes them."
            )
    return weights, config


def lora_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a saved LoRA: rank, alpha, targets and what its trainer recorded."""
    weights, _ = _lora_files(Path(directory))
    with safe_open(str(weights), framework="pt") as f:
        return dict(f.metadata() or {})


def _read_lora(directory: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    weights, config_file = _lora_files(directory)
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise InputError(f"{config_file} is not a valid peft adapter config: {e}") from None
    if not isinstance(config, LoraConfig):
        raise InputError(f"{config_file} describes a {config.peft_type} adapter, not a LoRA")
    config.inference_mode = True
    state = {k.removeprefix(_PEFT_MODEL_PREFIX): v for k, v in load_file(str(weights)).items()}
    return config, state


def _check_fits(unet: UNet, config: LoraConfig, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Raise if the LoRA in `weights` was not made for `unet`'s architecture, before `unet` is touched.

    The expected keys and shapes come from injecting the same config into a weightless (meta) copy.
    """
    with torch.device("meta"):
        probe = type(unet)(unet.config)
    try:
        _inject(probe, config, "probe")
    except ValueError as e:
        raise InputError(f"{weights} does not fit this UNet: {e}") from None
    expected = get_peft_model_state_dict(probe, adapter_name="probe")

    def module(key: str) -> str:
        return key.split(".lora_")[0]

    unexpected = sorted({module(k) for k in state.keys() - expected.keys()})
    missing = sorted({module(k) for k in expected.keys() - state.keys()})
    problems = []
    if unexpected:
        problems.append(f"it adapts {len(unexpected)} modules this UNet lacks (e.g. {unexpected[0]})")
    if missing:
        problems.append(f"it has no weights for {len(missing)} modules its config targets here (e.g. {missing[0]})")
    if problems:
        raise InputError(
            f"{weights} was trained for another UNet: {' and '.join(problems)}; load it onto the UNet it was trained on"
        )
    for key, tensor in sorted(state.items()):
        if tensor.shape != expected[key].shape:
            raise InputError(
                f"{weights} was trained for another UNet: module {module(key)} needs {key.rsplit('.', 2)[-2]} of "
                f"shape {tuple(expected[key].shape)} here but the file holds {tuple(tensor.shape)}; load it onto "
                f"the UNet it was trained on"
            )


def load_loras(unet: UNet, specs: Sequence[LoraSpec], merge: bool = False) -> UNet:
    """Apply saved LoRAs to `unet` (in place), all active at once, each at its spec's scale; returns `unet`.

    Without `merge` the LoRAs stay separate peft adapters (named lora0, lora1, ...), frozen. With `merge` they
    are folded into the base weights and the peft wrappers removed: a plain UNet with the base's state-dict
    keys and speed. Every LoRA is checked against the UNet before any is applied.
    """
    if not specs:
        return unet
    _require_plain(unet, "load_loras")
    loaded = []
    for spec in specs:
        config, state = _read_lora(Path(spec.path))
        _check_fits(unet, config, state, Path(spec.path) / WEIGHTS_NAME)
        loaded.append((spec, config, state))
    names = [f"lora{i}" for i in range(len(loaded))]
    for name, (_, config, state) in zip(names, loaded):
        _inject(unet, config, name)
        set_peft_model_state_dict(unet, state, adapter_name=name)
    # Each injection leaves only its own adapter active; peft runs every active adapter and sums their updates.
    set_adapter(unet, names, inference_mode=True)
    for _, layer in _lora_layers(unet):
        for name, (spec, _, _) in zip(names, loaded):
            layer.set_scale(name, spec.scale)
    if merge:
        _merge_and_unload(unet, names)
    return unet


def _merge_and_unload(unet: nn.Module, names: list[str]) -> None:
    """Fold the adapters into the base weights (each at its current scale) and put the base layers back."""
    for path, layer in _lora_layers(unet):
        layer.merge(adapter_names=names)
        parent, _, child = path.rpartition(".")
        setattr(unet.get_submodule(parent), child, layer.get_base_layer())
    del unet.peft_config
