"""Noise schedules of discrete-time diffusion models and the sigma schedulers that sample them.

A discrete-time model (SD1.x, SD2.x, SDXL) was trained on 1000 noise levels defined by its betas. In the
Karras/k-diffusion view each level is a noise standard deviation sigma_k = sqrt((1 - abar_k) / abar_k) of the
"variance exploding" sample x = x0 + sigma * eps, and a sampler walks a decreasing list of sigmas that ends in 0.

The schedulers below are named as ComfyUI names them. Every one is `fn(schedule, steps) -> Tensor[steps + 1]`
(float32, decreasing, last element 0); `beta` may return fewer when rounding makes two steps coincide.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SCHEDULER_NAMES = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)

# ComfyUI's terminal value of abar after the zero-terminal-SNR rescale; a true 0 would make sigma_max infinite.
_ZERO_SNR_TERMINAL_ALPHA_CUMPROD = 4.8973451890853435e-08


def make_betas(
    beta_schedule: str = "scaled_linear",
    timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Training betas in float64. `scaled_linear` is SD's (linear in sqrt(beta))."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if beta_schedule == "cosine":
        # Nichol & Dhariwal: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas capped at 0.999.
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {beta_schedule!r}; expected scaled_linear, linear or cosine")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2023: shift and scale sqrt(abar) so the last level is pure noise, keeping the first."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = _ZERO_SNR_TERMINAL_ALPHA_CUMPROD
    return rescaled


class DiscreteSchedule:
    """The 1000 (or T) training noise levels of a discrete-time model.

    `sigmas` is ascending (t = 0 is the least noisy level). Continuous t is mapped to sigma by linear
    interpolation of log sigma between neighbouring integer timesteps, and back the same way.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of >= 2 levels, got {tuple(alphas_cumprod.shape)}")
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, betas: Tensor, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        alphas_cumprod = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        return cls(alphas_cumprod)

    @classmethod
    def from_config(
        cls,
        beta_schedule: str = "scaled_linear",
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        betas = make_betas(beta_schedule, timesteps, linear_start, linear_end)
        return cls.from_betas(betas, zero_terminal_snr=zero_terminal_snr)

    def __len__(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        """Continuous timestep of `sigma` (clamped to [0, T-1]); `quantize` picks the nearest level in log sigma."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        if quantize:
            return (log_sigma.reshape(-1, 1) - log_sigmas).abs().argmin(dim=1).reshape(log_sigma.shape).float()
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1)) - 1).clamp(0, len(self) - 2)
        low_log, high_log = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - low_log) / (high_log - low_log)).clamp(0, 1)
        return (low.float() + w).reshape(log_sigma.shape)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self) - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low.float()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _with_zero(sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# --- schedules from (n, sigma_min, sigma_max) -----------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform steps in log sigma."""
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sabour et al. 2024 ("Align Your Steps"): uniform steps in arctan(sigma)."""
    if n == 1:
        return _with_zero(torch.tensor([sigma_max], dtype=torch.float64))
    frac = torch.arange(n, dtype=torch.float64) / (n - 1)
    return _with_zero(torch.tan((1 - frac) * math.atan(sigma_max) + frac * math.atan(sigma_min)))


# --- schedulers over a model's DiscreteSchedule -------------------------------------------------------------------


def normal_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """`steps` timesteps evenly spaced from T-1 down to 0 inclusive (diffusers' "linspace" spacing)."""
    t = torch.linspace(float(schedule.sigma_to_t(schedule.sigma_max)), 0.0, steps, dtype=torch.float64)
    return _with_zero(schedule.t_to_sigma(t))


def sgm_uniform_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """`steps + 1` evenly spaced timesteps from T-1 to 0, dropping the last (Stability's sgm "uniform")."""
    t = torch.linspace(float(schedule.sigma_to_t(schedule.sigma_max)), 0.0, steps + 1, dtype=torch.float64)[:-1]
    return _with_zero(schedule.t_to_sigma(t))


def simple_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Every (T/steps)-th training sigma counted down from the top (diffusers' "trailing" spacing)."""
    stride = len(schedule) / steps
    idx = torch.tensor([len(schedule) - 1 - int(i * stride) for i in range(steps)])
    return _with_zero(schedule.sigmas[idx])


def ddim_uniform_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Timesteps 1, 1+k, 1+2k, ... with k = T // steps, reversed (DDIM "leading" spacing, offset 1).

    ComfyUI keeps stepping while the index is below T, which yields more than `steps` levels when T is not a
    multiple of `steps` (e.g. 31 for 30 steps); here exactly `steps` levels are kept, as in diffusers' DDIM.
    """
    stride = max(len(schedule) // steps, 1)
    idx = [1 + i * stride for i in range(steps) if 1 + i * stride < len(schedule)]
    return _with_zero(schedule.sigmas[torch.tensor(idx[::-1])])


def karras_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    return karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max, rho=7.0)


def exponential_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    return exponential_sigmas(steps, schedule.sigma_min, schedule.sigma_max)


def kl_optimal_scheduler(schedule: DiscreteSchedule, steps: int) -> Tensor:
    return kl_optimal_sigmas(steps, schedule.sigma_min, schedule.sigma_max)


def linear_quadratic_scheduler(
    schedule: DiscreteSchedule, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """Genmo/Mochi's schedule of the "denoised fraction" f: linear from 0 to `threshold_noise` over the first
    half of the steps, then the quadratic that continues it with equal value and slope and reaches 1 at the end;
    sigma = (1 - f) * sigma_max.
    """
    if steps == 1:
        frac = [0.0, 1.0]
    else:
        n_lin = steps // 2 if linear_steps is None else linear_steps
        n_quad = steps - n_lin
        slope = threshold_noise / n_lin
        curve = (1 - threshold_noise - slope * n_quad) / n_quad**2
        frac = [i * slope for i in range(n_lin)]
        frac += [threshold_noise + slope * (i - n_lin) + curve * (i - n_lin) ** 2 for i in range(n_lin, steps)]
        frac.append(1.0)
    return (1 - torch.tensor(frac, dtype=torch.float64)).float() * schedule.sigma_max


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - log_beta
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution by bisection on I_x(a, b) (no scipy)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if regularized_incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_scheduler(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Lee et al. 2024 ("Beta sampling is all you need"): timesteps at Beta(alpha, beta) quantiles of
    1, 1 - 1/steps, ..., 1/steps, rounded to training levels; consecutive duplicates are dropped."""
    top = len(schedule) - 1
    sigmas, last = [], None
    for i in range(steps):
        t = int(torch.tensor(beta_ppf(1 - i / steps, alpha, beta) * top, dtype=torch.float64).round())
        if t != last:
            sigmas.append(float(schedule.sigmas[t]))
            last = t
    return _with_zero(torch.tensor(sigmas))


SCHEDULERS: dict[str, Callable[[DiscreteSchedule, int], Tensor]] = {
    "simple": simple_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}


def calculate_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int) -> Tensor:
    """Sigmas of `scheduler` (a name from SCHEDULER_NAMES) for `steps` steps; empty when steps < 1."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    if steps < 1:
        return torch.zeros(0)
    return SCHEDULERS[scheduler](schedule, steps)
