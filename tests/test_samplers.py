"""ldm.diffusion.samplers against diffusers' schedulers as the oracle.

Each case runs the same stand-in network from the same seeded noise through `ldm.diffusion.samplers.sample` and through
a diffusers loop over the matching scheduler, with one generator feeding the initial noise and then every
stochastic step (as the text-to-image pipeline does). Compared: every network input (the whole trajectory
in the network's VP variables, and the timesteps), the final latents, and the generator state afterwards
(the same number of draws). The samplers repeat diffusers' float32 arithmetic, so the runs agree to the
last bit today; the stated tolerance leaves room only for harmless reorderings.
"""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

from ldm.diffusion.names import KARRAS_SAMPLERS, SAMPLERS, SPACINGS
from ldm.diffusion.samplers import discrete_timesteps, dpm_sigmas, euler_sigmas, sample, spaced_timesteps
from ldm.diffusion.schedule import NoiseSchedule

# diffusers' schedulers call np.array on torch tensors, which numpy 2 flags on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

RTOL = ATOL = 1e-5
SHAPE = (2, 4, 8, 8)
SEED = 1234

SCHEDULERS = {
    "ddpm": (DDPMScheduler, {"clip_sample": False}),
    "ddim": (DDIMScheduler, {"clip_sample": False}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
}


class FakeUNet:
    """A smooth nonlinear stand-in for the UNet that records its inputs.

    Roughly what a trained epsilon network does at high noise (output ~ x_t), so samples stay O(1) for every
    prediction type instead of blowing up through the 1 / sqrt(abar) of early x0 estimates.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # diffusers passes a 0-d int64 or float32 timestep, ldm a float32 (B,): compare them as float32 (B,).
        t = torch.as_tensor(t).to(torch.float32).reshape(-1).expand(x.shape[0])
        self.calls.append((x.clone(), t.clone()))
        s = (t / 1000).view(-1, 1, 1, 1)
        return 0.9 * x * s + 0.1 * torch.tanh(2 * x) + 0.05 * torch.sin(3 * x + 5 * s)


def run_diffusers(sampler, steps, spacing="leading", prediction_type="epsilon", karras=False, eta=0.0,
                  steps_offset=0, beta_schedule="scaled_linear"):
    cls, options = SCHEDULERS[sampler]
    if karras:
        options = {**options, "use_karras_sigmas": True}
    scheduler = cls(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
        prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=steps_offset, **options,
    )
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(SEED)
    unet = FakeUNet()
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if sampler == "ddim":
        step_options["eta"] = eta
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(output, t, latents, **step_options).prev_sample
    return latents, unet.calls, generator


def run_ldm(sampler, steps, spacing="leading", prediction_type="epsilon", karras=False, eta=0.0,
            steps_offset=0, beta_schedule="scaled_linear"):
    schedule = NoiseSchedule(beta_schedule=beta_schedule, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(SEED)
    unet = FakeUNet()
    noise = torch.randn(SHAPE, generator=generator)
    latents = sample(unet, noise, schedule, sampler=sampler, steps=steps, spacing=spacing, karras=karras, eta=eta,
                     steps_offset=steps_offset, generator=generator)
    return latents, unet.calls, generator


def assert_same_run(**case):
    ours, ours_calls, ours_generator = run_ldm(**case)
    theirs, their_calls, their_generator = run_diffusers(**case)
    assert len(ours_calls) == len(their_calls), "different number of network evaluations"
    for i, ((x, t), (x_ref, t_ref)) in enumerate(zip(ours_calls, their_calls)):
        torch.testing.assert_close(t, t_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"timestep of call {i}: {m}")
        torch.testing.assert_close(x, x_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"network input of call {i}: {m}")
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL, msg=lambda m: f"final latents: {m}")
    assert torch.isfinite(ours).all()
    assert torch.equal(ours_generator.get_state(), their_generator.get_state()), "different random draws"


MATRIX = [
    (sampler, spacing, steps, prediction_type, karras)
    for sampler, spacing, steps, prediction_type, karras in itertools.product(
        SAMPLERS, SPACINGS, (10, 25, 50), ("epsilon", "v_prediction"), (False, True)
    )
    if not karras or sampler in KARRAS_SAMPLERS
]


@pytest.mark.parametrize("sampler,spacing,steps,prediction_type,karras", MATRIX)
def test_matches_diffusers(sampler, spacing, steps, prediction_type, karras):
    assert_same_run(sampler=sampler, spacing=spacing, steps=steps, prediction_type=prediction_type, karras=karras)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_noise_matches_diffusers(eta, spacing, steps, prediction_type):
    assert_same_run(sampler="ddim", eta=eta, spacing=spacing, steps=steps, prediction_type=prediction_type)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_other_beta_schedules_match_diffusers(sampler, beta_schedule, spacing):
    assert_same_run(sampler=sampler, beta_schedule=beta_schedule, spacing=spacing, steps=20)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_karras_with_other_beta_schedules_matches_diffusers(sampler, beta_schedule):
    # With the cosine schedule most Karras sigmas fall between t = 998 and 999 (sigma 642 -> 20291), so
    # diffusers' DPM-Solver repeats timestep 998 at the start and, taking a repeated first timestep for a
    # resumed run, starts one step late and fails at the end; it runs for 3 steps or fewer only.
    steps = 3 if sampler == "dpmpp_2m" and beta_schedule == "squaredcos_cap_v2" else 20
    assert_same_run(sampler=sampler, beta_schedule=beta_schedule, karras=True, steps=steps)


# diffusers' PNDM and Euler ancestral schedulers do not offer prediction_type="sample".
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_sample_prediction_matches_diffusers(sampler, spacing):
    assert_same_run(sampler=sampler, prediction_type="sample", spacing=spacing, steps=25)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_steps_offset_matches_diffusers(sampler, prediction_type):
    # Stable Diffusion's scheduler configs use steps_offset=1 with leading spacing.
    assert_same_run(sampler=sampler, prediction_type=prediction_type, steps_offset=1, steps=25)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_few_steps_match_diffusers(sampler, steps):
    assert_same_run(sampler=sampler, steps=steps, spacing="trailing")


# --- Schedules on their own, over many step counts -----------------------------------------------------------


def _overshoots(steps: int) -> bool:
    """Step counts where np.arange gives diffusers' trailing schedule an extra, bogus timestep -1."""
    return len(np.arange(1000, 0, -1000 / steps)) != steps


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_euler_sigmas_match_diffusers(spacing, karras):
    schedule = NoiseSchedule()
    for steps in range(1, 121):
        if spacing == "trailing" and _overshoots(steps):
            continue
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing=spacing, use_karras_sigmas=karras)
        scheduler.set_timesteps(steps)
        sigmas, timesteps = euler_sigmas(schedule, steps, spacing, karras=karras)
        assert torch.equal(sigmas, scheduler.sigmas), steps
        assert torch.equal(timesteps, scheduler.timesteps), steps


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_sigmas_match_diffusers(spacing, karras):
    schedule = NoiseSchedule()
    for steps in range(1, 121):
        if spacing == "trailing" and _overshoots(steps) and not karras:
            continue
        scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing=spacing, use_karras_sigmas=karras)
        scheduler.set_timesteps(steps)
        sigmas, timesteps = dpm_sigmas(schedule, steps, spacing, karras=karras)
        assert torch.equal(sigmas, scheduler.sigmas), steps
        assert torch.equal(timesteps, scheduler.timesteps.float()), steps


