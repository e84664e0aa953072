"""The training engine: the one loop the VAE, UNet, LoRA and ControlNet train with."""

import copy
import dataclasses
import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ldm.data.order import EpochOrder
from ldm.errors import InputError
from ldm.training import engine
from ldm.training.checkpoint import NonFiniteLoss, latest_checkpoint
from ldm.training.distributed import DataParallel
from ldm.training.engine import TrainingConfig, check_precision, train, update_ema

HP = TrainingConfig(
    max_steps=12, lr=1e-2, weight_decay=0.0, warmup_steps=2, grad_clip=1.0, checkpoint_every=4, keep_checkpoints=5,
    log_every=3,
)
DATA = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
TARGET = DATA @ torch.randn(6, 2, generator=torch.Generator().manual_seed(1))


def tiny_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.GroupNorm(4, 16), nn.SiLU(), nn.Linear(16, 2))


class Regression:
    """A training as the engine takes one: a model, a seeded order and a loss; `poison` steps give NaN."""

    def __init__(self, hp: TrainingConfig, batch_size: int = 8, poison: set[int] = frozenset()):
        self.model, self.hp, self.poison, self.calls = tiny_model(), hp, poison, 0
        self.generator = torch.Generator().manual_seed(2)
        self.order = EpochOrder(len(DATA), batch_size, self.generator)

    def micro_batch(self, net: nn.Module):
        rows = self.order.next_batch()
        self.calls += 1
        loss = nn.functional.mse_loss(net(DATA[rows]), TARGET[rows])
        step = (self.calls - 1) // self.hp.grad_accumulation + 1
        if step in self.poison:
            loss = loss * float("nan")
        return torch.stack([loss, loss.detach() * 2]), [str(r) for r in rows]

    def run(self, directory, **kwargs):
        return train(
            "regression", self.model, self.micro_batch, self.order, self.hp, directory, "fingerprint",
            torch.device("cpu"), terms=("loss", "twice"), generators={"data": self.generator}, **kwargs,
        )


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_the_ema_update_is_averaged_models_and_a_not_ok_step_leaves_it_alone():
    model = tiny_model()
    ours = AveragedModel(model, use_buffers=True)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        reference.update_parameters(model)
        update_ema(ours, model, 0.9, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    before = weights(ours)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ours, model, 0.9, torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_a_non_finite_step_changes_no_weight_and_the_run_goes_on(tmp_path):
    hp = dataclasses.replace(HP, nonfinite_skips=1, ema_decay=0.8)
    training, seen = Regression(hp, poison={5}), {}
    result = training.run(tmp_path, validate=lambda step, ema: seen.update({step: weights(training.model)}),
                          validate_every=1)
    assert all(torch.equal(seen[4][k], seen[5][k]) for k in seen[4])  # step 5 was skipped on the device
    assert not all(torch.equal(seen[5][k], seen[6][k]) for k in seen[5])
    assert [s["step"] for s in result.skipped] == [5]
    assert all(torch.isfinite(v).all() for v in result.ema.state_dict().values() if v.is_floating_point())
    # Every term of a row is the mean over the steps that counted: the skipped step's NaN is in none.
    assert [r["step"] for r in result.history] == [3, 6, 9, 12]
    assert all(r["twice"] == pytest.approx(2 * r["loss"]) for r in result.history)


def test_the_host_reads_the_step_flags_only_at_logging_and_checkpoint_steps(tmp_path, monkeypatch):
    settled, settle = [], engine._settle

    def counting(run, unchecked, fp16):
        if unchecked:
            settled.append([step for step, _, _ in unchecked])
        return settle(run, unchecked, fp16)

    monkeypatch.setattr(engine, "_settle", counting)
    Regression(HP).run(tmp_path)
    # log_every 3, checkpoint_every 4, 12 steps: the host waits 6 times, not 12.
    assert settled == [[1, 2, 3], [4], [5, 6], [7, 8], [9], [10, 11, 12]]


def test_too_many_non_finite_steps_stop_before_any_later_checkpoint(tmp_path):
    training = Regression(HP, poison={5})
    with pytest.raises(NonFiniteLoss, match="step 5") as stopped:
        training.run(tmp_path)
    assert str(tmp_path / "step-000004") in str(stopped.value)
    assert latest_checkpoint(tmp_path).step == 4  # the check at step 6 (logging) came before checkpoint 8


def test_accumulated_micro_batches_make_the_step_of_their_union(tmp_path):
    whole = Regression(dataclasses.replace(HP, max_steps=4), batch_size=16)
    halves = Regression(dataclasses.replace(HP, max_steps=4, grad_accumulation=2), batch_size=8)
    halves.order = EpochOrder(len(DATA), 16, halves.generator)

    def halves_of_the_same_batch(net, cache=[]):
        if not cache:
            rows = halves.order.next_batch()
            cache.extend([rows[8:], rows[:8]])
        rows = cache.pop()
        loss = nn.functional.mse_loss(net(DATA[rows]), TARGET[rows])
        return torch.stack([loss, loss.detach() * 2]), [str(r) for r in rows]

    halves.micro_batch = halves_of_the_same_batch
    a, b = whole.run(tmp_path / "whole"), halves.run(tmp_path / "halves")
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(halves.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_resume_bit_for_bit(tmp_path, precision):
    hp = dataclasses.replace(HP, precision=precision, ema_decay=0.9)
    reference = Regression(hp)
    reference.run(tmp_path / "reference")

    class Stop(Exception):
        pass

    def stop_at_6(step, total, values):
        if step == 6:
            raise Stop

    first = Regression(hp)
    with pytest.raises(Stop):
        first.run(tmp_path / "resumed", on_step=stop_at_6)
    assert latest_checkpoint(tmp_path / "resumed").step == 4
    second = Regression(hp)
    result = second.run(tmp_path / "resumed")
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in second.model.state_dict().items())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    if precision == "fp16":
        state = (tmp_path / "resumed" / "step-000012" / "state.json").read_text()
        assert "grad_scaler" in state


def test_an_unknown_precision_is_refused():
    with pytest.raises(InputError, match="precision='fp8'"):
        check_precision("fp8", torch.device("cpu"))


def test_under_ddp_accumulated_micro_batches_all_reduce_once_per_step(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        reductions = []

        def count_and_reduce(state, bucket):
            reductions.append(1)
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        def ddp(self, module):
            net = nn.parallel.DistributedDataParallel(module)
            net.register_comm_hook(None, count_and_reduce)
            return net

        monkeypatch.setattr(DataParallel, "wrap", ddp)
        hp = dataclasses.replace(HP, max_steps=3, grad_accumulation=4)
        Regression(hp).run(tmp_path, ranks=DataParallel(0, 1))
        assert len(reductions) == 3  # one per step; 12 without no_sync
    finally:
        dist.destroy_process_group()


def test_a_trainable_subset_is_what_trains_and_what_checkpoints_hold(tmp_path):
    training = Regression(HP)
    head = training.model[3]
    frozen = copy.deepcopy(training.model[0].state_dict())
    training.model[0].requires_grad_(False)
    training.run(tmp_path, trainable=head)
    assert all(torch.equal(v, training.model[0].state_dict()[k]) for k, v in frozen.items())
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "step-000012" / "tensors.safetensors")
    assert {k.split("/")[1] for k in saved if k.startswith("modules/")} == {"model"}
    assert {k for k in saved if k.startswith("modules/model/")} == {"modules/model/weight", "modules/model/bias"}


def test_raising_max_steps_extends_a_finished_run_on_the_longer_schedule(tmp_path):
    finished = Regression(HP)
    finished.run(tmp_path)
    assert engine.trajectory(HP) == engine.trajectory(dataclasses.replace(HP, max_steps=20))  # one run's fingerprint
    longer = dataclasses.replace(HP, max_steps=20)
    extended, messages = Regression(longer), []
    trained = extended.run(tmp_path, log=messages.append)
    assert any("resuming regression training" in m and "step 12 of 20" in m for m in messages), messages
    assert any("max_steps changed from 12 to 20" in m for m in messages), messages
    assert [row["step"] for row in trained.history] == [3, 6, 9, 12, 15, 18, 20]
    # Steps 13-15 ran on the 20-step cosine: the row of step 15 holds the rate of its last step (14 done).
    factor = 0.5 * (1 + math.cos(math.pi * (14 - HP.warmup_steps) / (20 - HP.warmup_steps)))
    assert trained.history[4]["lr"] == pytest.approx(HP.lr * factor)
    assert latest_checkpoint(tmp_path).step == 20


def test_lowering_max_steps_below_the_newest_checkpoint_is_refused_and_keeps_it(tmp_path):
    Regression(HP).run(tmp_path)
    with pytest.raises(InputError, match=r"step 12, past max_steps 8: a run can be extended, not shortened"):
        Regression(dataclasses.replace(HP, max_steps=8)).run(tmp_path)
    assert latest_checkpoint(tmp_path).step == 12


def test_validations_are_kept_in_the_checkpoints_and_the_last_is_taken_again_after_a_resume_at_the_end(tmp_path):
    calls = []

    def validate(step, model):
        calls.append(step)
        return {"score": float(step) / 100}

    first = Regression(HP).run(tmp_path, validate=validate, validate_every=5)
    assert calls == [5, 10, 12]
    assert first.validations == [{"step": 5, "score": 0.05}, {"step": 10, "score": 0.1}, {"step": 12, "score": 0.12}]
    again = Regression(HP).run(tmp_path, validate=validate, validate_every=5)
    assert calls[3:] == [12] and again.validations == first.validations
    extended = Regression(dataclasses.replace(HP, max_steps=16)).run(tmp_path, validate=validate, validate_every=5)
    assert calls[4:] == [15, 16]
    assert [v["step"] for v in extended.validations] == [5, 10, 12, 15, 16]
