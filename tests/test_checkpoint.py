"""Training checkpoints: exact round trips, keep-last-K, and skipping what is incomplete or damaged."""

import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from ldm.training.checkpoint import (
    STATE_NAME,
    TENSORS_NAME,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    resume_point,
    run_fingerprint,
    save_checkpoint,
)
from ldm.training.optim import warmup_cosine


def make_state(seed: int = 0) -> TrainingState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 1))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return TrainingState(
        modules={"model": model, "ema": ema},
        optimizers={"optimizer": optimizer},
        schedulers={"lr": warmup_cosine(optimizer, warmup_steps=3, total_steps=20)},
        generators={"data": torch.Generator().manual_seed(seed + 1)},
    )


def train_steps(state: TrainingState, steps: int) -> list[float]:
    """Steps whose data, noise and global draws all come from RNGs the checkpoint must restore."""
    model, ema = state.modules["model"], state.modules["ema"]
    optimizer, schedule = state.optimizers["optimizer"], state.schedulers["lr"]
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=state.generators["data"])
        noise = torch.randn(x.shape) * 0.1 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = (model(x + noise) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update_parameters(model)
        losses.append(loss.item())
    return losses


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_continues_bit_for_bit(tmp_path):
    state = make_state()
    train_steps(state, 5)
    save_checkpoint(tmp_path, 5, state, extra={"epoch": 1, "position": 12})
    expected = train_steps(state, 5)

    fresh = make_state(seed=123)
    found = latest_checkpoint(tmp_path)
    loaded = load_checkpoint(found.path, fresh)
    assert (loaded.step, loaded.extra) == (5, {"epoch": 1, "position": 12})
    # Tuples (AdamW's betas) come back as tuples, not as JSON's lists.
    assert fresh.optimizers["optimizer"].state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)

    assert train_steps(fresh, 5) == expected
    assert_same_tensors(fresh.modules["model"].state_dict(), state.modules["model"].state_dict())
    assert_same_tensors(fresh.modules["ema"].state_dict(), state.modules["ema"].state_dict())
    assert fresh.schedulers["lr"].state_dict() == state.schedulers["lr"].state_dict()
    assert torch.equal(fresh.generators["data"].get_state(), state.generators["data"].get_state())
    a, b = fresh.optimizers["optimizer"].state_dict(), state.optimizers["optimizer"].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index in b["state"]:
        assert_same_tensors(a["state"][index], b["state"][index])


def test_global_rngs_are_restored(tmp_path):
    state = make_state()
    save_checkpoint(tmp_path, 1, state)
    expected = (torch.rand(3), random.random(), np.random.rand())
    load_checkpoint(tmp_path / "step-000001", state)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_folder_holds_only_safetensors_and_json_and_loads_without_pickle(tmp_path, monkeypatch):
    state = make_state()
    train_steps(state, 2)
    path = save_checkpoint(tmp_path, 2, state)
    assert sorted(p.name for p in path.iterdir()) == [STATE_NAME, TENSORS_NAME]

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must load without pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    assert load_checkpoint(path, make_state()).step == 2


def test_keeps_the_newest_k(tmp_path):
    state = make_state()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]


def test_saving_an_earlier_step_drops_the_abandoned_later_ones(tmp_path):
    state = make_state()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, state, keep=3)
    save_checkpoint(tmp_path, 3, state, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_state_json"])
def test_latest_skips_temporary_and_damaged_checkpoints(tmp_path, damage):
    state = make_state()
    save_checkpoint(tmp_path, 1, state)
    newest = save_checkpoint(tmp_path, 2, state)
    # What a save killed midway leaves: a hidden temporary folder, never a step-* one.
    leftover = tmp_path / ".step-000003.tmp-999"
    leftover.mkdir()
    (leftover / TENSORS_NAME).write_bytes(b"partial")

    tensors = newest / TENSORS_NAME
    data = bytearray(tensors.read_bytes())
    if damage == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data[-10] ^= 0xFF  # inside the last tensor's data: safetensors alone would load it happily
        tensors.write_bytes(data)
    else:
        (newest / STATE_NAME).unlink()

    messages = []
    found = latest_checkpoint(tmp_path, log=messages.append)
    assert found.step == 1
    assert len(messages) == 1 and "step-000002" in messages[0]
    with pytest.raises(ValueError, match="step-000002"):
        load_checkpoint(newest, make_state())


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_resume_point_discards_another_runs_checkpoints(tmp_path):
    state = make_state()
    ours, theirs = run_fingerprint(lr=1e-3, seed=0), run_fingerprint(lr=2e-3, seed=0)
    save_checkpoint(tmp_path, 4, state, extra={"fingerprint": ours})
    assert resume_point(tmp_path, ours).step == 4

    messages = []
    assert resume_point(tmp_path, theirs, log=messages.append) is None
    assert "other training params" in messages[0]
    assert list(tmp_path.iterdir()) == []


def test_names_must_match_between_save_and_load(tmp_path):
    state = make_state()
    path = save_checkpoint(tmp_path, 1, state)
    renamed = TrainingState(modules={"unet": state.modules["model"]}, optimizers=state.optimizers)
    with pytest.raises(ValueError, match="same names"):
        load_checkpoint(path, renamed)