@pytest.mark.parametrize("spacing", SPACINGS)
def test_discrete_timesteps_match_diffusers(spacing):
    schedule = NoiseSchedule()
    for steps in range(1, 121):
        if spacing == "trailing" and _overshoots(steps):
            continue
        scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        scheduler.set_timesteps(steps)
        ours = discrete_timesteps(schedule, steps, spacing, steps_offset=1 if spacing == "leading" else 0)
        assert ours == scheduler.timesteps.tolist(), steps


def test_trailing_overshoot_is_dropped():
    """diffusers appends a timestep -1 for 61 trailing steps (an np.arange rounding artefact); ldm does not."""
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(61)
    assert len(scheduler.timesteps) == 62 and scheduler.timesteps[-1] == -1
    ours = spaced_timesteps(1000, 61, "trailing")
    assert len(ours) == 61 and ours[-1] >= 0
    assert ours.astype(np.int64).tolist() == scheduler.timesteps[:61].tolist()


# --- The contract of sample() -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_network_sees_float32_batch_timesteps_and_callback_counts_steps(sampler):
    seen, progress = [], []

    def network(x, t):
        seen.append((t.dtype, tuple(t.shape)))
        return 0.5 * x

    latents = sample(network, torch.randn(SHAPE), NoiseSchedule(), sampler=sampler, steps=5,
                     callback=lambda i, total: progress.append((i, total)))
    assert latents.shape == SHAPE
    assert set(seen) == {(torch.float32, (SHAPE[0],))}
    total = 6 if sampler == "pndm" else 5  # PNDM's warm-up costs one more evaluation
    assert progress == [(i, total) for i in range(total)]


