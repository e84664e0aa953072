"""LoRA on the UNet: the spec syntax, injection that starts as the identity, save/load, scales, merging several,
refusing a LoRA made for another UNet, and the fine-tuning loop (it learns, it resumes bit for bit)."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import PeftConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.lora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraSpec,
    add_lora,
    load_loras,
    lora_metadata,
    parse_lora_spec,
    save_lora,
)
from ldm.models.presets import preset
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet
from ldm.training.lora import LoraTrainingConfig, finetune_lora

CONFIG = preset("tiny").unet  # 16/32 channels, one transformer per block: 7 transformer blocks
WIDTH = CONFIG.cross_attention_dim
HP = LoraTrainingConfig(
    rank=4, alpha=4.0, dropout=0.0, batch_size=4, max_steps=60, lr=2e-2, weight_decay=0.0, warmup_steps=2,
    grad_clip=1.0, caption_dropout=0.0, checkpoint_every=60, keep_checkpoints=2, log_every=20,
)


def base_unet(config=CONFIG) -> UNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet(config).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, WIDTH, generator=g)


@torch.no_grad()
def output(unet: UNet) -> torch.Tensor:
    return unet(*inputs())


def trained_lora(seed: int, steps: int = 3) -> UNet:
    """A base UNet with a LoRA moved off its zero start by a few AdamW steps towards random targets."""
    unet = base_unet()
    torch.manual_seed(seed)
    params = add_lora(unet, rank=4, alpha=8.0)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x, t, context = inputs(seed)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(unet(x, t, context), target).backward()
        optimizer.step()
    return unet.eval()


def saved_lora(tmp_path: Path, seed: int) -> tuple[Path, UNet]:
    unet = trained_lora(seed)
    save_lora(unet, tmp_path / f"lora{seed}", metadata={"concept": f"thing {seed}", "base_unet": "abc123"})
    return tmp_path / f"lora{seed}", unet


@pytest.mark.parametrize(
    ("text", "path", "scale"),
    [
        ("loras/cube", "loras/cube", 1.0),
        ("loras/cube:0.8", "loras/cube", 0.8),
        ("loras/cube:-1.5", "loras/cube", -1.5),
        ("loras/cube:2", "loras/cube", 2.0),
        ("odd:name/lora", "odd:name/lora", 1.0),  # the tail is no number: the colon belongs to the path
        ("a:b:0.25", "a:b", 0.25),  # only the last colon splits
        ("C:\\loras\\cube", "C:\\loras\\cube", 1.0),
    ],
)
def test_parse_lora_spec(text, path, scale):
    assert parse_lora_spec(text) == LoraSpec(Path(path), scale)


@pytest.mark.parametrize("text", ["", ":0.5", "loras/cube:nan", "loras/cube:inf"])
def test_parse_lora_spec_refuses_an_empty_path_or_a_non_finite_scale(text):
    with pytest.raises(ValueError, match="LoRA spec") as error:
        parse_lora_spec(text)
    assert repr(text) in str(error.value)


def test_add_lora_starts_as_the_base_and_trains_only_the_attention_projections():
    unet = base_unet()
    before = output(unet)
    params = add_lora(unet, rank=4, alpha=4.0)
    assert torch.equal(output(unet), before)

    layers = [name for name, m in unet.named_modules() if isinstance(m, LoraLayer)]
    # 7 transformer blocks: attn1 has to_qkv and to_out, attn2 has to_q, to_kv and to_out.
    assert Counter(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in layers) == {
        "attn1.to_qkv": 7, "attn1.to_out": 7, "attn2.to_q": 7, "attn2.to_kv": 7, "attn2.to_out": 7,
    }
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert len(params) == len(trainable) == 2 * 35 and all(".lora_" in name for name in trainable)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert sum(p.numel() for p in params) == sum(4 * (m.in_features + m.out_features)
                                               for m in unet.modules() if isinstance(m, LoraLayer))

    only_q = base_unet()
    add_lora(only_q, rank=2, alpha=2.0, targets=("to_q",))
    assert sum(isinstance(m, LoraLayer) for m in only_q.modules()) == 7
    for rank, alpha in ((0, 1.0), (4, 0.0)):
        with pytest.raises(ValueError, match="rank|alpha"):
            add_lora(base_unet(), rank=rank, alpha=alpha)
    with pytest.raises(ValueError, match="already carries"):
        add_lora(unet, rank=4, alpha=4.0)


def test_training_moves_the_output_and_leaves_the_base_weights_alone():
    base = base_unet()
    unet = trained_lora(seed=1)
    assert (output(unet) - output(base)).abs().max() > 1e-4
    kept = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    reference = base.state_dict()
    assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)


def test_a_saved_lora_loads_back_to_the_same_outputs(tmp_path):
    path, trained = saved_lora(tmp_path, seed=1)
    loaded = load_loras(base_unet(), [LoraSpec(path)])
    assert torch.equal(output(loaded), output(trained))
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.inference_mode():
        assert torch.equal(loaded(*inputs()), output(trained))

    meta = lora_metadata(path)
    assert meta == {"format": "pt", "rank": "4", "alpha": "8.0", "targets": "to_kv,to_out,to_q,to_qkv",
                    "concept": "thing 1", "base_unet": "abc123"}
    keys = load_file(str(path / WEIGHTS_NAME)).keys()
    assert len(keys) == 70
    assert "mid_block.attention.transformer_blocks.0.attn2.to_kv.lora_B.weight" in keys
    config = PeftConfig.from_pretrained(str(path))  # peft reads the folder as its own
    assert (config.r, config.lora_alpha) == (4, 8.0)
    assert json.loads((path / CONFIG_NAME).read_text())["peft_type"] == "LORA"


def test_scale_zero_is_the_base_and_scale_two_doubles_the_update(tmp_path):
    path, _ = saved_lora(tmp_path, seed=1)
    assert torch.equal(output(load_loras(base_unet(), [LoraSpec(path, 0.0)])), output(base_unet()))
    once, twice = load_loras(base_unet(), [LoraSpec(path, 1.0)]), load_loras(base_unet(), [LoraSpec(path, 2.0)])
    assert (output(once) - output(twice)).abs().max() > 1e-4
    layer = next(m for m in twice.modules() if isinstance(m, LoraLayer))
    assert layer.scaling == {"lora0": 2.0 * 8.0 / 4}
    # The update itself doubles: merged into the weights, scale 2 moves each weight twice as far as scale 1.
    plain = base_unet().state_dict()
    merged = {scale: load_loras(base_unet(), [LoraSpec(path, scale)], merge=True).state_dict() for scale in (1.0, 2.0)}
    delta = {scale: {k: w - plain[k] for k, w in weights.items()} for scale, weights in merged.items()}
    moved = [k for k, d in delta[1.0].items() if d.abs().max() > 0]
    assert len(moved) == sum(isinstance(m, LoraLayer) for m in once.modules()) > 0  # one weight per adapted layer
    for key in delta[1.0]:
        torch.testing.assert_close(delta[2.0][key], 2 * delta[1.0][key], atol=1e-6, rtol=1e-4)
    # Unmerged, each adapted layer adds twice the update too (its output is not linear in it: the UNet's is not).
    layers = [[m for m in unet.modules() if isinstance(m, LoraLayer)] for unet in (once, twice)]
    for single, double in zip(*layers):
        torch.testing.assert_close(double.get_delta_weight("lora0"), 2 * single.get_delta_weight("lora0"))


def test_two_loras_merged_match_them_unmerged_and_leave_a_plain_unet(tmp_path):
    (a, _), (b, _) = saved_lora(tmp_path, seed=1), saved_lora(tmp_path, seed=2)
    specs = [LoraSpec(a, 0.7), LoraSpec(b, -0.4)]
    unmerged = load_loras(base_unet(), specs)
    merged = load_loras(base_unet(), specs, merge=True)
    torch.testing.assert_close(output(merged), output(unmerged), atol=1e-5, rtol=0)
    # Both count: either LoRA alone gives something else.
    assert (output(unmerged) - output(load_loras(base_unet(), specs[:1]))).abs().max() > 1e-4
    assert merged.state_dict().keys() == base_unet().state_dict().keys()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules()) and not hasattr(merged, "peft_config")


def test_a_lora_for_another_unet_is_refused_naming_the_file(tmp_path):
    path, _ = saved_lora(tmp_path, seed=1)
    wider = base_unet(CONFIG.model_copy(update={"block_out_channels": (24, 48)}))
    expected = rf"{WEIGHTS_NAME} was trained for another UNet: module \S+\.attn1\.to_\w+ needs lora_A of shape "
    with pytest.raises(ValueError, match=expected + r"\(4, 24\) here but the file holds \(4, 16\)"):
        load_loras(wider, [LoraSpec(path)])
    assert not any(isinstance(m, LoraLayer) for m in wider.modules())  # checked before anything was applied
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} is not a LoRA folder"):
        load_loras(base_unet(), [LoraSpec(tmp_path / "nowhere")])


def synthetic_set(n: int = 8) -> tuple[torch.Tensor, TextEmbedding, TextEmbedding]:
    """Latents that are smooth per-caption patterns: something a LoRA can learn to denoise."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 2, 2, generator=g).repeat_interleave(4, -1).repeat_interleave(4, -2)
    contexts = TextEmbedding(torch.randn(n, 3, WIDTH, generator=g), torch.tensor([[True, True, False]] * n))
    empty = TextEmbedding(torch.zeros(1, 2, WIDTH), torch.ones(1, 2, dtype=torch.bool))
    return latents, contexts, empty


