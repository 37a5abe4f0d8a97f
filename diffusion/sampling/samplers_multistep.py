"""Multistep samplers in lambda = -log sigma: one network call per step, earlier steps' outputs reused for
higher order. The DPM-Solver++ and UniPC families work on the denoised estimates, where the linear part of the
ODE is solved exactly. Conventions in `samplers_base`; the Adams–Bashforth family (lms, ipndm, ipndm_v, deis)
is in `samplers_adams`.
"""

from __future__ import annotations

import math

from torch import Tensor

from .noise import NoiseSampler
from .samplers_base import Callback, Model, as_floats, call, combine, need_noise, report


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


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting, for the few-unknown systems of UniPC (numpy's solve costs
    more in call overhead than the arithmetic)."""
    n = len(rhs)
    a = [[*row, b] for row, b in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for row in range(col + 1, n):
            f = a[row][col] / a[col][col]
            for k in range(col, n + 1):
                a[row][k] -= f * a[col][k]
    out = [0.0] * n
    for row in reversed(range(n)):
        out[row] = (a[row][n] - sum(a[row][k] * out[k] for k in range(row + 1, n))) / a[row][row]
    return out


def _unipc_weights(rks: list[float], hh: float, variant: str, solve_all: bool) -> tuple[list[float], float]:
    """UniPC's rho coefficients (Zhao et al. 2023, eq. 8 system R rho = b) and B(h)."""
    order = len(rks)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r_mat = [[r ** (k - 1) for r in rks] for k in range(1, order + 1)]
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if solve_all:  # corrector: uses the new model output too
        rhos = [0.5] if order == 1 else _solve(r_mat, b)
    else:  # predictor: order - 1 history terms
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in r_mat[:-1]], b[:-1])
    return rhos, b_h


def _unipc_update(
    x: Tensor, sig: list[float], lam: list[float], outs: dict[int, Tensor], s0: int, t: int, order: int,
    variant: str, model_t: Tensor | None,
) -> Tensor:
    """UniP (model_t None) or UniC step from point s0 to point t with data prediction, in the VE form
    x_t = (sigma_t / sigma_s0) x - expm1(-h) m0 - B(h) * sum(rho_k D_k), D_k = (m_k - m0) / r_k (and, for UniC,
    D = model_t - m0 with the last rho); folded into one weight per tensor."""
    h = lam[t] - lam[s0]
    hh = -h
    m0 = outs[s0]
    rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, order)]
    terms = [(sig[t] / sig[s0], x)]
    c_m0 = -math.expm1(hh)
    if model_t is None and order == 1:
        return combine(*terms, (c_m0, m0))
    rhos, b_h = _unipc_weights([*rks, 1.0], hh, variant, solve_all=model_t is not None)
    for k, (rho, r) in enumerate(zip(rhos, rks, strict=False), start=1):
        terms.append((-b_h * rho / r, outs[s0 - k]))
        c_m0 += b_h * rho / r
    if model_t is not None:
        terms.append((-b_h * rhos[-1], model_t))
        c_m0 += b_h * rhos[-1]
    return combine(*terms, (c_m0, m0))


# ComfyUI's UniPC ends a schedule that reaches 0 at sigma 0.001 instead (a last predictor step, no model call
# at 0): its pictures keep that trace of noise, where k-diffusion-style samplers return the denoised estimate.
UNIPC_FINAL_SIGMA = 0.001


def _uni_pc(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, order: int,
    variant: str,
) -> Tensor:
    """The multistep UniPC loop: at each new model output, UniC corrects the step just taken (with that
    output), then UniP predicts the next one; the order warms up from 1 and drops again over the last steps.
    The final step is predictor only."""
    sig = as_floats(sigmas)
    if sig[-1] == 0:
        sig[-1] = UNIPC_FINAL_SIGMA
    n = len(sig) - 1
    lam = [-math.log(s) for s in sig]
    outs: dict[int, Tensor] = {}
    x_prev, prev_order = None, 1
    for i in range(n):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if x_prev is not None:  # UniC: correct this step's start with the output just computed
            x = _unipc_update(x_prev, sig, lam, outs, i - 1, i, prev_order, variant, denoised)
        outs[i] = denoised
        outs.pop(i - order, None)
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