def test_same_seed_same_latents_different_seed_different_latents():
    def network(x, t):
        return 0.5 * torch.tanh(x)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(SHAPE, generator=generator)
        return sample(network, noise, NoiseSchedule(), sampler="euler_ancestral", steps=5, generator=generator)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sampler": "lms"}, r"sampler='lms'.*'ddpm', 'ddim'"),
        ({"spacing": "uniform"}, r"spacing='uniform'.*'leading', 'trailing', 'linspace'"),
        ({"sampler": "ddim", "karras": True}, r"karras=True.*sampler='ddim'.*'euler', 'heun', 'dpmpp_2m'"),
        ({"sampler": "euler_ancestral", "karras": True}, r"karras=True.*'euler_ancestral'"),
        ({"steps": 0}, r"steps=0.*1\.\.1000"),
        ({"steps": 1001}, r"steps=1001.*1\.\.1000"),
        ({"sampler": "euler", "eta": 1.0}, r"eta=1\.0.*'ddim'"),
        ({"sampler": "ddim", "eta": -0.5}, r"eta=-0\.5"),
        ({"sampler": "ddim", "steps_offset": 100, "steps": 10}, r"steps_offset=100"),
        ({"sampler": "dpmpp_2m", "steps": 1000, "spacing": "leading"}, r"repeats a noise level"),
    ],
)
def test_bad_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: x, torch.randn(SHAPE), NoiseSchedule(), **options)


def test_pndm_rejects_sample_prediction():
    with pytest.raises(ValueError, match=r"sampler='pndm'.*'epsilon' or 'v_prediction'"):
        sample(lambda x, t: x, torch.randn(SHAPE), NoiseSchedule(prediction_type="sample"), sampler="pndm")


def _init_latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED + 1)).clamp(-2, 2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("spacing,strength", [("leading", 0.5), ("trailing", 0.75), ("linspace", 0.3)])
def test_img2img_matches_diffusers(sampler, spacing, strength):
    """diffusers' img2img: get_timesteps drops the first steps - int(steps * strength) (times the scheduler's
    order), set_begin_index, add_noise at the first remaining timestep, then the usual loop."""
    steps, init = 10, _init_latents()
    cls, options = SCHEDULERS[sampler]
    scheduler = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="v_prediction", timestep_spacing=spacing, **options)
    scheduler.set_timesteps(steps)
    start = steps - int(steps * strength)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(SHAPE, generator=generator)
    latents = scheduler.add_noise(init, noise, timesteps[:1])
    theirs_unet = FakeUNet()
    step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        latents = scheduler.step(theirs_unet(scheduler.scale_model_input(latents, t), t), t, latents,
                                 **step_options).prev_sample

    ours_generator = torch.Generator().manual_seed(SEED)
    ours_unet = FakeUNet()
    ours = sample(ours_unet, torch.randn(SHAPE, generator=ours_generator), NoiseSchedule(prediction_type="v_prediction"),
                  sampler=sampler, steps=steps, spacing=spacing, generator=ours_generator, init=init, strength=strength)
    assert len(ours_unet.calls) == len(theirs_unet.calls) == len(timesteps)
    for (x, t), (x_ref, t_ref) in zip(ours_unet.calls, theirs_unet.calls):
        torch.testing.assert_close(t, t_ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(x, x_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours, latents, rtol=RTOL, atol=ATOL)
    assert torch.equal(ours_generator.get_state(), generator.get_state())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_strength_ends(sampler):
    """Strength 0 runs no step and returns the input; strength 1 ignores it: the text-to-image sample."""
    init, schedule = _init_latents(), NoiseSchedule(prediction_type="v_prediction")

    def run(**options):
        unet = FakeUNet()
        generator = torch.Generator().manual_seed(SEED)
        out = sample(unet, torch.randn(SHAPE, generator=generator), schedule, sampler=sampler, steps=8,
                     generator=generator, **options)
        return out, len(unet.calls)

    kept, calls = run(init=init, strength=0.0)
    assert calls == 0 and torch.equal(kept, init)
    assert torch.equal(run(init=init, strength=1.0)[0], run()[0])
    half, calls = run(init=init, strength=0.5)
    assert calls == 4 + (sampler == "pndm") + 3 * (sampler == "heun")  # heun: 2 evaluations a step but the last
    # Half the schedule leaves the input's imprint; the full one starts from noise alone.
    assert (half - init).abs().mean() < (run()[0] - init).abs().mean()
    with pytest.raises(ValueError, match="strength=1.5 is out of range"):
        run(init=init, strength=1.5)
