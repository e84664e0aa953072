"""The README's claims about the default profile hold for the run `dvc repro` recorded with this very code.

Training the default VAE takes minutes (it was the suite's slowest test), and `dvc repro` does it anyway: this
checks the metrics that run wrote, after checking that dvc.lock recorded them for the params and the code
in this checkout. A change to either makes the stage stale, and this test fails until `dvc repro` has run
again and its dvc.lock and metrics are committed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ruamel.yaml import YAML

from stages.params import load_params

REPO = Path(__file__).resolve().parents[1]
STATED_VAL_PSNR = 33.0  # the README's floor; measured 37.6 dB (SSIM 0.993) at these params
# Posterior noise over signal in the noisiest latent channel: measured 0.87 at kl_weight 1e-6; at 1e-5
# it was up to 5.1, noise drowning 3 of the 4 channels.
MAX_NOISE_TO_SIGNAL = 1.0


def locked_stage(name: str) -> dict:
    # ruamel, not PyYAML: DVC writes floats such as 1e-06 that PyYAML reads as strings.
    return YAML(typ="safe").load((REPO / "dvc.lock").read_text())["stages"][name]


def test_the_recorded_vae_run_is_of_this_code_and_these_params():
    stage = "train_vae"
    locked = locked_stage(stage)
    params = load_params(REPO / "params.yaml").model_dump(mode="json")
    for key, value in locked["params"]["params.yaml"].items():
        current = params[key]
        if isinstance(value, dict):  # dvc.lock holds what params.yaml spells out; defaults fill the rest
            current = {k: current[k] for k in value}
        assert current == value, f"params.yaml {key} changed since `dvc repro` recorded {stage}; run it again"
    code = [dep for dep in locked["deps"] if (REPO / dep["path"]).is_file()]  # not the data folders
    assert code, locked["deps"]
    for dep in code:
        md5 = hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest()
        assert md5 == dep["md5"], f"{dep['path']} changed since `dvc repro` recorded {stage}; run it again"


def test_the_default_vae_reaches_the_stated_psnr_with_latents_above_their_noise():
    locked = {out["path"]: out["md5"] for out in locked_stage("train_vae")["outs"]}
    metrics_file = REPO / "metrics" / "train_vae.json"
    assert hashlib.md5(metrics_file.read_bytes()).hexdigest() == locked["metrics/train_vae.json"]
    metrics = json.loads(metrics_file.read_text())
    assert metrics["steps"] == load_params(REPO / "params.yaml").train_vae.max_steps
    assert metrics["val_psnr"] >= STATED_VAL_PSNR, metrics
    assert metrics["latent_noise_to_signal"] < MAX_NOISE_TO_SIGNAL, metrics
