"""TextEncoder: the bundled MiniLM, CLIP checkpoints (tiny, random, built here) and offline lookup."""

import json
import shutil
import string

import huggingface_hub.constants
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

from ldm.models.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    TextEmbedding,
    TextEncoder,
    TextEncoderNotFoundError,
)

SHORT = "a cat"
LONG = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls in the sky"


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the constant is patched as well as the variable:
    # any request to the Hub then raises instead of quietly downloading.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        # An empty cache, so a model cached on this machine cannot make a lookup test pass.
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_hub_cache")))
        yield


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_pretrained()


@pytest.fixture(scope="module")
def clip_tokenizer_files(tmp_path_factory):
    """vocab.json + merges.txt of a letters-only CLIP BPE (no merges: a word is its letters)."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder, len(tokens)


@pytest.fixture(scope="module")
def clip_text_config(clip_tokenizer_files):
    _, vocab_size = clip_tokenizer_files
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _save_tokenizer(clip_tokenizer_files, folder):
    tokenizer_folder, _ = clip_tokenizer_files
    CLIPTokenizer(str(tokenizer_folder / "vocab.json"), str(tokenizer_folder / "merges.txt")).save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_text_folder(tmp_path_factory, clip_tokenizer_files, clip_text_config):
    """A folder holding only a CLIPTextModel, as in Stable Diffusion's text_encoder/; returns (folder, model)."""
    folder = tmp_path_factory.mktemp("clip_text")
    torch.manual_seed(0)
    model = CLIPTextModel(clip_text_config).eval()
    model.save_pretrained(folder)
    _save_tokenizer(clip_tokenizer_files, folder)
    return folder, model


