"""Samplers: integrate the reverse diffusion from Gaussian noise to clean latents.

In the style of k-diffusion's `sampling.py`: each sampler is one short function, and the noise-level
schedules are separate small functions. Euler, Euler ancestral, Heun and DPM-Solver++(2M) step over a
`Denoiser` (sample -> clean estimate x0) and a decreasing list of sigmas ending at 0. The Euler family
holds the variance-exploding sample x = x0 + sigma * eps, as k-diffusion does; DPM-Solver++ holds the
variance-preserving one x / sqrt(1 + sigma^2), as its paper does, which keeps float32 rounding small when
sigma_max is large (2e4 for the cosine schedule). DDPM, DDIM and PNDM step over the network and the
`NoiseSchedule` in VP form: diffusers moves their samples between timesteps that are not always neighbours
in its own timestep list (see `sample_ddim`, `sample_pndm`), and only the VP form carries such a sample
from one step to the next the way diffusers does.

`sample()` is the entry point. With the same noise, generator and network it returns what a diffusers loop
over the matching scheduler returns (to float32 rounding):

    ddpm: DDPMScheduler(clip_sample=False)            ddim: DDIMScheduler(clip_sample=False), step(eta=eta)
    pndm: PNDMScheduler(skip_prk_steps=True)          euler: EulerDiscreteScheduler
    euler_ancestral: EulerAncestralDiscreteScheduler  heun: HeunDiscreteScheduler
    dpmpp_2m: DPMSolverMultistepScheduler (dpmsolver++, order 2)

and for a flow model (`FlowSchedule`): euler: FlowMatchEulerDiscreteScheduler, heun:
FlowMatchHeunDiscreteScheduler, with `shift` the schedule's shift at the sample's size.

with `timestep_spacing=spacing`, `steps_offset=steps_offset`, `use_karras_sigmas=karras` and otherwise
default options. The schedules are built with numpy in float64 because diffusers builds them so: numpy's
float32 log and float64 pow differ from torch's in the last bit, which moves fractional timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ldm.diffusion.names import FLOW_SAMPLERS, KARRAS_SAMPLERS, SAMPLERS, SPACINGS
from ldm.diffusion.schedule import FlowSchedule, NoiseSchedule, Schedule, shift_time, x0_from_output
from ldm.errors import InputError

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, C, H, W), t (B,) float32) -> (B, C, H, W)
ProgressCallback = Callable[[int, int], None]  # (step index, total steps)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not supported; use one of {tuple(allowed)}")


# --- Timestep and noise-level schedules -------------------------------------------------------------------


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """`steps` descending training timesteps laid out as diffusers' `timestep_spacing`, in float64. (steps,)

    linspace values stay fractional (Euler-type schedulers use them so, the others round them); only
    leading spacing adds `steps_offset`.
    """
    _check_choice("spacing", spacing, SPACINGS)
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps)[::-1].copy()
    if spacing == "leading":
        timesteps = (np.arange(steps) * (T // steps))[::-1] + float(steps_offset)
        if steps_offset < 0 or timesteps[0] > T - 1:
            largest = T - 1 - int(timesteps[0] - steps_offset)
            raise InputError(
                f"steps_offset={steps_offset} with {steps} leading steps gives timesteps "
                f"{int(timesteps[-1])}..{int(timesteps[0])}, outside 0..{T - 1}; use an offset in 0..{largest}"
            )
        return timesteps
    # For a few step counts (61, 103, ...) np.arange yields one element too many, a near-zero value that
    # diffusers keeps as timestep -1; the first `steps` values are the intended ones.
    return np.round(np.arange(T, 0, -T / steps))[:steps] - 1.0


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, evenly spaced in sigma^(1/rho): denser at low noise. (steps,) float64"""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_to_timesteps(sigmas: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """Fractional training timesteps of arbitrary noise levels: linear in log sigma between the two
    neighbouring training timesteps. (N,) float64 -> (N,) float64"""
    log_table = np.log(schedule.sigmas.numpy())  # float32, increasing with t
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    at_or_below = log_sigmas[None, :] - log_table[:, None] >= 0
    low = np.cumsum(at_or_below, axis=0).argmax(axis=0).clip(max=len(log_table) - 2)
    high = low + 1
    w = np.clip((log_table[low] - log_sigmas) / (log_table[low] - log_table[high]), 0, 1)
    return (1 - w) * low + w * high


def _sigmas_tensor(sigmas: np.ndarray) -> torch.Tensor:
    """Append the final noise level 0 (the clean sample) and round to float32, as diffusers stores them."""
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def euler_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int = 0, karras: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels, and the timesteps the network sees at them, of diffusers' Euler, Euler ancestral and
    Heun schedulers. -> sigmas (steps + 1,) float32 ending at 0, timesteps (steps,) float32"""
    table = schedule.sigmas.numpy()
    timesteps = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, steps_offset).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    if karras:
        # The Karras range spans the spaced schedule's end points, so it still depends on the spacing.
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
        timesteps = sigmas_to_timesteps(sigmas, schedule)
    return _sigmas_tensor(sigmas), torch.from_numpy(timesteps.astype(np.float32))


def dpm_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int = 0, karras: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels and integer timesteps of diffusers' DPMSolverMultistepScheduler.
    -> sigmas (steps + 1,) float32 ending at 0, timesteps (steps,) float32 holding integers"""
    table = schedule.sigmas.numpy()
    T = schedule.num_train_timesteps
    if karras:
        # Unlike the Euler schedulers', this Karras range is the whole training range, whatever the spacing.
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        timesteps = sigmas_to_timesteps(sigmas, schedule)
        if schedule.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)  # truncates the unrounded cosine-schedule ones, as diffusers does
    else:
        # linspace and leading lay out steps + 1 timesteps and drop the last (0): no step is spent starting
        # at t = 0, from where the final step to sigma 0 would have almost nothing left to remove.
        if spacing == "trailing":
            timesteps = spaced_timesteps(T, steps, spacing)
        else:
            timesteps = spaced_timesteps(T, steps + 1, spacing, steps_offset)[:-1]
        timesteps = timesteps.round().astype(np.int64)
        sigmas = table[timesteps]
    return _sigmas_tensor(sigmas), torch.from_numpy(timesteps.astype(np.float32))


