"""SA-Solver: stochastic Adams predictor-corrector (Xue et al., NeurIPS 2023), data prediction, in the
variance-exploding variable x = x0 + sigma * noise.

With lambda = -log sigma, the SDE family with stochasticity tau (tau = 0: the probability-flow ODE; tau = 1:
the reverse diffusion SDE) held constant over a step [lambda_s, lambda_t] of length h has the exact solution

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s + integral over [lambda_s, lambda_t] of k e^{-k (lambda_t - u)} D(u) du
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,        k = 1 + tau^2     (paper eq. 11 with alpha = 1).

Stochastic Adams replaces D(u) by the Lagrange interpolant of denoiser outputs already computed, so each
output gets the weight b_j = integral of k e^{-k (lambda_t - u)} l_j(u) du (paper eqs. 15 and 18):

- predictor (order p): through lambda_s and the p - 1 points before it, one new model call at the result;
- corrector (order c): through lambda_t (that call's output) and the c - 1 points before, re-solving the same
  step from x_s with the same noise z, so its cost is free: the next step's predictor reuses that output.
  `sa_solver_pece` (predict, evaluate, correct, evaluate) calls the model again at the corrected state.

tau(sigma) = eta inside [sde_end_sigma, sde_start_sigma] (by default the model's sigmas at 20% and 80% of the
schedule, given `model_sampling`; the SD schedule's without it) and 0 outside: noise is injected only in the
middle of sampling. The orders warm up from 1 and, on a schedule ending at 0, come down again over the last
steps; the step to 0 returns the denoised estimate.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from torch import Tensor

from .model_sampling import ModelSampling
from .noise import NoiseSampler
from .samplers_adams import lagrange_integrals
from .samplers_base import Callback, Model, as_floats, call, combine, need_noise, report
from .schedules import DiscreteSchedule


def sde_interval(model_sampling: ModelSampling) -> tuple[float, float]:
    """(start, end) sigmas of the stochastic part: the model's sigmas at 20% and 80% of sampling (ComfyUI's)."""
    return model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.8)


@functools.cache
def default_sde_interval() -> tuple[float, float]:
    """`sde_interval` of the Stable Diffusion 1.x/2.x/XL schedule (all three share it), for callers that pass
    neither the sigmas nor the model's sampling."""
    return sde_interval(ModelSampling(DiscreteSchedule.from_config()))


def stochastic_adams_coeffs(
    nodes: list[float], lambda_s: float, lambda_t: float, tau: float, simple_order_2: bool = False,
    corrector: bool = False,
) -> list[float]:
    """Weights b_j of the denoiser outputs at `nodes` (lambdas, newest first) for the step lambda_s -> lambda_t.

    With `simple_order_2` and two nodes, the paper's simplified order-2 weights (appendix D): the interpolant's
    linear part is integrated against the constant 1 instead of the exponential weight, so the slope term is
    k h / 2 per unit slope (corrector, nodes lambda_t and lambda_s) or k h^2 / 2 over the node spacing
    (predictor, nodes lambda_s and the one before it)."""
    k = 1 + tau * tau
    h = lambda_t - lambda_s
    if simple_order_2 and len(nodes) == 2:
        total = -math.expm1(-k * h)
        if corrector:
            b_new = 0.5 * k * h
            return [b_new, total - b_new]
        b_old = 0.5 * k * h * h / (nodes[1] - lambda_s)
        return [total - b_old, b_old]
    return lagrange_integrals(nodes, lambda_s, lambda_t, weight=lambda u: k * np.exp(-k * (lambda_t - u)))


def _check(name: str, predictor_order: int, corrector_order: int, eta: float, s_noise: float) -> None:
    if not 1 <= predictor_order <= 6 or not 0 <= corrector_order <= 6:
        raise ValueError(f"sampler {name!r}: predictor_order must be 1..6 and corrector_order 0..6, got "
                         f"{predictor_order} and {corrector_order}")
    if eta < 0 or s_noise < 0:
        raise ValueError(f"sampler {name!r}: eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")