@pytest.fixture(scope="module")
def clip_full_folder(tmp_path_factory, clip_tokenizer_files, clip_text_config):
    """A full CLIPModel (text and vision towers), as in openai/clip-vit-large-patch14; returns (folder, model)."""
    folder = tmp_path_factory.mktemp("clip_full")
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
        projection_dim=16,
    )
    torch.manual_seed(1)
    model = CLIPModel(
        CLIPConfig(text_config=clip_text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
    ).eval()
    model.save_pretrained(folder)
    _save_tokenizer(clip_tokenizer_files, folder)
    return folder, model


def _token_counts(encoder, prompts):
    return [len(encoder.tokenizer(p, truncation=True, max_length=encoder.max_length)["input_ids"]) for p in prompts]


# --- the default encoder -------------------------------------------------------------------------


def test_default_encoder_shapes_and_attributes(minilm):
    embedding = minilm([SHORT, LONG])

    assert minilm.name == DEFAULT_TEXT_ENCODER
    assert minilm.hidden_size == 384
    assert minilm.max_length == 77
    longest = max(_token_counts(minilm, [SHORT, LONG]))
    assert embedding.hidden_states.shape == (2, longest, 384)
    assert embedding.hidden_states.dtype == torch.float32
    assert embedding.attention_mask.shape == (2, longest)
    assert embedding.attention_mask.dtype == torch.bool
    assert len(embedding) == 2


def test_mask_marks_exactly_the_real_tokens(minilm):
    prompts = [SHORT, LONG, "", "an astronaut riding a horse"]
    embedding = minilm.encode(prompts)

    assert embedding.attention_mask.sum(dim=1).tolist() == _token_counts(minilm, prompts)
    # Real tokens come first, padding after.
    for row, count in zip(embedding.attention_mask, _token_counts(minilm, prompts)):
        assert row[:count].all() and not row[count:].any()


def test_padding_does_not_change_real_tokens(minilm):
    alone = minilm.encode([SHORT])
    batched = minilm.encode([SHORT, LONG])
    count = alone.hidden_states.shape[1]

    assert batched.hidden_states.shape[1] > count
    torch.testing.assert_close(batched.hidden_states[0, :count], alone.hidden_states[0], atol=1e-5, rtol=0)
    assert not batched.hidden_states[0, count:].any()


def test_long_prompts_are_truncated_at_max_length(minilm):
    very_long = " ".join([LONG] * 10)
    assert minilm.encode([very_long]).hidden_states.shape[1] == 77

    short_context = TextEncoder(minilm.model, minilm.tokenizer, name="minilm", max_length=8)
    embedding = short_context.encode([very_long, SHORT])
    assert embedding.hidden_states.shape == (2, 8, 384)
    assert embedding.attention_mask[0].all()


@pytest.mark.parametrize("max_length", [2, 513])
def test_max_length_outside_what_the_model_takes_is_refused(minilm, max_length):
    # 2 leaves no room past [CLS] [SEP]; 513 is past MiniLM's 512 position embeddings.
    with pytest.raises(ValueError, match=f"max_length={max_length}.*at least 3.*at most 512"):
        TextEncoder(minilm.model, minilm.tokenizer, name="minilm", max_length=max_length)


def test_deterministic(minilm):
    first, second = minilm.encode([SHORT, LONG]), minilm.encode([SHORT, LONG])
    assert torch.equal(first.hidden_states, second.hidden_states)
    assert torch.equal(first.attention_mask, second.attention_mask)


def test_frozen_even_in_train_mode(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    reference = minilm.encode([LONG])

    minilm.train()
    try:
        assert not any(module.training for module in minilm.modules())
        first, second = minilm.encode([LONG]), minilm.encode([LONG])
    finally:
        minilm.eval()

    assert torch.equal(first.hidden_states, second.hidden_states)
    assert torch.equal(first.hidden_states, reference.hidden_states)


def test_output_can_feed_a_trained_module(minilm):
    # The UNet's cross-attention saves its context for backward; inference-mode tensors would make that fail.
    context = minilm.encode([SHORT]).hidden_states
    assert not context.requires_grad
    projection = torch.nn.Linear(384, 8)
    projection(context).sum().backward()
    assert projection.weight.grad is not None


def test_empty_embedding(minilm):
    empty = minilm.empty_embedding

    assert empty.hidden_states.shape == (1, len(minilm.tokenizer("")["input_ids"]), 384)
    assert empty.attention_mask.all()
    torch.testing.assert_close(empty.hidden_states, minilm.encode([""]).hidden_states)
    assert minilm.empty_embedding.hidden_states is empty.hidden_states


def test_encode_rejects_bad_prompts(minilm):
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        minilm.encode(SHORT)
    with pytest.raises(TypeError, match="'NoneType'"):
        minilm.encode([SHORT, None])
    with pytest.raises(ValueError, match="no prompts"):
        minilm.encode([])


# --- TextEmbedding -------------------------------------------------------------------------------


def test_cat_pads_with_zeros_and_equals_encoding_together(minilm):
    prompts = minilm.encode([LONG, SHORT])
    together = TextEmbedding.cat([prompts, minilm.empty_embedding])
    encoded_together = minilm.encode([LONG, SHORT, ""])

    assert together.hidden_states.shape == encoded_together.hidden_states.shape
    assert torch.equal(together.attention_mask, encoded_together.attention_mask)
    torch.testing.assert_close(together.hidden_states, encoded_together.hidden_states, atol=1e-5, rtol=0)


def test_cat_refuses_mixed_widths_and_empty_lists():
    narrow = TextEmbedding(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    wide = TextEmbedding(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[4, 8\]"):
        TextEmbedding.cat([narrow, wide])
    with pytest.raises(ValueError, match="empty list"):
        TextEmbedding.cat([])


def test_embedding_batch_operations():
    states = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    embedding = TextEmbedding(states, mask)

    repeated = embedding.repeat_interleave(3)
    assert repeated.hidden_states.shape == (6, 3, 4)
    assert torch.equal(repeated.hidden_states[:3], states[:1].expand(3, 3, 4))
    assert torch.equal(repeated.attention_mask[3:], mask[1:].expand(3, 3))

    assert torch.equal(embedding[1].hidden_states, states[1:])
    assert torch.equal(embedding[-1].attention_mask, mask[1:])
    assert len(embedding[0:2]) == 2

    half = embedding.to(dtype=torch.float16)
    assert half.hidden_states.dtype == torch.float16 and half.attention_mask.dtype == torch.bool

    padded = embedding.pad_to(5)
    assert padded.hidden_states.shape == (2, 5, 4) and not padded.attention_mask[:, 3:].any()
    with pytest.raises(ValueError, match="never truncates"):
        embedding.pad_to(2)


def test_embedding_checks_shapes_and_mask_dtype():
    with pytest.raises(ValueError, match=r"\(B, S, D\)"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.ones(2, 3))


# --- CLIP through the same call ------------------------------------------------------------------


def test_clip_text_model_folder(clip_text_folder):
    folder, original = clip_text_folder
    encoder = TextEncoder.from_pretrained(str(folder))
    embedding = encoder.encode(["a red cube", "dog"])

    assert type(encoder.model) is CLIPTextModel
    assert encoder.hidden_size == 32 and encoder.max_length == 77
    assert embedding.attention_mask.sum(dim=1).tolist() == _token_counts(encoder, ["a red cube", "dog"])
    # The per-token states are CLIP's last_hidden_state (after the final layer norm), as SD v1 uses.
    ids = encoder.tokenizer(["a red cube"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = original(input_ids=ids).last_hidden_state
    torch.testing.assert_close(embedding.hidden_states[:1, : ids.shape[1]], expected)


def test_full_clip_checkpoint_loads_its_text_tower(clip_full_folder):
    folder, original = clip_full_folder
    encoder = TextEncoder.from_pretrained(str(folder))
    embedding = encoder.encode(["a red cube"])

    assert type(encoder.model) is CLIPTextModel
    assert encoder.hidden_size == 32
    ids = encoder.tokenizer(["a red cube"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = original.text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(embedding.hidden_states, expected)


def test_dtype_and_device_follow_the_module(clip_text_folder):
    folder, _ = clip_text_folder
    encoder = TextEncoder.from_pretrained(str(folder), device="cpu", dtype=torch.float64)
    assert encoder.encode(["a cat"]).hidden_states.dtype == torch.float64
    assert encoder.empty_embedding.hidden_states.dtype == torch.float64

    encoder.to(torch.bfloat16)
    assert encoder.encode(["a cat"]).hidden_states.dtype == torch.bfloat16
    assert encoder.empty_embedding.hidden_states.dtype == torch.bfloat16
    assert encoder.empty_embedding.attention_mask.dtype == torch.bool


def _fake_hub_cache(root, repo_id, source_folder):
    """The layout `hf download` leaves: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_repo_id_from_the_local_hub_cache(tmp_path, monkeypatch, clip_text_folder, variable):
    folder, _ = clip_text_folder
    hub = tmp_path / "hub"
    _fake_hub_cache(hub, "org/name", folder)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv(variable, str(hub if variable == "HF_HUB_CACHE" else tmp_path))

    encoder = TextEncoder.from_pretrained("org/name")

    assert encoder.name == "org/name"
    assert encoder.encode(["a cat"]).hidden_states.shape == (1, len(encoder.tokenizer("a cat")["input_ids"]), 32)


# --- models that are not here --------------------------------------------------------------------


def test_missing_repo_id_names_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TextEncoderNotFoundError) as error:
        TextEncoder.from_pretrained("openai/clip-vit-large-patch14")

    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert "openai/clip-vit-large-patch14" in message
    assert str(tmp_path) in message
    assert "hf download openai/clip-vit-large-patch14" in message
    assert DEFAULT_TEXT_ENCODER in message


def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such" / "encoder"
    with pytest.raises(TextEncoderNotFoundError) as error:
        TextEncoder.from_pretrained(str(missing))

    message = str(error.value)
    assert str(missing) in message
    assert "local folder holding config.json" in message
    assert "hf download" not in message  # not a repo id, so the cache is not the place to put it


def test_folder_without_config(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(TextEncoderNotFoundError, match="no config.json"):
        TextEncoder.from_pretrained(str(tmp_path))
