"""Convert ldm models to diffusers folders (`AutoencoderKL`, `UNet2DConditionModel`) and back.

No diffusers import: a diffusers folder is just `config.json` + `diffusion_pytorch_model.safetensors`,
and the mapping is plain data. Our parameter names differ from diffusers' in a few well-defined places
(fused attention projections, single down/upsamplers, named middle blocks); everything else is shared.
A diffusers config that our architecture cannot express is refused with the offending key named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.errors import InputError, InputNotFoundError
from ldm.models.modeling import CONFIG_NAME, PretrainedModel, atomic_path, read_config_json
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the version this mapping is tested against

# (ours, diffusers) name fragments, applied in order to dot-delimited names; specific before generic.
_COMMON_RENAMES = [
    (".downsample.", ".downsamplers.0."),
    (".upsample.", ".upsamplers.0."),
    ("mid_block.resnet_in.", "mid_block.resnets.0."),
    ("mid_block.resnet_out.", "mid_block.resnets.1."),
    ("mid_block.attention.", "mid_block.attentions.0."),
    (".to_out.", ".to_out.0."),
]
_UNET_RENAMES = _COMMON_RENAMES + [(".ff.proj_in.", ".ff.net.0.proj."), (".ff.proj_out.", ".ff.net.2.")]
# The VAE's middle attention is a bare attention layer in diffusers; ours wraps one with its norm.
_VAE_RENAMES = [
    ("mid_block.attention.norm.", "mid_block.attentions.0.group_norm."),
    ("mid_block.attention.attn.", "mid_block.attentions.0."),
] + _COMMON_RENAMES

_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}


def diffusers_names(key: str, renames: list[tuple[str, str]]) -> list[str]:
    """The diffusers parameter(s) that hold our parameter `key`: several where ours fuses projections."""
    prefix, _, leaf = key.rpartition(".")  # leaf: weight / bias
    module_path, _, proj = prefix.rpartition(".")
    keys = [f"{module_path}.{name}.{leaf}" for name in _FUSED[proj]] if proj in _FUSED else [key]
    renamed = []
    for k in keys:
        k = "." + k
        for ours, theirs in renames:
            k = k.replace(ours, theirs)
        renamed.append(k[1:])
    return renamed


def state_dict_to_diffusers(state: dict[str, torch.Tensor], renames: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        names = diffusers_names(key, renames)
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            out[name] = part.contiguous()
    return out


def state_dict_from_diffusers(
    state: dict[str, torch.Tensor], renames: list[tuple[str, str]], expected_keys: set[str], source: str
) -> dict[str, torch.Tensor]:
    remaining = dict(state)
    out = {}
    for key in sorted(expected_keys):
        names = diffusers_names(key, renames)
        missing = [n for n in names if n not in remaining]
        if missing:
            raise InputError(f"{source}: diffusers weights lack {missing}, needed for ldm parameter {key}")
        out[key] = torch.cat([remaining.pop(n) for n in names], dim=0)
    if remaining:
        raise InputError(f"{source}: diffusers weights hold parameters ldm has no place for: {sorted(remaining)[:5]}")
    return out


# ---- configs -------------------------------------------------------------------------------------------

def unet_config_to_diffusers(c: UNetConfig) -> dict:
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)],
        # diffusers' historical name: in UNet2DConditionModel this is the number of heads, not their width.
        "attention_head_dim": c.num_heads if isinstance(c.num_heads, int) else list(c.num_heads),
        "cross_attention_dim": c.cross_attention_dim,
        "transformer_layers_per_block": c.transformer_layers_per_block,
        "norm_num_groups": c.norm_num_groups,
        "norm_eps": c.norm_eps,
        "use_linear_projection": c.use_linear_projection,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


# diffusers options our architecture fixes, with the value it fixes them to (absent counts as the default).
_UNET_FIXED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
    "num_attention_heads": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "only_cross_attention": False, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "attention_type": "default", "cross_attention_norm": None, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "reverse_transformer_layers_per_block": None,
    "projection_class_embeddings_input_dim": None, "addition_time_embed_dim": None,
}
_VAE_FIXED = {
    "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    "latents_mean": None, "latents_std": None,
}


def _check_fixed(cfg: dict, fixed: dict, source: str) -> None:
    for key, value in fixed.items():
        if key in cfg and cfg[key] != value and not (value == 0 and cfg[key] == 0.0):
            raise InputError(
                f"{source}: diffusers option {key}={cfg[key]!r} cannot be expressed by ldm (only {value!r} is supported)"
            )


def _uniform(value, what: str, source: str):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise InputError(f"{source}: per-level {what} {list(value)} cannot be expressed by ldm (one value for all levels)")
        return value[0]
    return value


def unet_config_from_diffusers(cfg: dict, source: str) -> UNetConfig:
    _check_fixed(cfg, _UNET_FIXED, source)
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    allowed_down = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    allowed_up = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    if not set(down) <= set(allowed_down) or not set(up) <= set(allowed_up):
        raise InputError(f"{source}: block types {down} / {up} cannot be expressed by ldm ({list(allowed_down)} / {list(allowed_up)})")
    attention = tuple(allowed_down[b] for b in down)
    if tuple(allowed_up[b] for b in reversed(up)) != attention:
        raise InputError(f"{source}: up_block_types {up} do not mirror down_block_types {down}")
    heads = cfg.get("attention_head_dim", 8)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=_uniform(cfg.get("layers_per_block", 2), "layers_per_block", source),
        attention_levels=attention,
        num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        transformer_layers_per_block=_uniform(cfg.get("transformer_layers_per_block", 1), "transformer_layers_per_block", source),
        cross_attention_dim=_uniform(cfg.get("cross_attention_dim", 1280), "cross_attention_dim", source),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        use_linear_projection=cfg.get("use_linear_projection", False),
        sample_size=cfg.get("sample_size") or 64,
    )


def vae_config_to_diffusers(c: VAEConfig) -> dict:
    levels = len(c.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "act_fn": "silu",
        "latent_channels": c.latent_channels,
        "norm_num_groups": c.norm_num_groups,
        "sample_size": c.sample_size,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor or None,
    }


def vae_config_from_diffusers(cfg: dict, source: str) -> VAEConfig:
    _check_fixed(cfg, _VAE_FIXED, source)
    levels = len(cfg["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg.get(key, [block] * levels)) != [block] * levels:
            raise InputError(f"{source}: {key} {cfg[key]} cannot be expressed by ldm (only {block})")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg.get("layers_per_block", 1),
        latent_channels=cfg.get("latent_channels", 4),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0,
        sample_size=cfg.get("sample_size", 512),
    )


# ---- model <-> diffusers folder ------------------------------------------------------------------------

_BY_CLASS = {
    "AutoencoderKL": (VAE, vae_config_from_diffusers, _VAE_RENAMES),
    "UNet2DConditionModel": (UNet, unet_config_from_diffusers, _UNET_RENAMES),
}
_BY_KIND = {
    "vae": (VAE, vae_config_to_diffusers, _VAE_RENAMES),
    "unet": (UNet, unet_config_to_diffusers, _UNET_RENAMES),
}


def to_diffusers(model: VAE | UNet) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our model -> (diffusers config dict, diffusers state dict)."""
    _, config_to, renames = _BY_KIND[model.kind]
    return config_to(model.config), state_dict_to_diffusers(model.state_dict(), renames)


