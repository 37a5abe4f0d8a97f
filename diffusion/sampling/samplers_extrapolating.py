"""Two-step samplers that extrapolate the last two model outputs: the RES multistep exponential integrator and
gradient estimation, each plain, ancestral (RES) and CFG++ (see samplers_cfgpp for the CFG++ rule).

Conventions in `samplers_base`: model(x, sigma) is the denoised estimate D, x = x0 + sigma * noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .noise import NoiseSampler
from .samplers_base import Callback, Model, ancestral_step, as_floats, call, need_noise, report, to_d
from .samplers_cfgpp import UncondCapture


def _evaluator(model: Model, extra_args: dict | None, cfg_pp: bool) -> Callable[[Tensor, float], tuple[Tensor, Tensor]]:
    """(D, U) per evaluation: U the unconditional estimate for CFG++, else D itself."""
    if cfg_pp:
        return UncondCapture(model, extra_args)

    def plain(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        denoised = call(model, x, sigma, extra_args)
        return denoised, denoised

    return plain


def _res_multistep(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback,
    noise_sampler: NoiseSampler | None, eta: float, s_noise: float, cfg_pp: bool, name: str,
) -> Tensor:
    """RES second-order multistep (Zhang & Chen 2023, "Improved order analysis and design of exponential
    integrator for diffusion models", 2308.02157).

    In lambda = -log sigma the ODE is dx/dlambda = D - x, so over a step of length h = log(sigma / sigma_down)
        x_next = e^{-h} x + integral_0^h e^{-(h - tau)} D(tau) dtau.
    RES takes D linear in lambda through this step's estimate D and the last one D_prev, h_last apart
    (h_last = the previous step's own length in lambda, from its sigma to its sigma_down), which integrates to
        x_next = e^{-h} x + h phi_1(-h) D + h^2 phi_2(-h) (D - D_prev) / h_last,
        phi_1(z) = (e^z - 1) / z,  phi_2(z) = (phi_1(z) - 1) / z,
    i.e. the paper's b_1 = phi_1 - phi_2 / c_2, b_2 = phi_2 / c_2 with c_2 = -h_last / h the previous node.
    The first step is first order (Euler in sigma), a step to 0 returns D. With eta > 0 each step goes to
    sigma_down and adds noise of std sigma_up (ancestral). CFG++ (ComfyUI's form): the first step is
    D + (sigma_down / sigma) (x - U), the later ones the RES step from x + D - U on the unconditional
    estimates U and U_prev.
    """
    sig = as_floats(sigmas)
    evaluate = _evaluator(model, extra_args, cfg_pp)
    old_uncond: Tensor | None = None  # (U is D itself without CFG++)
    h_last = 0.0
    for i in range(len(sig) - 1):
        denoised, uncond = evaluate(x, sig[i])
        report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        start = x + (denoised - uncond) if cfg_pp else x
        if sigma_down == 0:
            x = denoised
            h = 0.0
        else:
            h = math.log(sig[i]) - math.log(sigma_down)
            decay = math.exp(-h)
            if old_uncond is not None and h_last > 0 and h > 0:  # (a repeated sigma is a no-op step)
                phi_1 = -math.expm1(-h) / h
                phi_2 = (1 - phi_1) / h  # phi_2(-h) = (phi_1(-h) - 1) / (-h)
                x = decay * start + (1 - decay) * uncond + (h * h * phi_2 / h_last) * (uncond - old_uncond)
            else:
                x = decay * start + (1 - decay) * denoised  # e^{-h} x + h phi_1(-h) D
        if sig[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise_sampler, name)(sig[i], sig[i + 1]) * s_noise * sigma_up
        old_uncond, h_last = uncond, h
    return x


def res_multistep(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_noise: float = 1.0,
) -> Tensor:
    """RES 2nd-order multistep exponential integrator on the probability-flow ODE (see _res_multistep)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, 0.0, s_noise, False,
                          "res_multistep")


def res_multistep_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_noise: float = 1.0,
) -> Tensor:
    """RES multistep with CFG++ (steps from x + D - U, guided D history)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, 0.0, s_noise, True,
                          "res_multistep_cfg_pp")


def res_multistep_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """RES multistep to sigma_down, then ancestral noise of std sigma_up."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, False,
                          "res_multistep_ancestral")


def res_multistep_ancestral_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """RES multistep ancestral with CFG++."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, True,
                          "res_multistep_ancestral_cfg_pp")


def _gradient_estimation(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, gamma: float,
    cfg_pp: bool,
) -> Tensor:
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an
    optimization perspective"): denoising approximates a gradient step on the distance to the data manifold,
    d = (x - D) / sigma, whose error is reduced by combining it with the previous one,
        d_bar = gamma * d + (1 - gamma) * d_prev   (gamma = 2),
        x_next = x + (sigma_next - sigma) * d_bar;
    the first step is Euler, the step to 0 returns D (as ComfyUI's does). CFG++ re-noises with the
    unconditional direction: from x + D - U with d = (x - U) / sigma (and that history), which for the first
    step gives x_next = D + sigma_next * d.
    """
    sig = as_floats(sigmas)
    evaluate = _evaluator(model, extra_args, cfg_pp)
    old_d: Tensor | None = None
    for i in range(len(sig) - 1):
        denoised, uncond = evaluate(x, sig[i])
        report(callback, x, i, sig[i], sig[i], denoised)
        d = to_d(x, sig[i], uncond)
        start = x + (denoised - uncond) if cfg_pp else x
        d_bar = d if old_d is None else gamma * d + (1 - gamma) * old_d
        x = denoised if sig[i + 1] == 0 else start + d_bar * (sig[i + 1] - sig[i])
        old_d = d
    return x


def gradient_estimation(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, ge_gamma: float = 2.0,
) -> Tensor:
    """Gradient-estimation sampler (see _gradient_estimation)."""
    return _gradient_estimation(model, x, sigmas, extra_args, callback, ge_gamma, False)


def gradient_estimation_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, ge_gamma: float = 2.0,
) -> Tensor:
    """Gradient-estimation sampler with CFG++."""
    return _gradient_estimation(model, x, sigmas, extra_args, callback, ge_gamma, True)


Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "res_multistep": res_multistep,
    "res_multistep_cfg_pp": res_multistep_cfg_pp,
    "res_multistep_ancestral": res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": res_multistep_ancestral_cfg_pp,
    "gradient_estimation": gradient_estimation,
    "gradient_estimation_cfg_pp": gradient_estimation_cfg_pp,
}