def discrete_timesteps(schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int = 0) -> list[int]:
    """Descending integer timesteps of diffusers' DDPM, DDIM and PNDM schedulers. (steps,)"""
    timesteps = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, steps_offset)
    return timesteps.round().astype(np.int64).tolist()


# --- The denoiser and shared helpers ------------------------------------------------------------------------


class Denoiser:
    """A network in diffusers' convention, seen as a k-diffusion denoiser: (x, sigma) -> x0 estimate with
    x = x0 + sigma * eps. x, x0: (B, C, H, W); sigma: a 0-d float32 tensor, one of the schedule's sigmas.
    `denoiser.vp(x / sqrt(1 + sigma^2), sigma)` gives the same estimate from the VP sample.

    The network gets the VP sample and the timestep diffusers pairs with this sigma in this schedule. That
    pairing is looked up rather than recomputed: linspace spacing interpolates sigma linearly in t, which no
    sigma-to-t formula inverts exactly.
    """

    def __init__(self, model: Model, prediction_type: str, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.model, self.prediction_type = model, prediction_type
        self.timestep_of = dict(zip(sigmas[:-1].tolist(), timesteps.tolist()))
        if len(self.timestep_of) != len(timesteps):
            raise InputError(
                f"the schedule repeats a noise level ({len(timesteps)} steps over {len(self.timestep_of)} distinct "
                f"sigmas); use fewer steps"
            )

    def _network(self, x_vp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = torch.full((x_vp.shape[0],), self.timestep_of[sigma.item()], dtype=torch.float32, device=x_vp.device)
        return self.model(x_vp, t)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self._network(x / (sigma**2 + 1) ** 0.5, sigma)
        # x0_from_output in VE variables (alpha = 1 / sqrt(1 + sigma^2)), written with the operations
        # diffusers' Euler schedulers use so that float32 rounding agrees.
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return out

    def vp(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha, sigma_vp, _ = _vp_coefficients(sigma)
        return x0_from_output(self.prediction_type, self._network(x, sigma), x, alpha, sigma_vp)


def _vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, lambda = log(alpha / sigma)) of the VP process at VE noise level `sigma`, in float32
    with diffusers' operations. lambda is +inf at sigma = 0."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    sigma_vp = sigma * alpha
    return alpha, sigma_vp, alpha.log() - sigma_vp.log()


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise drawn as diffusers' randn_tensor draws it: on the generator's device, then moved."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _network_at(model: Model, x: torch.Tensor, t: int) -> torch.Tensor:
    """The raw network output at an integer timestep, given to it as float32 (B,) like every timestep."""
    return model(x, torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device))


# --- Samplers over the denoiser (x: (B, C, H, W); sigmas: (N + 1,) float32, decreasing, ending at 0) --------


def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: ProgressCallback | None = None
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma, x the VE sample."""
    n = len(sigmas) - 1
    for i in range(n):
        d = (x - denoiser(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback:
            callback(i, n)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """Euler steps down to sigma_down, then fresh noise of std sigma_up, so the sample lands at the next
    sigma with sigma_down^2 + sigma_up^2 = sigma_next^2 (the DDPM ancestral split)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, sigma)) / sigma
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + d * (sigma_down - sigma)
        # Drawn on the last step too (where sigma_up is 0), as diffusers does, so a shared generator stays in step.
        x = x + _noise_like(x, generator) * sigma_up
        if callback:
            callback(i, n)
    return x


