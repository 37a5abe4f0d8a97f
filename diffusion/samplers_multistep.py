"""Multistep samplers: one network call per step, earlier steps' outputs reused for higher order.

Conventions in `samplers_base`. Adams–Bashforth-type methods (lms, deis, ipndm_v) integrate the Lagrange
interpolant of past ODE slopes in sigma; the DPM-Solver++ and UniPC families work in lambda = -log sigma on
the denoised estimates, where the linear part of the ODE is solved exactly.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from .noise import NoiseSampler
from .samplers_base import Callback, Model, as_floats, call, need_noise, report, to_d

# Gauss–Legendre nodes/weights on [-1, 1]; 4 points integrate polynomials up to degree 7 exactly, more than the
# degree <= 3 Lagrange basis of a 4th-order method needs.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


def adams_bashforth_coeffs(nodes: list[float], start: float, end: float) -> list[float]:
    """Integral over [start, end] of each Lagrange basis polynomial of `nodes` (nodes[0] the newest)."""
    mid, half = 0.5 * (start + end), 0.5 * (end - start)
    taus = mid + half * _GL_NODES
    coeffs = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(taus)
        for k, node_k in enumerate(nodes):
            if k != j:
                basis = basis * (taus - node_k) / (node_j - node_k)
        coeffs.append(float(half * np.dot(_GL_WEIGHTS, basis)))
    return coeffs


def _adams_bashforth(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, order: int,
    denoise_last: bool,
) -> Tensor:
    """Variable-step Adams–Bashforth in sigma on dx/dsigma = (x - D) / sigma, warming up from order 1.
    With `denoise_last` the step to sigma = 0 returns the denoised estimate (an Euler step)."""
    sig = as_floats(sigmas)
    slopes: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        slopes.insert(0, to_d(x, sig[i], denoised))
        del slopes[order:]
        if denoise_last and sig[i + 1] == 0:
            x = denoised
            continue
        coeffs = adams_bashforth_coeffs([sig[i - k] for k in range(len(slopes))], sig[i], sig[i + 1])
        for c, d in zip(coeffs, slopes, strict=True):
            x = x + c * d
    return x


def lms(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, order: int = 4,
) -> Tensor:
    """Linear multistep (k-diffusion/A1111 "LMS"): Adams–Bashforth of `order` in sigma, including the last step."""
    return _adams_bashforth(model, x, sigmas, extra_args, callback, order, denoise_last=False)


def deis(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 3,
) -> Tensor:
    """DEIS, time-AB variant (Zhang & Chen 2023) for the VE ODE in sigma: the exponential integrator's
    coefficients reduce to integrals of the Lagrange basis, integrated here exactly (ComfyUI sums 10^4 points)."""
    return _adams_bashforth(model, x, sigmas, extra_args, callback, max_order, denoise_last=True)


def ipndm_v(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 4,
) -> Tensor:
    """iPNDM with variable steps (Zhang & Chen; zju-pi/diff-sampler): Adams–Bashforth whose coefficients
    follow the actual sigma spacing; the last step returns the denoised estimate."""
    return _adams_bashforth(model, x, sigmas, extra_args, callback, max_order, denoise_last=True)


# Fixed-step Adams–Bashforth weights, newest slope first.
_AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 4,
) -> Tensor:
    """Improved PNDM (Zhang & Chen): Adams–Bashforth with the constant-step weights whatever the spacing."""
    sig = as_floats(sigmas)
    slopes: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        slopes.insert(0, to_d(x, sig[i], denoised))
        del slopes[max_order:]
        if sig[i + 1] == 0:
            x = denoised
            continue
        slope = sum(w * d for w, d in zip(_AB_WEIGHTS[len(slopes)], slopes, strict=True))
        x = x + slope * (sig[i + 1] - sig[i])
    return x


def dpmpp_2m(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the first-order exponential step with the denoiser extrapolated
    linearly in lambda from the last two steps; first and last steps are first order."""
    sig = as_floats(sigmas)
    old_denoised = None
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        ratio = sig[i + 1] / sig[i]
        blend = denoised
        if old_denoised is not None:
            r = (math.log(sig[i - 1]) - math.log(sig[i])) / (math.log(sig[i]) - math.log(sig[i + 1]))
            blend = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = ratio * x + (1 - ratio) * blend
        old_denoised = denoised
    return x


