"""Adams–Bashforth-type samplers: one network call per step, the ODE slopes of earlier steps reused.

All four integrate the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma (Karras et al.
eq. 3; d is the noise prediction eps) and differ only in how the slope is extrapolated over the step
[sigma_i, sigma_{i+1}] from the slopes d_i, d_{i-1}, ... already computed:

- `lms`: the Lagrange interpolant of the slopes in sigma, integrated exactly (variable-step Adams–Bashforth);
- `ipndm`: the classic constant-step Adams–Bashforth weights, whatever the spacing (Zhang & Chen's iPNDM);
- `ipndm_v`: the variable-step iPNDM coefficients (closed forms in the step ratios, see `ipndm_v_coeffs`);
- `deis`: tAB-DEIS (Zhang & Chen 2022), the exponential integrator of the VP ODE, whose slope polynomial lives
  in VP time t rather than in sigma (see `deis_coeffs`).

Conventions in `samplers_base`. The step to sigma = 0 returns the denoised estimate (ComfyUI does so for all
four; k-diffusion's `lms` takes an Adams step to 0 instead, see the README).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import Tensor

from .noise import NoiseSampler
from .samplers_base import Callback, Model, as_floats, call, combine, report, to_d

# Gauss–Legendre rule on [-1, 1]. 16 points integrate polynomials up to degree 31 exactly, and smooth
# non-polynomial integrands (DEIS's warped basis, SA-Solver's exponential weight) to rounding.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)


def lagrange_integrals(
    nodes: list[float], start: float, end: float, warp: Callable[[np.ndarray], np.ndarray] | None = None,
    weight: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[float]:
    """For each Lagrange basis polynomial l_j of `nodes` (l_j(nodes[k]) = [j == k]): the integral over
    u in [start, end] of weight(u) * l_j(warp(u)). `nodes` are in warped coordinates; warp and weight default
    to the identity and 1. By Gauss–Legendre quadrature (16 points)."""
    mid, half = 0.5 * (start + end), 0.5 * (end - start)
    us = mid + half * _GL_NODES
    taus = us if warp is None else warp(us)
    w = _GL_WEIGHTS * half if weight is None else _GL_WEIGHTS * half * weight(us)
    node = np.asarray(nodes, dtype=np.float64)
    others = ~np.eye(len(nodes), dtype=bool)
    # numerator[j, q] = prod over k != j of (tau_q - node_k); denominator[j] = prod over k != j of (node_j - node_k)
    numerator = np.prod(np.where(others[:, :, None], taus[None, None, :] - node[None, :, None], 1.0), axis=1)
    denominator = np.prod(np.where(others, node[:, None] - node[None, :], 1.0), axis=1)
    return ((numerator @ w) / denominator).tolist()


def adams_bashforth_coeffs(nodes: list[float], start: float, end: float) -> list[float]:
    """Integral over [start, end] of each Lagrange basis polynomial of `nodes` (nodes[0] the newest)."""
    return lagrange_integrals(nodes, start, end)


def _multistep(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, order: int,
    coeffs: Callable[[list[float], int, int], list[float]],
) -> Tensor:
    """x_{i+1} = x_i + sum_k c_k d_{i-k}, with the coefficients c of `coeffs(sigmas, i, order_used)` (which
    include the step length), the order warming up from 1; the step to sigma 0 returns D."""
    sig = as_floats(sigmas)
    slopes: list[Tensor] = []  # newest first
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        slopes.insert(0, to_d(x, sig[i], denoised))
        del slopes[order:]
        if sig[i + 1] == 0:
            x = denoised
            continue
        x = combine((1.0, x), *zip(coeffs(sig, i, len(slopes)), slopes, strict=True))
    return x


def _lms_coeffs(sig: list[float], i: int, order: int) -> list[float]:
    return adams_bashforth_coeffs([sig[i - k] for k in range(order)], sig[i], sig[i + 1])


def lms(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, order: int = 4,
) -> Tensor:
    """Linear multistep ("LMS"): the slope's Lagrange interpolant over the last `order` sigmas, integrated
    exactly over the step. Returns the denoised estimate on a last step to 0, as ComfyUI does."""
    return _multistep(model, x, sigmas, extra_args, callback, order, _lms_coeffs)


# Constant-step Adams–Bashforth weights, newest slope first.
_AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_coeffs(sig: list[float], i: int, order: int) -> list[float]:
    return [w * (sig[i + 1] - sig[i]) for w in _AB_WEIGHTS[order]]


def ipndm(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 4,
) -> Tensor:
    """Improved PNDM (Zhang & Chen): Adams–Bashforth with the constant-step weights whatever the spacing."""
    _check_order("ipndm", max_order, 4)
    return _multistep(model, x, sigmas, extra_args, callback, max_order, _ipndm_coeffs)


def ipndm_v_coeffs(sig: list[float], i: int, order: int) -> list[float]:
    """The variable-step iPNDM weights (Zhou et al. 2024, the AMED-Solver authors' iPNDM_v), times the step.

    With h = sigma_{i+1} - sigma_i and h_k = sigma_{i-k+1} - sigma_{i-k} the previous steps, a = h / h_1:
      order 2: [1 + a/2, -a/2] (the exact variable-step AB2);
      order 3: p = (1 - h^2 / (3 h_1 (h_1 + h_2))) / 2,
               [1 + a/2 + p, -a/2 - (1 + h_1/h_2) p, p h_1/h_2];
      order 4: q = h_1 (h_1 + h_2) / (h_2 (h_2 + h_3)),
               r = ((1 - h/(3(h + h_1))) / 2 + (1 - h/(2(h + h_1))) h / (6 (h + h_1 + h_2)))
                   * h (h + h_1)(h + h_1 + h_2) / (h_1 (h_1 + h_2)(h_1 + h_2 + h_3)),
               [1 + a/2 + p + r, -a/2 - (1 + h_1/h_2) p - (1 + h_1/h_2 + q) r,
                p h_1/h_2 + (h_1/h_2 + q (1 + h_2/h_3)) r, -r q h_1/h_2].
    Every order integrates constant and linear slopes exactly. Beyond that these are not the exact Lagrange
    integrals of `lms`: p is what the published sampler computes (the exact AB3 term would be
    h (2h + 3h_1) / (6 h_1 (h_1 + h_2))), so only orders 1-3 reduce to Adams–Bashforth at equal steps, and
    order 4 there is AB3 + 11/24 (1, -3, 3, -1) where AB4 has 9/24, and on uneven steps order 4's weights sum
    to h (1 + r q (h_2/h_3 - h_1/h_2)) rather than h (its last weight has h_1/h_2 where a consistent method
    would have h_2/h_3; on Karras steps the two ratios are close). We keep the published weights because they
    are what the name means in ComfyUI and the AMED-Solver code, and on Karras schedules they land about 5x
    closer to the exact ODE solution than the exact order-4 integrals (tests/diffusion/test_samplers_b.py)."""
    h = sig[i + 1] - sig[i]
    if order == 1:
        return [h]
    h1 = sig[i] - sig[i - 1]
    a = h / h1
    if order == 2:
        return [h * (1 + a / 2), -h * a / 2]
    h2 = sig[i - 1] - sig[i - 2]
    p = (1 - h * h / (3 * h1 * (h1 + h2))) / 2
    if order == 3:
        return [h * (1 + a / 2 + p), h * (-a / 2 - (1 + h1 / h2) * p), h * p * h1 / h2]
    h3 = sig[i - 2] - sig[i - 3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    r = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) * (
        h * (h + h1) * (h + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    return [
        h * (1 + a / 2 + p + r),
        h * (-a / 2 - (1 + h1 / h2) * p - (1 + h1 / h2 + q) * r),
        h * (p * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * r),
        -h * r * q * h1 / h2,
    ]


def ipndm_v(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 4,
) -> Tensor:
    """iPNDM with variable steps: Adams–Bashforth whose weights follow the actual sigma spacing
    (`ipndm_v_coeffs`); the last step to 0 returns the denoised estimate."""
    _check_order("ipndm_v", max_order, 4)
    return _multistep(model, x, sigmas, extra_args, callback, max_order, ipndm_v_coeffs)


# DEIS's VP time: the linear-beta VP SDE, beta(t) = beta_min + beta_d t, fitted so that sigma(t = 1e-3) = 0.002
# and sigma(1) = 80 (EDM's range; what the DEIS sampler of ComfyUI and zju-pi/diff-sampler use for any model).
# Its sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
_VP_EPS, _VP_SIGMA_MIN, _VP_SIGMA_MAX = 1e-3, 0.002, 80.0
_VP_BETA_D = 2 * (math.log1p(_VP_SIGMA_MIN**2) / _VP_EPS - math.log1p(_VP_SIGMA_MAX**2)) / (_VP_EPS - 1)
_VP_BETA_MIN = math.log1p(_VP_SIGMA_MAX**2) - 0.5 * _VP_BETA_D


def vp_time(sigma: np.ndarray | float) -> np.ndarray | float:
    """The VP time t of noise level sigma (the inverse of sigma(t) above)."""
    return (np.sqrt(_VP_BETA_MIN**2 + 2 * _VP_BETA_D * np.log1p(np.square(sigma))) - _VP_BETA_MIN) / _VP_BETA_D


def deis_coeffs(sig: list[float], i: int, order: int) -> list[float]:
    """tAB-DEIS weights. For the VP ODE with eps prediction the exponential integrator over [t_i, t_{i+1}] is,
    in the VE variable x = x_vp / alpha, x_{i+1} = x_i + integral of eps(t) dsigma(t) (DEIS eq. 11 with
    Psi = alpha_{t'}/alpha_t). tAB-DEIS replaces eps(t) by its Lagrange interpolant through the last `order`
    VP times t_{i-k}, so C_k = integral over sigma in [sigma_i, sigma_{i+1}] of l_k(t(sigma)): substituting
    sigma for t leaves an integrand free of the 1/sigma singularity of dsigma/dt (exact up to quadrature
    rounding, where ComfyUI sums 10^4 points in t)."""
    nodes = [float(vp_time(sig[i - k])) for k in range(order)]
    return lagrange_integrals(nodes, sig[i], sig[i + 1], warp=vp_time)


def deis(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 3,
) -> Tensor:
    """DEIS, tAB variant (Zhang & Chen 2022): the exponential integrator of the VP ODE with the noise
    prediction extrapolated polynomially in VP time (`deis_coeffs`); first step Euler, last step to 0 returns
    the denoised estimate."""
    _check_order("deis", max_order, 4)
    return _multistep(model, x, sigmas, extra_args, callback, max_order, deis_coeffs)


def _check_order(name: str, order: int, most: int) -> None:
    if not 1 <= order <= most:
        raise ValueError(f"sampler {name!r}: max_order must be between 1 and {most}, got {order}")
