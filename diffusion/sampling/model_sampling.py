"""Turn a discrete-time network (eps- or v-prediction) into a denoiser D(x, sigma) -> x0 estimate.

Samplers work on the variance-exploding sample x = x0 + sigma * noise. The network was trained on the
variance-preserving sample sqrt(abar) * x0 + sqrt(1 - abar) * noise = x / sqrt(sigma^2 + 1), at the integer
timestep whose sigma is nearest, hence c_in and the timestep conversion below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import DiscreteSchedule, rescale_zero_terminal_snr

PREDICTION_TYPES = ("eps", "v_prediction", "lcm", "x0", "img_to_img")
# ModelSamplingDiscrete's choices, in ComfyUI's order (kept apart: other model samplings may add prediction types).
DISCRETE_SAMPLINGS = ("eps", "v_prediction", "lcm", "x0", "img_to_img")


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
        if self.prediction == "img_to_img":  # the network takes the noisy latent as it is
            return x
        return x / (_expand(sigma, x) ** 2 + 1).sqrt()

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """The x0 estimate from the network's output: eps: x - sigma eps; v: x / (sigma^2 + 1) - v sigma /
        sqrt(sigma^2 + 1); x0 and img_to_img: the output itself; lcm: the eps estimate passed through the
        consistency-model boundary condition (`_lcm_denoised`)."""
        s = _expand(sigma, x)
        if self.prediction == "eps":
            return x - s * model_output
        if self.prediction in ("x0", "img_to_img"):
            return model_output
        if self.prediction == "lcm":
            return self._lcm_denoised(sigma, model_output, x)
        return x / (s**2 + 1) - model_output * s / (s**2 + 1).sqrt()

    def _lcm_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """Latent consistency models (Luo et al. 2023) parameterise f(x, t) = c_skip(t) x + c_out(t) x0_eps
        with sigma_data = 0.5 and the timestep scaled by 10: c_skip = sigma_data^2 / ((10t)^2 + sigma_data^2),
        c_out = 10t / sqrt((10t)^2 + sigma_data^2), so f is the identity at t = 0 (the boundary condition)."""
        x0 = x - _expand(sigma, x) * model_output
        t = _expand(self.timestep(torch.as_tensor(sigma, device=x.device).reshape(-1)).to(x), x) * 10.0
        sigma_data = 0.5
        c_skip = sigma_data**2 / (t**2 + sigma_data**2)
        c_out = t / (t**2 + sigma_data**2).sqrt()
        return c_out * x0 + c_skip * x

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


class DistilledModelSampling(ModelSampling):
    """The schedule of a model distilled to `levels` of its training timesteps (LCM: 50 of 1000).

    Level k (0 = least noisy) is training timestep k * stride + stride - 1 with stride = T / levels, i.e.
    t = 19, 39, ..., 999 for LCM; schedulers see only these sigmas, and a sigma is fed to the network as the
    training timestep of its nearest level. `percent_to_sigma` and `sigma` speak in training timesteps."""

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "lcm", levels: int = 50) -> None:
        total = len(schedule)
        if levels < 2 or total % levels:
            raise ValueError(f"a distilled schedule needs a number of levels that divides {total}, got {levels}")
        self.stride = total // levels
        self.training_steps = total
        picked = torch.arange(levels) * self.stride + self.stride - 1
        super().__init__(DiscreteSchedule(schedule.alphas_cumprod[picked]), prediction, quantize_timesteps=True)

    def timestep(self, sigma: Tensor) -> Tensor:
        level = self.schedule.sigma_to_t(sigma, quantize=True)
        return level * self.stride + (self.stride - 1)

    def sigma(self, timestep: Tensor) -> Tensor:
        level = ((torch.as_tensor(timestep, dtype=torch.float32) - (self.stride - 1)) / self.stride)
        return self.schedule.t_to_sigma(level.clamp(0, len(self.schedule) - 1))

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (self.training_steps - 1))))


def discrete_model_sampling(sampling: str, zsnr: bool = False,
                            schedule: DiscreteSchedule | None = None) -> ModelSampling:
    """ModelSamplingDiscrete's choice: SD's scaled-linear schedule (or `schedule`, from its betas) with the
    prediction type `sampling`; `zsnr` rescales it to zero terminal SNR (Lin et al. 2023, `schedules.
    rescale_zero_terminal_snr`), so the last training level is (almost) pure noise. `lcm` also distils the
    schedule to 50 levels (DistilledModelSampling)."""
    if sampling not in DISCRETE_SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {DISCRETE_SAMPLINGS}")
    alphas_cumprod = (schedule or DiscreteSchedule.from_config()).alphas_cumprod
    if zsnr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod.clone())
    base = DiscreteSchedule(alphas_cumprod)
    if sampling == "lcm":
        return DistilledModelSampling(base, "lcm")
    return ModelSampling(base, sampling)


class Denoiser:
    """`net(x_in, t, **cond) -> eps or v` wrapped as `D(x, sigma, **cond) -> x0 estimate`. With `pass_sigma` the
    net also gets `sigma=` (the exact sigma, which its model patches may need; t is quantized)."""

    def __init__(self, net: Callable[..., Tensor], model_sampling: ModelSampling, pass_sigma: bool = False) -> None:
        self.net = net
        self.model_sampling = model_sampling
        self.pass_sigma = pass_sigma

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        ms = self.model_sampling
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        if self.pass_sigma:
            cond = {**cond, "sigma": sigma}
        out = self.net(ms.calculate_input(sigma, x), ms.timestep(sigma).to(x.device), **cond)
        return ms.calculate_denoised(sigma, out.to(x.dtype), x)
