"""The profile ladder in configs/: complete params files, the sizes each promises, a step of the GPU profile taken
on the CPU, and the cost command that sizes them."""

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from ldm.data.ingested import IngestedImages
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.cost import unet_step_cost, vae_step_cost
from ldm.models.text_encoder import TextEmbedding
from ldm.models.unet import UNet
from ldm.training.denoising import denoising_loss
from ldm.training.optim import adamw
from ldm.training.vae import VAETrainingConfig, train_vae
from scripts import profile_cost
from stages.params import load_params
from stages.train_unet import model_config
from tests.test_vae_training import write_images

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LADDER = ["cpu", "cpu64", "gpu256", "sd15"]
MINILM_WIDTH, CLIP_L_WIDTH = 384, 768


def keys(tree, prefix=""):
    """The dotted paths of every mapping key in a YAML tree (list items are values, not keys)."""
    if not isinstance(tree, dict):
        return set()
    return {f"{prefix}{k}" for k in tree} | {p for k, v in tree.items() for p in keys(v, f"{prefix}{k}.")}


def models(name, text_width):
    params = load_params(CONFIGS / f"{name}.yaml")
    vae = params.vae_config()
    factor = 2 ** (len(vae.block_out_channels) - 1)
    return params, vae, model_config(params, vae.latent_channels, params.image_size // factor, text_width), factor


@pytest.mark.parametrize("name", [*LADDER, "own_data"])
def test_every_profile_is_a_complete_params_file_naming_itself(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert keys(yaml.safe_load(text)) == keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert load_params(CONFIGS / f"{name}.yaml").profile == name
    assert f'Profile "{name}"' in text  # the header says what it is for and what it costs


def test_the_cpu_profile_is_the_default_params_file_unchanged():
    assert (CONFIGS / "cpu.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()


def test_the_ladder_climbs_in_image_size_and_parameters():
    sizes, unet_parameters = [], []
    for name in LADDER:
        params, vae, unet, factor = models(name, CLIP_L_WIDTH if name == "sd15" else MINILM_WIDTH)
        sizes.append(params.image_size)
        unet_parameters.append(unet_step_cost(unet, 1, unet.sample_size, unet.sample_size, 8).parameters)
        assert factor == (4 if name.startswith("cpu") else 8)
    assert sizes == [32, 64, 256, 512]
    assert unet_parameters[0] == 1_302_852  # the default run's UNet, as bench/RESULTS.md measured it
    assert 5e6 < unet_parameters[1] < 20e6
    assert 100e6 <= unet_parameters[2] <= 300e6
    assert unet_parameters[3] == 859_520_964  # Stable Diffusion v1.5's UNet


def test_sd15_profile_has_stable_diffusion_v15s_exact_shapes():
    params, vae, unet, _ = models("sd15", CLIP_L_WIDTH)
    assert vae_step_cost(vae, 1, 64, 64).parameters == 83_653_863
    assert (unet.block_out_channels, unet.attention_levels, unet.layers_per_block) == (
        (320, 640, 1280, 1280), (True, True, True, False), 2
    )
    assert (params.image_size, unet.sample_size, params.train_unet.schedule.prediction_type) == (512, 64, "epsilon")


def test_gpu256_profile_takes_a_training_step_of_each_model_on_the_cpu_at_batch_1(tmp_path):
    params, vae_config, unet_config, _ = models("gpu256", MINILM_WIDTH)
    # bf16 on a GPU; on this CPU (no AMX) bf16 autocast runs a 256 px VAE step over 10x slower, so it steps at fp32.
    assert params.train_vae.precision == params.train_unet.precision == "bf16"
    size = params.image_size
    images = [Image.new("RGB", (size, size), color) for color in ((230, 40, 40), (30, 60, 220))]
    for index, image in enumerate(images):
        image.paste((250, 250, 250), (size // 4, size // 4 + index * 16, size // 2, size // 2))
    ingested = write_images(tmp_path / "ingested", images, ["red", "blue"], num_train=1)
    section = params.train_vae
    hp = VAETrainingConfig(**{
        **section.model_dump(exclude={"model", "grid_images"}),
        "batch_size": 1, "max_steps": 1, "warmup_steps": 0, "scaling_batches": 1, "precision": "fp32",
    })
    vae, metrics, history = train_vae(
        vae_config, IngestedImages(ingested, "train"), IngestedImages(ingested, "val"), hp, tmp_path / "vae",
        params.seed, "cpu",
    )
    assert metrics["steps"] == 1 and len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    latents = vae.encode(IngestedImages(ingested, "train")[0][None]).mode()
    assert latents.shape == (1, 4, 32, 32) == (1, unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)

    torch.manual_seed(0)
    unet = UNet(unet_config)
    before = [p.detach().clone() for p in unet.parameters()]
    optimizer = adamw(unet.parameters(), params.train_unet.lr, params.train_unet.weight_decay)
    context = TextEmbedding(torch.randn(1, 8, MINILM_WIDTH), torch.ones(1, 8, dtype=torch.bool))
    loss = denoising_loss(
        unet, NoiseSchedule(**params.train_unet.schedule.model_dump()), latents.detach(), torch.randn_like(latents),
        torch.tensor([500]), context, None, torch.device("cpu"),
    )
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert sum(not torch.equal(a, p) for a, p in zip(before, unet.parameters())) > 0.9 * len(before)


def test_profile_cost_prints_parameters_flops_and_memory(capsys):
    assert profile_cost.main([str(CONFIGS / "gpu256.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    vae_line, unet_line = next(x for x in lines if x.startswith("VAE")), next(x for x in lines if x.startswith("UNet"))
    _, vae, unet, _ = models("gpu256", MINILM_WIDTH)
    vae_cost = vae_step_cost(vae, 16, 256, 256)
    unet_cost = unet_step_cost(unet, 64, 32, 32, 77)
    assert vae_line.split()[1] == f"{vae_cost.parameters:,}" and unet_line.split()[1] == f"{unet_cost.parameters:,}"
    assert float(unet_line.split()[4].replace(",", "")) == pytest.approx(unet_cost.flops_per_step / 1e9, abs=0.1)
    # A UNet step's FLOPs grow with the batch, its weights do not: the per-rank figures of a 4-GPU job.
    assert profile_cost.main([str(CONFIGS / "gpu256.yaml"), "--ranks", "4"]) == 0
    quarter = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("UNet")).split()
    assert float(quarter[4].replace(",", "")) == pytest.approx(unet_cost.flops_per_step / 4e9, rel=1e-3)
    assert float(quarter[7]) == float(unet_line.split()[7])  # the state (weights, gradients, AdamW) per rank


def test_cost_counts_the_flops_of_a_known_layer_and_what_autograd_keeps():
    # One 1x1 convolution of C channels on B x C x H x W: forward 2*B*H*W*C*C FLOPs; the backward computes the
    # weight's gradient alone (the input needs none), as many again.
    from ldm.models import cost

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(64, 64, 1, bias=False)

    with torch.device("meta"):
        model, x = Pointwise(), torch.zeros(2, 64, 8, 8)
    counted = cost._step_cost(model, lambda m: m.conv(x).square().mean())
    assert counted.parameters == 64 * 64
    assert counted.flops_per_step == 2 * (2 * 2 * 8 * 8 * 64 * 64)
    # The conv keeps its input (2x64x8x8 fp32) and square keeps the conv's output, the same size: weights excluded.
    assert counted.activation_bytes == 2 * (2 * 64 * 8 * 8 * 4)


def test_profile_cost_names_the_missing_text_encoder_and_the_way_round(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # a machine without CLIP, whatever this one caches
    assert profile_cost.main([str(CONFIGS / "sd15.yaml")]) == 2
    err = capsys.readouterr().err
    assert "openai/clip-vit-large-patch14" in err and "--text-width" in err
