"""ldm.diffusion.schedule: the forward process, against diffusers' betas and against its closed form."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion.names import BETA_SCHEDULES, PREDICTION_TYPES
from ldm.diffusion.schedule import NoiseSchedule

T = 1000


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_alphas_cumprod_equal_diffusers(beta_schedule):
    ours = NoiseSchedule(beta_schedule=beta_schedule)
    theirs = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_sigmas_are_the_ve_view_of_alphas_cumprod():
    schedule = NoiseSchedule()
    abar = schedule.alphas_cumprod.double()
    torch.testing.assert_close(schedule.sigmas.double(), ((1 - abar) / abar).sqrt(), rtol=1e-6, atol=0)


def test_add_noise_has_the_closed_form_mean_and_variance_at_every_timestep():
    """x_t | x0 ~ N(sqrt(abar) x0, 1 - abar), checked at all T timesteps at once with N draws each.

    The sample mean has standard error sqrt((1 - abar) / N) and the sample variance sqrt(2 / (N - 1)) (1 - abar)
    for Gaussian draws; both must land within 5 standard errors at every timestep (with 1000 timesteps, a
    false alarm per run has probability about 1000 * 6e-7 per statistic, and the seed is fixed anyway).
    """
    schedule = NoiseSchedule()
    n = 4096
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(T)
    x0 = torch.linspace(-1, 1, T).unsqueeze(1).expand(T, n)  # a different clean value per timestep
    x_t = schedule.add_noise(x0, torch.randn(T, n, generator=generator), t)  # (T, N)
    abar = schedule.alphas_cumprod.double()
    mean, var = x_t.double().mean(dim=1), x_t.double().var(dim=1)
    expected_mean, expected_var = abar.sqrt() * x0[:, 0].double(), 1 - abar
    assert ((mean - expected_mean).abs() <= 5 * (expected_var / n).sqrt()).all()
    assert ((var - expected_var).abs() <= 5 * math.sqrt(2 / (n - 1)) * expected_var).all()


def test_add_noise_and_velocity_equal_diffusers():
    schedule = NoiseSchedule()
    theirs = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 4, 6, 6, generator=generator), torch.randn(8, 4, 6, 6, generator=generator)
    t = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    assert torch.equal(schedule.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    assert torch.equal(schedule.velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_round_trip(prediction_type):
    """The training target of (x0, noise) at x_t converts back to x0 and to the noise, at every timestep.

    Tolerance: the conversions divide by sqrt(abar) >= 0.068 (x0 from epsilon at t = 999) or by
    sqrt(1 - abar) >= 0.029 (noise from x0 at t = 0), which magnify float32 rounding (~1e-7 of |x| <= 5)
    up to about 35 times.
    """
    schedule = NoiseSchedule(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(T, 4, 4, 4, generator=generator), torch.randn(T, 4, 4, 4, generator=generator)
    t = torch.arange(T)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t)
    torch.testing.assert_close(schedule.predict_x0(target, x_t, t), x0, rtol=0, atol=3e-5)
    torch.testing.assert_close(schedule.predict_eps(target, x_t, t), noise, rtol=0, atol=3e-5)


def test_training_targets_are_noise_velocity_and_sample():
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 3, 2, 2, generator=generator), torch.randn(4, 3, 2, 2, generator=generator)
    t = torch.tensor([3, 300, 600, 900])
    assert torch.equal(NoiseSchedule(prediction_type="epsilon").training_target(x0, noise, t), noise)
    assert torch.equal(NoiseSchedule(prediction_type="sample").training_target(x0, noise, t), x0)
    v_schedule = NoiseSchedule(prediction_type="v_prediction")
    abar = v_schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v_schedule.training_target(x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0)


def test_int_and_tensor_timesteps_agree():
    schedule = NoiseSchedule(prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(1, 4, 3, 3, generator=generator), torch.randn(1, 4, 3, 3, generator=generator)
    for t in (0, 421, 999):
        assert torch.equal(schedule.add_noise(x0, noise, t), schedule.add_noise(x0, noise, torch.tensor([t])))
        assert torch.equal(schedule.predict_x0(noise, x0, t), schedule.predict_x0(noise, x0, torch.tensor([t])))


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_snr_is_abar_over_one_minus_abar_and_decreasing(beta_schedule):
    schedule = NoiseSchedule(beta_schedule=beta_schedule)
    t = torch.arange(T)
    abar = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.snr(t), abar / (1 - abar))
    assert (schedule.snr(t)[1:] < schedule.snr(t)[:-1]).all()
    assert schedule.snr(500) == schedule.snr(t)[500]


def test_dict_round_trip_through_json():
    schedule = NoiseSchedule(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction")
    config = json.loads(json.dumps(schedule.to_dict()))
    assert config == {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "v_prediction"}
    restored = NoiseSchedule.from_dict(config)
    assert restored == schedule
    assert torch.equal(restored.alphas_cumprod, schedule.alphas_cumprod)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NoiseSchedule(beta_schedule="cosine"), r"beta_schedule='cosine'.*'scaled_linear', 'squaredcos_cap_v2'"),
        (lambda: NoiseSchedule(prediction_type="eps"), r"prediction_type='eps'.*'epsilon', 'v_prediction', 'sample'"),
        (lambda: NoiseSchedule(num_train_timesteps=0), r"num_train_timesteps=0"),
        (lambda: NoiseSchedule.from_dict({"beta_schedule": "linear", "clip_sample": False}), r"unknown.*'clip_sample'"),
    ],
)
def test_bad_config_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
