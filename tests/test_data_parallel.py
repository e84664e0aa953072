"""Data-parallel training under torchrun: two CPU processes (gloo) make the run that one process makes on the
same global batches, and only rank 0 writes checkpoints and outputs.

The stages run as users launch them, `torchrun --standalone --nproc-per-node 2 -m stages.<stage>`, on the ci
profile, against the same stage run in one process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.data.latent_cache import LatentCache
from ldm.data.order import CacheOrder
from ldm.training.distributed import DataParallel
from ldm.training.unet import data_lanes
from stages import cache_latents, ingest, train_unet, train_vae
from stages.params import Params
from tests.ci_stages import RecordingReporter, ci_params, write_params

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "fault_injection"
WEIGHTS = "model.safetensors"
# Two ranks sum their gradients in another order than one process and run their kernels on half batches:
# float rounding, which 30 Adam steps carry into weights of size ~1 (measured: 2.3e-5 VAE, 2.6e-7 UNet).
TOLERANCE = {"rtol": 1e-4, "atol": 2e-4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Params:
    """Ingested data, a single-process VAE and a latent cache in 16-row groups (14 of them: enough to deal to lanes)."""
    params = ci_params(tmp_path_factory.mktemp("data-parallel"))
    params = params.model_copy(
        update={"cache_latents": params.cache_latents.model_copy(update={"rows_per_group": 16})}
    )
    for stage in (ingest, train_vae, cache_latents):
        stage.run(params, RecordingReporter())
    return params


OUTPUTS = {"train_vae": ("vae", "vae_checkpoints"), "train_unet": ("text2img", "unet_checkpoints")}


def with_outputs(params: Params, stage: str, name: str, **train_unet_changes) -> Params:
    """`params` writing `stage`'s outputs and checkpoints under `name`, with train_unet's fields changed."""
    root = Path(params.paths.metrics).parent / name
    moved = {path: str(root / path) for path in (*OUTPUTS[stage], "metrics", "plots")}
    return params.model_copy(update={
        "paths": params.paths.model_copy(update=moved),
        "train_unet": params.train_unet.model_copy(update=train_unet_changes),
    })


def torchrun(stage: str, params: Params, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", f"stages.{stage}", "--params", str(write_params(params, tmp_path / f"{stage}-params.yaml"))],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FAULTS), **env},
        capture_output=True, text=True, timeout=300,
    )


def succeeded(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / WEIGHTS))


def assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_gloo_ranks_train_the_vae_one_process_trains_and_stop_together_on_a_signal_to_one(workspace, tmp_path):
    parallel = with_outputs(workspace, "train_vae", "vae-2-ranks")
    stopped = torchrun("train_vae", parallel, tmp_path, LDM_FAULT="term:13", LDM_FAULT_RANK="1")
    # SIGTERM reached rank 1 alone; both ranks ended after step 13, once rank 0 had saved its checkpoint.
    assert stopped.returncode != 0
    assert stopped.stderr.count("VAE training stopped by SIGTERM after step 13 of 30") == 2, stopped.stderr[-3000:]
    checkpoints = Path(parallel.paths.vae_checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000010", "step-000013"]

    done = succeeded(torchrun("train_vae", parallel, tmp_path))
    assert "resuming VAE training from" in done.stderr and "(step 13 of 30)" in done.stderr
    assert_weights_close(weights(parallel.paths.vae), weights(workspace.paths.vae))
    # Rank 0 alone wrote the checkpoints and the model, and summed up the run; both ranks trained.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000020", "step-000030"]
    assert done.stdout.count("train_vae: val PSNR") == 1
    assert "rank 0 of 2" in done.stderr and "rank 1 of 2" in done.stderr


def test_two_gloo_ranks_train_the_unet_one_process_trains_reading_their_own_cache_shards(workspace, tmp_path):
    cache = LatentCache(workspace.paths.latents)
    assert cache.num_rows("train", 0, 2) > 0 and cache.num_rows("train", 1, 2) > 0
    parallel = with_outputs(workspace, "train_unet", "unet-2-ranks")  # data_lanes null: one lane per rank
    single = with_outputs(workspace, "train_unet", "unet-1-process", data_lanes=2)
    other_order = with_outputs(workspace, "train_unet", "unet-1-lane", data_lanes=1)
    succeeded(torchrun("train_unet", parallel, tmp_path))
    for params in (single, other_order):
        train_unet.run(params, RecordingReporter())

    model = Path(parallel.paths.text2img)
    for folder in ("unet", "unet_raw"):  # the EMA weights and the raw ones
        assert_weights_close(weights(model / folder), weights(Path(single.paths.text2img) / folder))
    # The comparison can tell runs apart: the same steps on batches drawn from one lane end far from both.
    reached = weights(model / "unet_raw")
    # (measured: 0.03 against 2.6e-7)
    assert largest_difference(reached, weights(Path(other_order.paths.text2img) / "unet_raw")) > 20 * TOLERANCE["atol"]
    assert sorted(p.name for p in Path(parallel.paths.unet_checkpoints).iterdir()) == ["step-000020", "step-000030"]


def test_lanes_or_batches_that_do_not_split_are_refused_before_training(workspace):
    hp = train_unet.training_config(workspace.train_unet)
    two_ranks = DataParallel(rank=1, world_size=2)
    assert data_lanes(hp, two_ranks) == 2  # null: one lane per rank
    with pytest.raises(ValueError, match="data_lanes 1 does not split over 2 ranks; set data_lanes to a multiple of 2"):
        data_lanes(dataclasses.replace(hp, data_lanes=1), two_ranks)
    with pytest.raises(ValueError, match="batch_size 32 does not split into 3 data lanes"):
        data_lanes(dataclasses.replace(hp, data_lanes=3), DataParallel())
    # Rank 1 of 2 reads the second half of every batch: the rows of lanes 2 and 3 of 4.
    cache = LatentCache(workspace.paths.latents)
    whole = CacheOrder(cache, 32, data_seed=3, lanes=4).next_batch()
    second_half = CacheOrder(cache, 32, data_seed=3, lanes=4, ranks=two_ranks).next_batch()
    assert second_half.id == whole.id[16:]