def from_diffusers(config: dict, state: dict[str, torch.Tensor], source: str = "diffusers model") -> VAE | UNet:
    """(diffusers config dict, diffusers state dict) -> our model."""
    class_name = config.get("_class_name")
    if class_name not in _BY_CLASS:
        raise InputError(f"{source}: cannot convert a diffusers {class_name!r}; supported: {sorted(_BY_CLASS)}")
    model_class, config_from, renames = _BY_CLASS[class_name]
    ours = config_from(config, source)
    with torch.device("meta"):
        expected = set(model_class(ours).state_dict())
    return model_class.from_state_dict(ours, state_dict_from_diffusers(state, renames, expected, source), source)


def save_diffusers_folder(model: VAE | UNet, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, state = to_diffusers(model)
    with atomic_path(directory / DIFFUSERS_WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def load_diffusers_folder(directory: str | os.PathLike) -> VAE | UNet:
    directory = Path(directory)
    config = read_config_json(directory)
    weights = directory / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        raise InputNotFoundError(
            f"{weights} is missing; only safetensors diffusers folders are read (re-save the model with "
            f"`save_pretrained(..., safe_serialization=True)`)."
        )
    return from_diffusers(config, load_file(str(weights)), str(directory))


def load_ldm_folder(directory: str | os.PathLike) -> PretrainedModel:
    """Load an ldm model folder of whichever kind its config names."""
    directory = Path(directory)
    kind = read_config_json(directory).get("kind")
    if kind not in _BY_KIND:
        raise InputError(f"{directory}/{CONFIG_NAME} names kind {kind!r}; expected one of {sorted(_BY_KIND)}")
    return _BY_KIND[kind][0].from_pretrained(directory)

