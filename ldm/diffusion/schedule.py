"""The forward (noising) process of a DDPM: betas, cumulative alphas, and the conversions between what a
network predicts and the clean sample / noise it implies.

Timesteps `t` index the training schedule (0 .. num_train_timesteps - 1) and are either a Python int or an
integer tensor of shape (B,); per-timestep coefficients broadcast over the trailing dims of the samples.
Betas and cumulative alphas are computed along diffusers' float32 path, so a model trained here runs under
a diffusers scheduler with the same config and the other way round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ldm.diffusion.names import BETA_SCHEDULES, PREDICTION_TYPES
from ldm.errors import InputError


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose cumulative product follows Nichol & Dhariwal's squared cosine (in float64 Python math, as
    diffusers does, so the float32 result is identical); capped so the last steps do not destroy all signal
    in one go."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


@dataclass
class NoiseSchedule:
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, with abar_t = prod_{s <= t} (1 - beta_s).

    The defaults are Stable Diffusion's. `prediction_type` is what the network outputs: the noise `epsilon`,
    the velocity `v_prediction` (v = sqrt(abar) * eps - sqrt(1 - abar) * x0) or the clean `sample`.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    betas: torch.Tensor = field(init=False, repr=False, compare=False)  # (T,) float32
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)  # (T,) float32
    sigmas: torch.Tensor = field(init=False, repr=False, compare=False)  # (T,) float32

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise InputError(f"beta_schedule={self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(
                f"prediction_type={self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if self.num_train_timesteps < 1:
            raise InputError(f"num_train_timesteps={self.num_train_timesteps} must be at least 1")
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            self.betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            # Linear in sqrt(beta): Stable Diffusion's schedule, gentler than linear at the start.
            self.betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            self.betas = _cosine_betas(T)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # The same noise levels seen as x0 + sigma * eps (x_t / sqrt(abar)): what k-diffusion samplers step over.
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def to_dict(self) -> dict:
        """The config fields only (JSON-ready); the tensors are recomputed from them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, config: dict) -> NoiseSchedule:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(config) - known)
        if unknown:
            raise InputError(f"unknown NoiseSchedule keys {unknown}; the known ones are {sorted(known)}")
        return cls(**config)

    def draw_timesteps(self, count: int, generator: torch.Generator, latent_size: tuple[int, int]) -> torch.Tensor:
        """Training timesteps (count,) int64, uniform over the schedule (at any latent size)."""
        return torch.randint(self.num_train_timesteps, (count,), generator=generator)

    def _coefficients(self, t: int | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)), shaped to broadcast against `like` (B, ...) and in its dtype."""
        abar = self.alphas_cumprod.to(like.device)[t]
        if abar.dim() == 1:
            abar = abar.view(-1, *([1] * (like.dim() - 1)))
        return (abar**0.5).to(like.dtype), ((1 - abar) ** 0.5).to(like.dtype)

    def snr(self, t: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar); decreases with t. Same shape as t."""
        t = torch.as_tensor(t)
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x0) given the noise. x0, noise: (B, ...); t: (B,) -> x_t (B, ...)."""
        alpha, sigma = self._coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) * eps - sqrt(1 - abar) * x0 (Salimans & Ho). (B, ...) -> (B, ...)"""
        alpha, sigma = self._coefficients(t, x0)
        return alpha * noise - sigma * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = add_noise(x0, noise, t) under this prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a network output at (x_t, t). (B, ...) -> (B, ...)"""
        return x0_from_output(self.prediction_type, model_output, x_t, *self._coefficients(t, x_t))

    def predict_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The noise implied by a network output at (x_t, t). (B, ...) -> (B, ...)"""
        return eps_from_output(self.prediction_type, model_output, x_t, *self._coefficients(t, x_t))


