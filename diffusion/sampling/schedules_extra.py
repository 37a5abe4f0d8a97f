"""More sigma schedules: closed forms over (n, sigma_min, sigma_max), published step tables, and the operations
the custom-sampling nodes apply to a schedule (flip, split by denoise, replace the first sigma).

Each schedule returns float32 sigmas, decreasing, ending in 0 (n + 1 values for n steps) unless it says
otherwise. The closed forms follow `../shared/reference/sampling-notes.md`; the tables come from their papers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import DiscreteSchedule


def _with_zero(sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """Polynomial in log sigma: r_i = linspace(1, 0, n)^rho, sigma_i = exp(r_i (ln sigma_max - ln sigma_min)
    + ln sigma_min). rho = 1 is the exponential schedule; rho > 1 spends more steps at low noise."""
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _with_zero((ramp * (log_max - log_min) + log_min).exp())


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """The variance-preserving SDE of Song et al. 2021 with a linear beta(t) = beta_min + beta_d t, seen as a
    variance-exploding sigma: abar(t) = exp(-(beta_d t^2 / 2 + beta_min t)), so
    sigma(t) = sqrt(1 / abar - 1) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), at t = linspace(1, eps_s, n)."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _with_zero(torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t)))


LAPLACE_EPSILON = 1e-5  # keeps log(1 - 2|t - 1/2|) finite at t = 0 and t = 1


def laplace_sigmas(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> Tensor:
    """Hang et al. 2024 ("Improved Noise Schedule for Diffusion Training"): log sigma follows the quantile
    function of a Laplace(mu, beta) distribution, lambda(t) = mu - beta sgn(1/2 - t) ln(1 - 2|t - 1/2| + eps) at
    t = linspace(0, 1, n), so steps concentrate around sigma = e^mu; sigmas are clamped to [sigma_min, sigma_max]
    (the ends of the quantile function are infinite)."""
    _check_range(sigma_min, sigma_max)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    offset = 0.5 - t
    lam = mu - beta * torch.sign(offset) * torch.log(1 - 2 * offset.abs() + LAPLACE_EPSILON)
    return _with_zero(lam.exp().clamp(min=sigma_min, max=sigma_max))


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not sigma_min > 0 or not sigma_max > 0:
        raise ValueError(f"sigma_min and sigma_max must be > 0 (log-spaced schedule), got {sigma_min}, {sigma_max}")


# --- tables -----------------------------------------------------------------------------------------------------

SD_TURBO_TIMESTEPS = tuple(range(999, 0, -100))  # 999, 899, ..., 99: SD/SDXL Turbo's 10 distillation levels


def sd_turbo_sigmas(schedule: DiscreteSchedule, steps: int, denoise: float = 1.0) -> Tensor:
    """SD-Turbo / SDXL-Turbo (Sauer et al. 2023, adversarial diffusion distillation) were distilled on the 10
    timesteps 999, 899, ..., 99. `steps` of them are taken starting 10 - int(10 * denoise) levels down (denoise 1
    starts at 999, 0.5 at 499) and the schedule's sigmas at those timesteps are returned, then 0. A start past
    the last level gives just [0] (nothing to sample)."""
    start = 10 - int(10 * denoise)
    timesteps = torch.tensor(SD_TURBO_TIMESTEPS[start : start + steps], dtype=torch.float32)
    return _with_zero(schedule.t_to_sigma(timesteps) if len(timesteps) else torch.zeros(0))


# Sabour, Fidler & Kreis 2024, "Align Your Steps": the 10-step schedules optimised per model, as published on
# NVIDIA's project page (3 decimals; the last value is the model's sigma_min, replaced by 0 when sampling).
AYS_NOISE_LEVELS: dict[str, tuple[float, ...]] = {
    "SD1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "SDXL": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "SVD": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def loglinear_interp(levels: Tensor, count: int) -> Tensor:
    """`count` sigmas from a decreasing table by linear interpolation of log sigma against the uniform position
    0..1 along the table (the AYS paper's recipe for step counts other than the table's)."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    if count == 1:
        return levels[:1].clone()
    pos = torch.linspace(0, 1, count, dtype=torch.float64) * (len(levels) - 1)
    low = pos.floor().long().clamp(max=len(levels) - 2)
    w = pos - low
    logs = levels.log()
    return ((1 - w) * logs[low] + w * logs[low + 1]).exp()


def _table_schedule(levels: Tensor, steps: int, denoise: float) -> Tensor:
    """The last round(steps * denoise) steps of a table schedule of `steps` steps, ending in 0 (empty for
    denoise <= 0)."""
    if denoise <= 0.0:
        return torch.zeros(0)
    total = round(steps * denoise) if denoise < 1.0 else steps
    if len(levels) != steps + 1:
        levels = loglinear_interp(levels, steps + 1)
    sigmas = torch.as_tensor(levels, dtype=torch.float32)[-(total + 1) :].clone()
    sigmas[-1] = 0.0
    return sigmas


def align_your_steps_sigmas(model_type: str, steps: int, denoise: float = 1.0) -> Tensor:
    """AYS sigmas for `model_type` (SD1, SDXL or SVD): the published 10-step table, log-linearly interpolated to
    `steps` steps, the last sigma set to 0; denoise < 1 keeps the last round(steps * denoise) steps."""
    if model_type not in AYS_NOISE_LEVELS:
        raise ValueError(f"unknown AYS model type {model_type!r}; expected one of {', '.join(AYS_NOISE_LEVELS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _table_schedule(torch.tensor(AYS_NOISE_LEVELS[model_type], dtype=torch.float64), steps, denoise)


# --- operations on a schedule -----------------------------------------------------------------------------------

FLIP_FIRST_SIGMA = 1e-4  # a flipped schedule must not start at sigma 0 (samplers divide by sigma)


def flip_sigmas(sigmas: Tensor) -> Tensor:
    """The schedule reversed (increasing: for inversion, walking an image back to noise); a leading 0 becomes
    1e-4 so the first step has a finite slope."""
    if len(sigmas) == 0:
        return sigmas
    flipped = sigmas.flip(0).clone()
    if flipped[0] == 0:
        flipped[0] = FLIP_FIRST_SIGMA
    return flipped


def split_sigmas_denoise(sigmas: Tensor, denoise: float) -> tuple[Tensor, Tensor]:
    """(high, low): low holds the last round(steps * denoise) steps, high the steps before them; both hold the
    sigma where they meet, as SplitSigmas does. As in ComfyUI, a split with no low steps (denoise rounding to 0)
    gives an empty high part and low = the last sigma alone."""
    steps = max(len(sigmas) - 1, 0)
    total = round(steps * denoise)
    return sigmas[:-total], sigmas[-(total + 1) :]


def set_first_sigma(sigmas: Tensor, sigma: float) -> Tensor:
    """A copy with sigmas[0] replaced (e.g. a higher start for extra noise)."""
    if len(sigmas) == 0:
        raise ValueError("SetFirstSigma: sigmas is empty, there is no first sigma to set")
    out = sigmas.clone()
    out[0] = sigma
    return out


def sigma_span(sigmas: Tensor) -> float:
    """The noise a schedule removes: |first - last| sigma (its first sigma when it ends at 0, the only sigma when
    it has one). AddNoise noises a clean latent by this much, so the schedule can then be sampled from it."""
    if len(sigmas) == 0:
        raise ValueError("sigmas is empty: no noise level to add")
    if len(sigmas) == 1:
        return float(sigmas[0])
    return abs(float(sigmas[0]) - float(sigmas[-1]))