def dpmpp_2m_sde(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M): with eta = 1 the data-prediction SDE is solved with the exact noise variance
    sigma_next^2 * (1 - e^{-2h}); the second-order term uses the midpoint or Heun form."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = as_floats(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        eta_h = eta * h
        x = (sig[i + 1] / sig[i]) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
        if old_denoised is not None:
            diff = (denoised - old_denoised) * (h / h_last)
            if solver_type == "heun":
                x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * diff
            else:
                x = x - 0.5 * math.expm1(-h - eta_h) * diff
        if eta > 0:
            noise = need_noise(noise_sampler, "dpmpp_2m_sde")(sig[i], sig[i + 1])
            x = x + noise * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


def dpmpp_3m_sde(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(3M): the 2M SDE step plus a second divided difference of the denoisers, weighted by
    phi_2 and phi_3 of (1 + eta) h."""
    sig = as_floats(sigmas)
    history: list[tuple[Tensor, float]] = []  # (denoised, h of the step that followed it), newest first
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(history) >= 2:
            (d_1, h_1), (d_2, h_2) = history[0], history[1]
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif len(history) == 1:
            d_1, h_1 = history[0]
            x = x + phi_2 * (denoised - d_1) * (h / h_1)
        if eta > 0:
            noise = need_noise(noise_sampler, "dpmpp_3m_sde")(sig[i], sig[i + 1])
            x = x + noise * sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        history = [(denoised, h), *history[:1]]
    return x


def _unipc_weights(rks: list[float], hh: float, variant: str, solve_all: bool) -> tuple[np.ndarray, float]:
    """UniPC's rho coefficients (Zhao et al. 2023, eq. 8 system R rho = b) and B(h)."""
    order = len(rks)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r_mat = np.array([[r ** (k - 1) for r in rks] for k in range(1, order + 1)])
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    b = np.array(b)
    if solve_all:  # corrector: uses the new model output too
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b)
    else:  # predictor: order - 1 history terms
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
    return rhos, b_h


def _unipc_update(
    x: Tensor, sig: list[float], lam: list[float], outs: dict[int, Tensor], s0: int, t: int, order: int,
    variant: str, model_t: Tensor | None,
) -> Tensor:
    """UniP (model_t None) or UniC step from point s0 to point t with data prediction, in the VE form
    x_t = (sigma_t / sigma_s0) x - expm1(-h) m0 - B(h) * sum(rho_k D_k)."""
    h = lam[t] - lam[s0]
    hh = -h
    m0 = outs[s0]
    rks, diffs = [], []
    for k in range(1, order):
        r = (lam[s0 - k] - lam[s0]) / h
        rks.append(r)
        diffs.append((outs[s0 - k] - m0) / r)
    rks.append(1.0)
    x_t = (sig[t] / sig[s0]) * x - math.expm1(hh) * m0
    if model_t is None:
        if order == 1:
            return x_t
        rhos, b_h = _unipc_weights(rks, hh, variant, solve_all=False)
        return x_t - b_h * sum(float(rho) * d for rho, d in zip(rhos, diffs, strict=True))
    rhos, b_h = _unipc_weights(rks, hh, variant, solve_all=True)
    correction = float(rhos[-1]) * (model_t - m0)
    for rho, d in zip(rhos[:-1], diffs, strict=True):
        correction = correction + float(rho) * d
    return x_t - b_h * correction


def _uni_pc(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, order: int,
    variant: str,
) -> Tensor:
    sig = as_floats(sigmas)
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    outs: dict[int, Tensor] = {}
    x_prev, prev_order = None, 1
    for i in range(n):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if x_prev is not None:  # UniC: correct this step's start with the output just computed
            x = _unipc_update(x_prev, sig, lam, outs, i - 1, i, prev_order, variant, denoised)
        outs[i] = denoised
        outs.pop(i - order, None)
        if sig[i + 1] == 0:
            x = denoised
            continue
        step_order = min(order, n - i, i + 1)  # warm up, and lower the order towards the end
        x_prev, prev_order = x, step_order
        x = _unipc_update(x, sig, lam, outs, i, i + 1, step_order, variant, None)
    return x


def uni_pc(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, order: int = 3,
) -> Tensor:
    """UniPC (Zhao et al. 2023), multistep predictor-corrector, data prediction, B(h) = h ("bh1")."""
    return _uni_pc(model, x, sigmas, extra_args, callback, order, "bh1")


def uni_pc_bh2(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, order: int = 3,
) -> Tensor:
    """UniPC with B(h) = e^h - 1 ("bh2"), recommended for guided sampling with few steps."""
    return _uni_pc(model, x, sigmas, extra_args, callback, order, "bh2")
