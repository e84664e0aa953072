"""Fault injection: training stopped by a signal, killed outright, fed a NaN, or given damaged inputs or
checkpoints loses nothing, and the weights it ends with are those of a run that never failed.

The stages run on the ci profile in a scratch copy of a trained workspace. Process-level faults come from
tests/fault_injection/sitecustomize.py (`LDM_FAULT`); the same faults through `dvc repro`, with real Prefect
and MLflow servers, are in test_pipeline_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.data.latent_cache import LatentCache
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.modeling import NonFiniteError
from ldm.models.unet import UNet
from ldm.models.vae import VAE, VAEConfig
from ldm.training.checkpoint import (
    NonFiniteLoss,
    TrainingInterrupted,
    TrainingState,
    latest_checkpoint,
    save_checkpoint,
)
from ldm.training.unet import train_unet
from stages import cache_latents, sample, train_vae
from stages import train_unet as train_unet_stage
from stages.params import Params
from stages.train_unet import training_config, unet_config
from tests.ci_stages import RecordingReporter, ci_params, train_ci_model, write_params

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "fault_injection"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The ci profile's ingested data, VAE, latent cache and text-to-image model, with their checkpoints."""
    root = tmp_path_factory.mktemp("faults")
    train_ci_model(ci_params(root))
    return root


def scratch_copy(workspace: Path, tmp_path: Path) -> Params:
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    return ci_params(root)


def run_stage(stage: str, params_file: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(FAULTS)}
    if fault:
        env["LDM_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(params_file)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )


def step_folders(directory: str) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


def test_vae_stage_killed_or_stopped_anywhere_ends_with_the_uninterrupted_weights(workspace, tmp_path):
    params = scratch_copy(workspace, tmp_path)
    params_file = write_params(params, tmp_path / "params.yaml")
    weights = Path(params.paths.vae) / WEIGHTS

    def start_over():
        shutil.rmtree(params.paths.vae_checkpoints)
        shutil.rmtree(params.paths.vae)

    start_over()
    clean = run_stage("train_vae", params_file)
    assert clean.returncode == 0, clean.stderr[-3000:]
    uninterrupted = weights.read_bytes()
    start_over()

    # A step between the checkpoints at 10 and 20, different for each day the suite runs, and named if it fails.
    step = random.Random(time.strftime("%Y-%m-%d")).randint(11, 19)
    killed = run_stage("train_vae", params_file, f"kill:{step}")
    assert killed.returncode == -signal.SIGKILL, step
    assert step_folders(params.paths.vae_checkpoints) == ["step-000010"], step
    assert not weights.exists()

    killed = run_stage("train_vae", params_file, "kill-in-checkpoint:20")
    assert killed.returncode == -signal.SIGKILL
    # The half-written checkpoint is a hidden temporary folder: never a `step-*` folder that could be loaded.
    assert step_folders(params.paths.vae_checkpoints)[-1] == "step-000010"
    (partial,) = [p for p in Path(params.paths.vae_checkpoints).iterdir() if p.name.startswith(".step-000020.tmp")]
    assert not (partial / "state.json").exists()

    stopped = run_stage("train_vae", params_file, "term:25")
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 25" in stopped.stderr and "Traceback" not in stopped.stderr
    # Resumed from step 10, saved step 20 as due, then step 25 on the signal.
    assert step_folders(params.paths.vae_checkpoints) == ["step-000020", "step-000025"]

    resumed = run_stage("train_vae", params_file)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming VAE training from" in resumed.stdout + resumed.stderr
    assert weights.read_bytes() == uninterrupted


@pytest.fixture(scope="module")
def unet_inputs(workspace):
    params = ci_params(workspace)
    cache = LatentCache(params.paths.latents)
    section = params.train_unet
    return unet_config(params, cache), cache, NoiseSchedule(**section.schedule.model_dump()), training_config(section)


def test_ctrl_c_saves_a_checkpoint_at_the_step_boundary_and_the_resumed_run_is_bitwise_equal(unet_inputs, tmp_path):
    config, cache, schedule, hp = unet_inputs
    reference = train_unet(config, cache, schedule, hp, tmp_path / "reference", 0, "cpu")

    def press_ctrl_c(step, total, values):
        if step == 15:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 16") as stopped:
        train_unet(config, cache, schedule, hp, tmp_path / "run", 0, "cpu", on_step=press_ctrl_c)
    assert stopped.value.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's Ctrl-C handling is back
    assert latest_checkpoint(tmp_path / "run").step == 16
    resumed = train_unet(config, cache, schedule, hp, tmp_path / "run", 0, "cpu")
    for name, value in reference.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[name]), name


def nan_at_calls(monkeypatch, calls: set[int]) -> None:
    """UNet.forward returns NaN on these (1-based) calls in train mode: a loss that blows up at known steps (the
    validations, in eval mode, are not counted)."""
    forward, count = UNet.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if not self.training:
            return out
        count[0] += 1
        return out * float("nan") if count[0] in calls else out

    monkeypatch.setattr(UNet, "forward", poisoned)