def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: ProgressCallback | None = None
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1): an Euler step, corrected with the slope at
    its end. Two network evaluations per step, one on the last (the slope at sigma = 0 is undefined)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, sigma)) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
            x = x + (d + d_next) / 2 * dt
        if callback:
            callback(i, n)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: ProgressCallback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): exact integration in lambda = log(alpha / sigma) of an x0 estimate
    extrapolated linearly from the last two; first order on the first step and on the last (to sigma 0).
    x is the VP sample x0 * alpha + eps * sigma_vp, here and in the result (clean, as alpha = 1 at the end)."""
    n = len(sigmas) - 1
    previous = None
    for i in range(n):
        denoised = denoiser.vp(x, sigmas[i])
        _, sigma_s, lambda_s = _vp_coefficients(sigmas[i])
        alpha_t, sigma_t, lambda_t = _vp_coefficients(sigmas[i + 1])
        h = lambda_t - lambda_s
        phi = alpha_t * (torch.exp(-h) - 1.0)
        x = (sigma_t / sigma_s) * x - phi * denoised
        if previous is not None and sigmas[i + 1] > 0:
            r = (lambda_s - _vp_coefficients(sigmas[i - 1])[2]) / h
            x = x - 0.5 * phi * ((1.0 / r) * (denoised - previous))
        previous = denoised
        if callback:
            callback(i, n)
    return x


# --- Samplers over the network in VP form (x: VP sample (B, C, H, W); timesteps: descending ints) ----------


def sample_ddpm(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020), with the posterior
    variance ("fixed_small"); after the last timestep the sample is clean (abar = 1)."""
    one = torch.tensor(1.0)
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        x0 = schedule.predict_x0(_network_at(model, x, t), x, t)
        abar = schedule.alphas_cumprod[t]
        abar_prev = schedule.alphas_cumprod[timesteps[i + 1]] if i + 1 < n else one
        alpha = abar / abar_prev
        beta = 1 - alpha
        mean = (abar_prev**0.5 * beta) / (1 - abar) * x0 + alpha**0.5 * (1 - abar_prev) / (1 - abar) * x
        # diffusers skips the noise (and its draw) only at t = 0: a schedule ending above 0 draws on its last
        # step too, with a variance clamped to 1e-20.
        if t > 0:
            variance = torch.clamp((1 - abar_prev) / (1 - abar) * beta, min=1e-20)
            mean = mean + variance**0.5 * _noise_like(x, generator)
        x = mean
        if callback:
            callback(i, n)
    return x


