"""Turn a discrete-time network (eps- or v-prediction) into a denoiser D(x, sigma) -> x0 estimate.

Samplers work on the variance-exploding sample x = x0 + sigma * noise. The network was trained on the
variance-preserving sample sqrt(abar) * x0 + sqrt(1 - abar) * noise = x / sqrt(sigma^2 + 1), at the integer
timestep whose sigma is nearest, hence c_in and the timestep conversion below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import DiscreteSchedule

PREDICTION_TYPES = ("eps", "v_prediction")


def _expand(sigma: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample sigma [B] (or scalar) against x [B, ...]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (x.ndim - 1)))


class ModelSampling:
    """A discrete model's schedule plus its prediction type: everything needed to go between sigma, the
    network's timestep, the network's input scale and its output."""

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "eps", quantize_timesteps: bool = True) -> None:
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
        self.schedule = schedule
        self.prediction = prediction
        # ComfyUI feeds the nearest integer timestep; k-diffusion's default interpolates.
        self.quantize_timesteps = quantize_timesteps

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize_timesteps)

    def sigma(self, timestep: Tensor) -> Tensor:
        return self.schedule.t_to_sigma(timestep)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the sampling process (0 = start, pure noise; 1 = end, clean)."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (len(self.schedule) - 1))))

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        return x / (_expand(sigma, x) ** 2 + 1).sqrt()

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        s = _expand(sigma, x)
        if self.prediction == "eps":
            return x - s * model_output
        return x / (s**2 + 1) - model_output * s / (s**2 + 1).sqrt()

    def noise_scaling(self, sigma: Tensor | float, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        """The sample at noise level sigma for clean `latent`. With `max_denoise` (sampling from the top of the
        schedule) the noise is scaled by sqrt(1 + sigma^2), as ComfyUI does: the variance of the trained sample
        at t = T-1 when the latent carries no signal."""
        s = _expand(torch.as_tensor(sigma), noise)
        scale = (1.0 + s**2).sqrt() if max_denoise else s
        return latent + noise * scale

    def inverse_noise_scaling(self, sigma: Tensor | float, latent: Tensor) -> Tensor:
        """Identity for these models: the variance-exploding sample at sigma 0 already is the latent."""
        return latent


class Denoiser:
    """`net(x_in, t, **cond) -> eps or v` wrapped as `D(x, sigma, **cond) -> x0 estimate`."""

    def __init__(self, net: Callable[..., Tensor], model_sampling: ModelSampling) -> None:
        self.net = net
        self.model_sampling = model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        ms = self.model_sampling
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        out = self.net(ms.calculate_input(sigma, x), ms.timestep(sigma).to(x.device), **cond)
        return ms.calculate_denoised(sigma, out.to(x.dtype), x)
