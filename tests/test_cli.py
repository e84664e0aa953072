"""`ldm convert` through the installed console script, on real folders."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm import VAE, UNet

# The console script pip installed beside this interpreter, so the test needs no activated venv.
LDM = Path(sys.executable).parent / "ldm"


def _ldm(*args):
    return subprocess.run([str(LDM), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_convert_unet_and_vae_both_ways(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, scaling_factor=0.5,
    ).eval()
    for name, model, ours_class in (("unet", unet, UNet), ("vae", vae, VAE)):
        model.save_pretrained(tmp_path / f"{name}-diffusers")
        done = _ldm("convert", "from-diffusers", tmp_path / f"{name}-diffusers", tmp_path / f"{name}-ldm")
        assert done.returncode == 0, done.stderr
        assert json.loads((tmp_path / f"{name}-ldm" / "config.json").read_text())["kind"] == name
        ours = ours_class.from_pretrained(tmp_path / f"{name}-ldm")

        done = _ldm("convert", "to-diffusers", tmp_path / f"{name}-ldm", tmp_path / f"{name}-back")
        assert done.returncode == 0, done.stderr
        back = type(model).from_pretrained(tmp_path / f"{name}-back")
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
    assert ours.config.scaling_factor == 0.5


def test_convert_reports_a_wrong_folder_without_traceback(tmp_path):
    done = _ldm("convert", "to-diffusers", tmp_path / "nowhere", tmp_path / "out")
    assert done.returncode == 2
    assert "config.json is missing" in done.stderr and "Traceback" not in done.stderr
    done = _ldm("convert", "sideways", tmp_path, tmp_path)
    assert done.returncode == 2 and "invalid choice" in done.stderr
