"""Single-step samplers (each step uses only the current sample) and the sampler registry.

Conventions in `samplers_base`. Multistep samplers live in `samplers_multistep` (lambda-space) and
`samplers_adams` (Adams–Bashforth family), DPM-Solver fast/adaptive in `samplers_dpm_solver`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .noise import NoiseSampler
from .samplers_adams import deis, ipndm, ipndm_v, lms
from .samplers_base import Callback, Model, ancestral_step, as_floats, call, churn, need_noise, report, to_d
from .samplers_dpm_solver import dpm_adaptive, dpm_fast
from .samplers_multistep import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, uni_pc, uni_pc_bh2

INF = float("inf")


def euler(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF,
    s_noise: float = 1.0,
) -> Tensor:
    """Karras et al. Alg. 2 with Euler steps (churn off by default: plain Euler on the ODE)."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "euler")
        denoised = call(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sig[i + 1] - sigma_hat)
    return x


def euler_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Euler step down to sigma_down, then fresh noise of std sigma_up."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = x + to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        if sig[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise_sampler, "euler_ancestral")(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def heun(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF,
    s_noise: float = 1.0,
) -> Tensor:
    """Karras et al. Alg. 2: trapezoidal rule (Euler predictor, one corrector); the step to 0 is Euler."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "heun")
        denoised = call(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sig[i + 1], call(model, x_2, sig[i + 1], extra_args))
        x = x + (d + d_2) * (dt / 2)
    return x


def heunpp2(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun++ (Carzit's sd-webui-samplers-scheduler): the slope of a step blends the slopes at the next one
    or two sigmas, each weighted by its sigma relative to k * sigma_0 (k = points used); the last step is
    Euler, the one before it uses two points."""
    sig = as_floats(sigmas)
    end = sig[-1]
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "heunpp2")
        denoised = call(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sig[i + 1], call(model, x_2, sig[i + 1], extra_args))
        if sig[i + 2] == end:
            w_2 = sig[i + 1] / (2 * sig[0])
            x = x + ((1 - w_2) * d + w_2 * d_2) * dt
            continue
        x_3 = x_2 + d_2 * (sig[i + 2] - sig[i + 1])
        d_3 = to_d(x_3, sig[i + 2], call(model, x_3, sig[i + 2], extra_args))
        w_2, w_3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
        x = x + ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3) * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp(0.5 * (math.log(a) + math.log(b)))


def dpm_2(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 in Karras's form: midpoint rule with the midpoint at the geometric mean of the sigmas."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "dpm_2")
        denoised = call(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sig[i + 1])
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, call(model, x_2, sigma_mid, extra_args))
        x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


def dpm_2_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 to sigma_down, then ancestral noise."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        d = to_d(x, sig[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            sigma_mid = _log_midpoint(sig[i], sigma_down)
            x_2 = x + d * (sigma_mid - sig[i])
            d_2 = to_d(x_2, sigma_mid, call(model, x_2, sigma_mid, extra_args))
            x = x + d_2 * (sigma_down - sig[i])
        if sig[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise_sampler, "dpm_2_ancestral")(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def _dpmpp_first_order(x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> Tensor:
    """Exact solution of the ODE in lambda = -log sigma for a denoiser held constant over the step."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


def dpmpp_2s_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S): a half step in lambda to get a second denoiser, used for the whole step to sigma_down;
    then ancestral noise."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = _log_midpoint(sig[i], sigma_down)
            x_2 = _dpmpp_first_order(x, sig[i], sigma_mid, denoised)
            denoised_2 = call(model, x_2, sigma_mid, extra_args)
            x = _dpmpp_first_order(x, sig[i], sigma_down, denoised_2)
        if sig[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise_sampler, "dpmpp_2s_ancestral")(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_sde(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 evaluations): an ancestral step to lambda + r*h, then an ancestral step over
    the whole h with the denoisers blended by 1/(2r)."""
    sig = as_floats(sigmas)
    noise = need_noise(noise_sampler, "dpmpp_sde") if eta > 0 else None
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        sigma_s = sig[i] * math.exp(-r * h)
        fac = 1 / (2 * r)
        sigma_down, sigma_up = ancestral_step(sig[i], sigma_s, eta)
        x_2 = _dpmpp_first_order(x, sig[i], sigma_down, denoised)
        if noise is not None and sigma_up > 0:
            x_2 = x_2 + noise(sig[i], sigma_s) * s_noise * sigma_up
        denoised_2 = call(model, x_2, sigma_s, extra_args)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = _dpmpp_first_order(x, sig[i], sigma_down, (1 - fac) * denoised + fac * denoised_2)
        if noise is not None and sigma_up > 0:
            x = x + noise(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def ddpm(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ho et al. ancestral sampling: sample the posterior q(x_prev | x, x0 = D) in variance-preserving space."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = call(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        eps = (x - denoised) / sigma
        abar, abar_next = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        alpha = abar / abar_next
        x_vp = x * math.sqrt(abar)
        mean = (x_vp - (1 - alpha) / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        if sigma_next == 0:
            x = mean
            continue
        std = math.sqrt((1 - alpha) * (1 - abar_next) / (1 - abar))
        x = (mean + std * need_noise(noise_sampler, "ddpm")(sigma, sigma_next)) / math.sqrt(abar_next)
    return x


def lcm(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Latent consistency sampling: jump to the denoised estimate, re-noise it to the next sigma
    (x = D + sigma_next * noise, the noise scaling of eps and v discrete models)."""
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + need_noise(noise_sampler, "lcm")(sig[i], sig[i + 1]) * sig[i + 1]
    return x


Sampler = Callable[..., Tensor]

# This module's samplers by ComfyUI's names; sampler_registry.py assembles every module's into one list.
SAMPLERS: dict[str, Sampler] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "heunpp2": heunpp2,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "dpm_fast": dpm_fast,
    "dpm_adaptive": dpm_adaptive,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "ddpm": ddpm,
    "lcm": lcm,
    "ipndm": ipndm,
    "ipndm_v": ipndm_v,
    "deis": deis,
    "ddim": euler,  # DDIM with eta = 0 is Euler in sigma; ComfyUI's "ddim" is its euler sampler.
    "uni_pc": uni_pc,
    "uni_pc_bh2": uni_pc_bh2,
}