def x0_from_output(
    prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The clean sample implied by a network output at x_t = alpha * x0 + sigma * eps (alpha^2 + sigma^2 = 1).
    Tensors (B, ...); alpha, sigma broadcast against them."""
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    return model_output


def eps_from_output(
    prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The noise implied by a network output at x_t = alpha * x0 + sigma * eps. Shapes as x0_from_output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t
    return (x_t - alpha * model_output) / sigma


@dataclass
class FlowSchedule:
    """Rectified flow as Stable Diffusion 3 trains it (Esser et al. 2024): x_t = (1 - t) x0 + t eps for t in
    [0, 1], and the network predicts the velocity eps - x0 along that straight line.

    The network sees `t * num_train_timesteps` as its timestep, so a UNet's time embedding covers the same
    range as under a `NoiseSchedule`. Training draws t logit-normal (sigmoid of N(logit_mean, logit_std^2):
    most draws in the middle, where the velocity is hardest to predict), then shifts it; sampling walks the
    shifted grid (`ldm.diffusion.samplers.flow_sigmas`). The shift, s t / (1 + (s - 1) t), spends more of
    both on high noise for s > 1; it is `shift` at `base_latent_pixels` (h * w of the training latents) and
    grows with the square root of the latent area, SD3's resolution-dependent rule: a larger image keeps more
    of its structure at the same t, so it needs more noise to lose it. `base_latent_pixels` None: the same
    shift at any size.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    base_latent_pixels: int | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    prediction_type: str = field(default="flow", init=False)  # what the network outputs: the velocity

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise InputError(f"num_train_timesteps={self.num_train_timesteps} must be at least 1")
        if self.shift <= 0:
            raise InputError(f"shift={self.shift} must be positive (1: no shift, above 1: more noise)")
        if self.logit_std <= 0:
            raise InputError(f"logit_std={self.logit_std} must be positive")
        if self.base_latent_pixels is not None and self.base_latent_pixels < 1:
            raise InputError(f"base_latent_pixels={self.base_latent_pixels} must be at least 1 (or None)")

    def to_dict(self) -> dict:
        """The config (JSON-ready), with `objective: flow` telling it from a NoiseSchedule's (`schedule_from_dict`)."""
        return {"objective": "flow", **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}

    def shift_at(self, latent_size: tuple[int, int]) -> float:
        """The shift for latents of (h, w)."""
        if self.base_latent_pixels is None:
            return self.shift
        return self.shift * (latent_size[0] * latent_size[1] / self.base_latent_pixels) ** 0.5

    def draw_timesteps(self, count: int, generator: torch.Generator, latent_size: tuple[int, int]) -> torch.Tensor:
        """Training timesteps (count,) float32 in network units: t logit-normal, shifted for this latent size,
        times num_train_timesteps."""
        t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(count, generator=generator))
        return shift_time(t, self.shift_at(latent_size)) * self.num_train_timesteps

    def _t(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Network timesteps as t in [0, 1], shaped to broadcast against `like` (B, ...) and in its dtype."""
        t = torch.as_tensor(t, dtype=torch.float32, device=like.device) / self.num_train_timesteps
        if t.dim() == 1:
            t = t.view(-1, *([1] * (like.dim() - 1)))
        return t.to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise at network timesteps t (B,). (B, ...) -> (B, ...)"""
        s = self._t(t, x0)
        return (1 - s) * x0 + s * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The velocity noise - x0, the same at every t."""
        return noise - x0

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The clean sample a velocity implies: x_t - t v."""
        return x_t - self._t(t, x_t) * model_output


def shift_time(t: torch.Tensor | np.ndarray, shift: float) -> torch.Tensor | np.ndarray:
    """SD3's timestep shift s t / (1 + (s - 1) t): fixes 0 and 1, and moves every t in between up for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


Schedule = NoiseSchedule | FlowSchedule


def schedule_from_dict(config: dict) -> Schedule:
    """A schedule from its `to_dict()`: a FlowSchedule when it says `objective: flow`, else a NoiseSchedule
    (whose dict has no objective, so the folders of models trained before flows load as they were)."""
    config = dict(config)
    if config.pop("objective", "diffusion") == "flow":
        known = {f.name for f in fields(FlowSchedule) if f.init}
        unknown = sorted(set(config) - known)
        if unknown:
            raise InputError(f"unknown FlowSchedule keys {unknown}; the known ones are {sorted(known)}")
        return FlowSchedule(**config)
    return NoiseSchedule.from_dict(config)