def sample_ddim(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021): deterministic for eta = 0 (Euler on the probability-flow ODE in disguise),
    DDPM-like ancestral noise of eta times the posterior std otherwise; clean at the end (abar = 1).
    `stride`: T // (steps of the whole schedule), when `timesteps` is only its tail (img2img)."""
    one = torch.tensor(1.0)
    n = len(timesteps)
    stride = stride or schedule.num_train_timesteps // n
    for i, t in enumerate(timesteps):
        out = _network_at(model, x, t)
        x0, eps = schedule.predict_x0(out, x, t), schedule.predict_eps(out, x, t)
        # diffusers steps to t - T // steps, not to timesteps[i + 1]: the same for leading spacing, a few
        # timesteps apart for linspace and trailing, where the next step reads the sample as at timesteps[i + 1].
        abar = schedule.alphas_cumprod[t]
        abar_prev = schedule.alphas_cumprod[t - stride] if t - stride >= 0 else one
        std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _noise_like(x, generator)
        if callback:
            callback(i, n)
    return x


def _adams_bashforth(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep extrapolation of 2, 3 or 4 equally spaced network outputs, newest last."""
    if len(outputs) == 2:
        return (3 * outputs[-1] - outputs[-2]) / 2
    if len(outputs) == 3:
        return (23 * outputs[-1] - 16 * outputs[-2] + 5 * outputs[-3]) / 12
    return (1 / 24) * (55 * outputs[-1] - 59 * outputs[-2] + 37 * outputs[-3] - 9 * outputs[-4])


def sample_pndm(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    callback: ProgressCallback | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method (Liu et al. 2022) as Stable Diffusion runs it: DDIM-style
    transfers driven by an Adams-Bashforth combination of up to four network outputs, after a Heun-style
    first step in place of the Runge-Kutta warm-up. len(timesteps) + 1 network evaluations. The result is
    left at abar_0, not clean (diffusers' PNDM default set_alpha_to_one=False). `stride` as in `sample_ddim`."""
    stride = stride or schedule.num_train_timesteps // len(timesteps)
    total = len(timesteps) + 1

    def transfer(x: torch.Tensor, t: int, t_prev: int, output: torch.Tensor) -> torch.Tensor:
        # The DDIM step from t to t_prev written as in PNDM. A combined v or x0 output is converted to noise
        # only here, against this x and t, which is what diffusers does.
        abar = schedule.alphas_cumprod[t]
        abar_prev = schedule.alphas_cumprod[max(t_prev, 0)]  # past the end: abar_0 (set_alpha_to_one=False)
        eps = schedule.predict_eps(output, x, t)
        denominator = abar * (1 - abar_prev) ** 0.5 + (abar * (1 - abar) * abar_prev) ** 0.5
        return (abar_prev / abar) ** 0.5 * x - (abar_prev - abar) * eps / denominator

    first = _network_at(model, x, timesteps[0])
    x_euler = transfer(x, timesteps[0], timesteps[0] - stride, first)
    if callback:
        callback(0, total)
    if len(timesteps) == 1:
        return x_euler
    # Redo the first interval from the start with the mean of the outputs at both ends. diffusers takes it
    # to run from timesteps[1] + stride, which is timesteps[0] only for leading spacing.
    second = _network_at(model, x_euler, timesteps[1])
    x = transfer(x, timesteps[1] + stride, timesteps[1], (second + first) / 2)
    if callback:
        callback(1, total)
    history = [first]  # the correction's output is not part of the multistep history, as in diffusers
    for i, t in enumerate(timesteps[1:], start=2):
        history = history[-3:] + [_network_at(model, x, t)]
        x = transfer(x, t, t - stride, _adams_bashforth(history))
        if callback:
            callback(i, total)
    return x


# --- Samplers over a rectified flow (x = (1 - t) x0 + t eps; ts: (N + 1,) float32, from 1 down to 0) -------

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, C, H, W), t 0-d in [0, 1]) -> dx/dt