def _sa_solver(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback,
    noise_sampler: NoiseSampler | None, *, name: str, pece: bool, predictor_order: int, corrector_order: int,
    eta: float, s_noise: float, sde_start_sigma: float | None, sde_end_sigma: float | None, simple_order_2: bool,
    model_sampling: ModelSampling | None,
) -> Tensor:
    _check(name, predictor_order, corrector_order, eta, s_noise)
    default_start, default_end = default_sde_interval() if model_sampling is None else sde_interval(model_sampling)
    start = default_start if sde_start_sigma is None else sde_start_sigma
    end = default_end if sde_end_sigma is None else sde_end_sigma
    sig = as_floats(sigmas)
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    to_end = sig[-1] == 0
    history: list[Tensor] = []  # denoiser outputs, newest first
    x_pred, noise, tau = x, None, 0.0
    for i in range(n):
        denoised = call(model, x_pred, sig[i], extra_args)
        report(callback, x_pred, i, sig[i], sig[i], denoised)
        history.insert(0, denoised)
        del history[max(predictor_order, corrector_order):]
        p = min(predictor_order, len(history))
        c = 0 if i == 0 or (sig[i + 1] == 0 and not pece) else min(corrector_order, len(history))
        if to_end:
            p, c = min(p, n - 1 - i), min(c, n - i)

        if c == 0:
            x = x_pred
        else:  # re-solve the step sigma_{i-1} -> sigma_i (its tau, its noise) with the output just computed
            b = stochastic_adams_coeffs(lam[i - c + 1 : i + 1][::-1], lam[i - 1], lam[i], tau, simple_order_2, True)
            decay = (sig[i] / sig[i - 1]) * math.exp(-tau * tau * (lam[i] - lam[i - 1]))
            x = combine((decay, x), *zip(b, history[:c], strict=True), *([(1.0, noise)] if noise is not None else []))
            if pece:
                denoised = call(model, x, sig[i], extra_args)
                history[0] = denoised

        if sig[i + 1] == 0:
            return denoised
        tau = eta if end <= sig[i + 1] <= start else 0.0
        h = lam[i + 1] - lam[i]
        b = stochastic_adams_coeffs(lam[i - p + 1 : i + 1][::-1], lam[i], lam[i + 1], tau, simple_order_2)
        x_pred = combine(((sig[i + 1] / sig[i]) * math.exp(-tau * tau * h), x), *zip(b, history[:p], strict=True))
        noise = None
        if tau > 0 and s_noise > 0:
            unit = need_noise(noise_sampler, name)(sig[i], sig[i + 1])
            noise = unit * (sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * s_noise)
            x_pred.add_(noise)
    return x_pred  # a schedule that stops above 0: the state at its last sigma


def sa_solver(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, predictor_order: int = 3, corrector_order: int = 4,
    eta: float = 1.0, s_noise: float = 1.0, sde_start_sigma: float | None = None, sde_end_sigma: float | None = None,
    simple_order_2: bool = False, use_pece: bool = False, model_sampling: ModelSampling | None = None,
) -> Tensor:
    """SA-Solver, predictor order 3 and corrector order 4 by default: one model call a step. The stochastic
    interval is [sde_end_sigma, sde_start_sigma], by default `sde_interval(model_sampling)` (SD's schedule
    without one)."""
    return _sa_solver(model, x, sigmas, extra_args, callback, noise_sampler, name="sa_solver", pece=use_pece,
                      predictor_order=predictor_order, corrector_order=corrector_order, eta=eta, s_noise=s_noise,
                      sde_start_sigma=sde_start_sigma, sde_end_sigma=sde_end_sigma, simple_order_2=simple_order_2,
                      model_sampling=model_sampling)


def sa_solver_pece(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, predictor_order: int = 3, corrector_order: int = 4,
    eta: float = 1.0, s_noise: float = 1.0, sde_start_sigma: float | None = None, sde_end_sigma: float | None = None,
    simple_order_2: bool = False, model_sampling: ModelSampling | None = None,
) -> Tensor:
    """SA-Solver in PECE mode: the model is called again at each corrected state (two calls a step)."""
    return _sa_solver(model, x, sigmas, extra_args, callback, noise_sampler, name="sa_solver_pece", pece=True,
                      predictor_order=predictor_order, corrector_order=corrector_order, eta=eta, s_noise=s_noise,
                      sde_start_sigma=sde_start_sigma, sde_end_sigma=sde_end_sigma, simple_order_2=simple_order_2,
                      model_sampling=model_sampling)


SAMPLERS = {"sa_solver": sa_solver, "sa_solver_pece": sa_solver_pece}