@torch.no_grad()
def fixed_loss(unet: UNet, schedule: NoiseSchedule, latents, contexts) -> float:
    g = torch.Generator().manual_seed(123)
    t = torch.linspace(50, 950, len(latents)).long()
    noise = torch.randn(latents.shape, generator=g)
    prediction = unet(schedule.add_noise(latents, noise, t), t, contexts.hidden_states, contexts.attention_mask)
    return torch.nn.functional.mse_loss(prediction, schedule.training_target(latents, noise, t)).item()


def test_finetune_lora_lowers_the_loss(tmp_path):
    latents, contexts, empty = synthetic_set()
    schedule = NoiseSchedule(prediction_type="v_prediction")
    before = fixed_loss(base_unet(), schedule, latents, contexts)
    result = finetune_lora(base_unet(), latents, contexts, empty, schedule, HP, tmp_path / "ck", 0, "cpu")
    after = fixed_loss(result.unet, schedule, latents, contexts)
    assert after < 0.85 * before, (before, after)
    assert [row["step"] for row in result.history] == [20, 40, 60]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.metrics["trainable_parameters"] == 4 * sum(
        m.in_features + m.out_features for m in result.unet.modules() if isinstance(m, LoraLayer)
    )
    assert result.metrics["steps"] == 60 and result.metrics["train_loss_final"] == result.history[-1]["loss"]


class Interrupted(Exception):
    pass


def test_an_interrupted_finetune_resumes_bitwise(tmp_path):
    latents, contexts, empty = synthetic_set()
    schedule = NoiseSchedule()
    hp = dataclasses.replace(HP, dropout=0.1, caption_dropout=0.3, max_steps=9, checkpoint_every=3, log_every=3)
    straight = finetune_lora(base_unet(), latents, contexts, empty, schedule, hp, tmp_path / "straight", 5, "cpu")

    def stop_at_6(step, total, values):
        if step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune_lora(base_unet(), latents, contexts, empty, schedule, hp, tmp_path / "resumed", 5, "cpu",
                      on_step=stop_at_6)
    messages = []
    resumed = finetune_lora(base_unet(), latents, contexts, empty, schedule, hp, tmp_path / "resumed", 5, "cpu",
                            log=messages.append)
    assert any("resuming" in m and "step 6 of 9" in m for m in messages), messages
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".lora_B." in k and a[k].abs().sum() > 0 for k in a)
    assert resumed.history == straight.history