def flow_sigmas(schedule: FlowSchedule, steps: int, latent_size: tuple[int, int]) -> torch.Tensor:
    """The flow times t a sampler visits, as diffusers' FlowMatch schedulers lay them out: evenly spaced from
    1 to the shifted 1 / num_train_timesteps, shifted (so that end is shifted twice, as there), then 0.
    (steps + 1,) float32"""
    shift, T = schedule.shift_at(latent_size), schedule.num_train_timesteps
    smallest = shift_time(torch.tensor(1.0) / T, shift).item()  # in float32, as diffusers' sigma_min
    ts = shift_time(np.linspace(T, smallest * T, steps) / T, shift)
    return _sigmas_tensor(ts)


def sample_flow_euler(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback: ProgressCallback | None = None
) -> torch.Tensor:
    """Euler's method on dx/dt = v(x, t) from ts[0] to ts[-1]. Exact, at any step count, on a flow whose
    velocity is constant along each path: the straight lines rectified flow trains towards."""
    n = len(ts) - 1
    for i in range(n):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])
        if callback:
            callback(i, n)
    return x


def sample_flow_heun(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, callback: ProgressCallback | None = None
) -> torch.Tensor:
    """Heun's second-order method on dx/dt = v(x, t): an Euler step, corrected with the mean of the velocities
    at both of its ends; the last step (to t = 0, where the data is) is Euler's. Two network evaluations per
    step but the last."""
    n = len(ts) - 1
    for i in range(n):
        dt = ts[i + 1] - ts[i]
        v = velocity(x, ts[i])
        x_euler = x + dt * v
        x = x_euler if ts[i + 1] == 0 else x + dt * (v + velocity(x_euler, ts[i + 1])) / 2
        if callback:
            callback(i, n)
    return x


def _sample_flow(
    model: Model, noise: torch.Tensor, schedule: FlowSchedule, sampler: str, steps: int, karras: bool, eta: float,
    callback: ProgressCallback | None, init: torch.Tensor | None, skip: int,
) -> torch.Tensor:
    if sampler not in FLOW_SAMPLERS:
        raise InputError(f"sampler={sampler!r} does not integrate a flow model; use one of {FLOW_SAMPLERS}")
    if karras or eta:
        raise InputError("karras and eta do not apply to a flow model; leave them off")
    ts = flow_sigmas(schedule, steps, tuple(noise.shape[-2:]))[skip:].to(noise.device)
    x = noise if not skip else schedule.add_noise(init, noise, ts[0] * schedule.num_train_timesteps)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), t.item() * schedule.num_train_timesteps, dtype=torch.float32,
                                   device=x.device))

    integrate = sample_flow_euler if sampler == "euler" else sample_flow_heun
    return integrate(velocity, x, ts, callback)


# --- Entry point ---------------------------------------------------------------------------------------------