def all_checkpoint_tensors_finite(directory: Path) -> bool:
    files = list(directory.glob("step-*/tensors.safetensors"))
    assert files
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values() if t.is_floating_point())


def test_a_nan_loss_stops_training_naming_the_step_the_rows_and_the_checkpoint(unet_inputs, tmp_path, monkeypatch):
    config, cache, schedule, hp = unet_inputs
    nan_at_calls(monkeypatch, {17})
    with pytest.raises(NonFiniteLoss) as stopped:
        train_unet(config, cache, schedule, hp, tmp_path, 0, "cpu")
    message = str(stopped.value)
    assert "step 17" in message and "nan" in message
    assert str(tmp_path / "step-000010") in message and "nonfinite_skips" in message
    report = json.loads((tmp_path / "nonfinite-step-000017.json").read_text())
    assert report["step"] == 17 and len(report["rows"]) == hp.batch_size
    train_ids = {i for batch in cache.iter_batches("train", 64) for i in batch.id}
    assert set(report["rows"]) <= train_ids
    assert report["rows"][0][:12] in message
    assert [c.name for c in sorted(tmp_path.glob("step-*"))] == ["step-000010"]
    assert all_checkpoint_tensors_finite(tmp_path)


def test_allowed_skips_are_counted_and_nothing_non_finite_is_kept(unet_inputs, tmp_path, monkeypatch):
    config, cache, schedule, hp = unet_inputs
    nan_at_calls(monkeypatch, {5, 12})
    result = train_unet(config, cache, schedule, dataclasses.replace(hp, nonfinite_skips=2), tmp_path, 0, "cpu")
    assert result.metrics["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in result.ema.parameters())
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert all_checkpoint_tensors_finite(tmp_path)
    state = json.loads((tmp_path / "step-000030" / "state.json").read_text())
    assert [s["step"] for s in state["extra"]["skipped"]] == [5, 12]


def test_non_finite_weights_are_never_saved(tmp_path):
    model = VAE(VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4))
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="decoder.conv_out.weight"):
        model.save_pretrained(tmp_path / "vae")
    assert not (tmp_path / "vae").exists()
    with pytest.raises(NonFiniteError, match="conv_out.weight"):
        save_checkpoint(tmp_path / "checkpoints", 1, TrainingState(modules={"model": model}))
    assert not list((tmp_path / "checkpoints").glob("*step-*"))


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_newest_checkpoint_is_skipped_by_name_and_training_resumes_from_the_one_before(
    workspace, tmp_path, damage
):
    params = scratch_copy(workspace, tmp_path)
    tensors = Path(params.paths.unet_checkpoints) / "step-000030" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[-100] ^= 0xFF
    tensors.write_bytes(bytes(data))
    shutil.rmtree(params.paths.text2img)
    reporter = RecordingReporter()
    train_unet_stage.run(params, reporter)
    said = "\n".join(reporter.lines)
    assert f"skipping checkpoint {tensors.parent}" in said and "damaged" in said
    assert "resuming UNet training from" in said and "step-000020" in said
    trained = Path(params.paths.text2img) / "unet" / WEIGHTS
    assert trained.read_bytes() == (workspace / "models" / "text2img" / "unet" / WEIGHTS).read_bytes()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_cache_shard_is_named_and_never_trained_on(workspace, tmp_path, capsys):
    params = scratch_copy(workspace, tmp_path)
    shard = sorted(Path(params.paths.latents).glob("*.parquet"))[0]
    flip_a_byte(shard)
    checkpoints = step_folders(params.paths.unet_checkpoints)
    code = train_unet_stage.main(["--params", str(write_params(params, tmp_path / "params.yaml"))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert shard.name in err and "dvc repro cache_latents" in err
    assert step_folders(params.paths.unet_checkpoints) == checkpoints  # nothing trained


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_ingested_shard_is_named_and_never_read(workspace, tmp_path, capsys, damage):
    params = scratch_copy(workspace, tmp_path)
    shard = sorted(Path(params.paths.ingested).glob("*.parquet"))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-200])
    else:
        flip_a_byte(shard)
    params_file = write_params(params, tmp_path / "params.yaml")
    for stage in (train_vae, cache_latents):
        assert stage.main(["--params", str(params_file)]) == 2
        err = capsys.readouterr().err
        assert str(shard) in err and "`dvc repro --force ingest`" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_the_same_params_and_seed_draw_bitwise_equal_samples(workspace, tmp_path):
    params = ci_params(workspace)
    drawn = []
    for name in ("first", "second"):
        paths = params.paths.model_copy(update={"samples": str(tmp_path / name)})
        run_params = params.model_copy(update={"paths": paths})
        sample.run(run_params, RecordingReporter())
        drawn.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert drawn[0] == drawn[1] and "000.png" in drawn[0]