def sample(
    model: Model,
    noise: torch.Tensor,
    schedule: Schedule,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    spacing: str = "leading",
    karras: bool = False,
    eta: float = 0.0,
    steps_offset: int = 0,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Denoise unit Gaussian `noise` (B, C, H, W) into clean latents (B, C, H, W) in `steps` steps.

    `model(x_t, t)` is the network in diffusers' convention: x_t the VP sample (B, C, H, W), t float32 (B,)
    (fractional with Karras sigmas), output per `schedule.prediction_type`. `generator` feeds the noise of
    ddpm, ddim with eta > 0 and euler_ancestral, drawn as the diffusers scheduler draws it. `callback(i, total)`
    runs after each step; pndm takes one more.

    img2img: with clean latents `init` (B, C, H, W) and `strength` in [0, 1], only the last
    int(steps * strength) steps of the schedule run, from `init` noised to the level of the first of them
    with `noise` (diffusers' img2img `get_timesteps` + `add_noise`). Strength 0 returns `init`; strength 1
    ignores it and returns exactly the text-to-image sample, as diffusers' inpainting pipelines do at full
    strength (noising `init` to the first level would still leave sqrt(abar_T) of it in).

    A flow model (`FlowSchedule`, output: velocity) is integrated from t = 1 by `sample_flow_euler` ("euler")
    or `sample_flow_heun` ("heun") over `flow_sigmas`; `spacing` and `steps_offset` do not apply to it.
    """
    _check_choice("sampler", sampler, SAMPLERS)
    _check_choice("spacing", spacing, SPACINGS)
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise InputError(f"steps={steps} is out of range; use 1..{T} (the schedule's num_train_timesteps)")
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength={strength} is out of range; use 0 (keep the input) .. 1 (ignore it)")
    if init is not None and init.shape != noise.shape:
        raise InputError(f"init latents {tuple(init.shape)} and noise {tuple(noise.shape)} differ in shape")
    # The steps skipped at the start of the schedule; img2img starts where they would have ended.
    skip = steps - int(steps * strength) if init is not None and strength < 1.0 else 0
    if skip == steps:
        return init
    if isinstance(schedule, FlowSchedule):
        return _sample_flow(model, noise, schedule, sampler, steps, karras, eta, callback, init, skip)
    if karras and sampler not in KARRAS_SAMPLERS:
        raise InputError(f"karras=True is not available for sampler={sampler!r}; use it with one of {KARRAS_SAMPLERS}")
    if eta != 0.0 and sampler != "ddim":
        raise InputError(f"eta={eta} applies to sampler='ddim' only; pass eta=0.0 with sampler={sampler!r}")
    if eta < 0.0:
        raise InputError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")
    if sampler == "pndm" and schedule.prediction_type == "sample":
        raise InputError("sampler='pndm' needs prediction_type 'epsilon' or 'v_prediction'; pick another sampler")

    if sampler in ("ddpm", "ddim", "pndm"):
        timesteps = discrete_timesteps(schedule, steps, spacing, steps_offset)[skip:]
        x = noise if not skip else schedule.add_noise(init, noise, timesteps[0])
        stride = T // steps
        if sampler == "ddpm":
            return sample_ddpm(model, x, timesteps, schedule, generator=generator, callback=callback)
        if sampler == "ddim":
            return sample_ddim(
                model, x, timesteps, schedule, eta=eta, generator=generator, callback=callback, stride=stride
            )
        return sample_pndm(model, x, timesteps, schedule, callback=callback, stride=stride)

    if sampler == "dpmpp_2m":
        sigmas, timesteps = dpm_sigmas(schedule, steps, spacing, steps_offset, karras)
        x = noise
        if skip:
            alpha, sigma_vp, _ = _vp_coefficients(sigmas[skip])
            x = alpha * init + sigma_vp * noise
        denoiser = Denoiser(model, schedule.prediction_type, sigmas, timesteps)
        return sample_dpmpp_2m(denoiser, x, sigmas[skip:], callback)

    sigmas, timesteps = euler_sigmas(schedule, steps, spacing, steps_offset, karras)
    denoiser = Denoiser(model, schedule.prediction_type, sigmas, timesteps)
    if skip:
        x = init + sigmas[skip] * noise
    else:
        # diffusers' init_noise_sigma: sigma_max for linspace and trailing, but sqrt(sigma_max^2 + 1) for leading.
        x = noise * (sigmas[0] if spacing != "leading" else (sigmas[0] ** 2 + 1) ** 0.5)
    sigmas = sigmas[skip:]
    if sampler == "euler":
        return sample_euler(denoiser, x, sigmas, callback=callback)
    if sampler == "heun":
        return sample_heun(denoiser, x, sigmas, callback=callback)
    return sample_euler_ancestral(denoiser, x, sigmas, generator=generator, callback=callback)
