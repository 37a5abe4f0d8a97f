"""DPM-Solver (Lu et al. 2022), noise-prediction form, with fixed ("fast") or adaptive step sizes.

Time is t = -log sigma, the noise prediction eps(x, t) = (x - D(x, sigma)) / sigma. These samplers choose
their own time grid between sigma_max = sigmas[0] and sigma_min (the smallest non-zero sigma given); they end
at sigma_min, as k-diffusion and ComfyUI do, so the result keeps noise of that (small) level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .noise import NoiseSampler
from .samplers_base import Callback, Model, ancestral_step, as_floats, call, need_noise, report


class _DPMSolver:
    """Steps of DPM-Solver-1/2/3 from time t to t_next; `eps` at the step's start is passed in so that
    solvers of two orders (adaptive stepping) share it."""

    def __init__(self, model: Model, extra_args: dict | None) -> None:
        self.model, self.extra_args = model, extra_args
        self.nfe = 0

    def eps(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        sigma = math.exp(-t)
        denoised = call(self.model, x, sigma, self.extra_args)
        self.nfe += 1
        return (x - denoised) / sigma, denoised

    def step_1(self, x: Tensor, t: float, t_next: float, eps: Tensor) -> Tensor:
        return x - math.exp(-t_next) * math.expm1(t_next - t) * eps

    def first_stage(self, x: Tensor, t: float, t_next: float, eps: Tensor, r1: float) -> Tensor:
        """eps at t + r1 * h after a first-order step there: the first stage of DPM-Solver-2 and -3 alike."""
        s1 = t + r1 * (t_next - t)
        return self.eps(x - math.exp(-s1) * math.expm1(r1 * (t_next - t)) * eps, s1)[0]

    def step_2(self, x: Tensor, t: float, t_next: float, eps: Tensor, r1: float = 1 / 2,
               eps_r1: Tensor | None = None) -> Tensor:
        h = t_next - t
        if eps_r1 is None:
            eps_r1 = self.first_stage(x, t, t_next, eps, r1)
        sigma_next = math.exp(-t_next)
        return x - sigma_next * math.expm1(h) * eps - sigma_next / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x: Tensor, t: float, t_next: float, eps: Tensor, r1: float = 1 / 3, r2: float = 2 / 3,
               eps_r1: Tensor | None = None) -> Tensor:
        h = t_next - t
        s2 = t + r2 * h
        if eps_r1 is None:
            eps_r1 = self.first_stage(x, t, t_next, eps, r1)
        u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
              - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, _ = self.eps(u2, s2)
        sigma_next = math.exp(-t_next)
        return x - sigma_next * math.expm1(h) * eps - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)

    def step(self, order: int, x: Tensor, t: float, t_next: float, eps: Tensor) -> Tensor:
        return (self.step_1, self.step_2, self.step_3)[order - 1](x, t, t_next, eps)


def _sigma_range(sigmas: Tensor) -> tuple[float, float]:
    sig = as_floats(sigmas)
    positive = [s for s in sig if s > 0]
    if len(sig) < 2 or not positive or positive[-1] >= sig[0]:
        raise ValueError(f"DPM-Solver needs a decreasing sigma list with a positive minimum, got {sig}")
    return positive[-1], sig[0]


def _noisy_target(t: float, t_next: float, eta: float) -> tuple[float, float]:
    """Ancestral split of the step in t: the deterministic target time and the std of the noise to add."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_down = -math.log(sigma_down)
    return t_down, math.sqrt(max(math.exp(-2 * t_next) - sigma_down**2, 0.0))


def dpm_fast(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 0.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast: len(sigmas) - 1 network calls spent on uniform steps in t, mostly third order
    (Lu et al. 2022, sec. 3.4)."""
    sigma_min, sigma_max = _sigma_range(sigmas)
    nfe = len(sigmas) - 1
    solver = _DPMSolver(model, extra_args)
    m = nfe // 3 + 1
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    ts = [t_start + (t_end - t_start) * k / m for k in range(m + 1)]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_target, sigma_up = _noisy_target(t, t_next, eta)
        eps, denoised = solver.eps(x, t)
        report(callback, x, i, math.exp(-t), math.exp(-t), denoised)
        x = solver.step(order, x, t, t_target, eps)
        if sigma_up > 0:
            x = x + need_noise(noise_sampler, "dpm_fast")(math.exp(-t), math.exp(-t_next)) * s_noise * sigma_up
    return x


class PIDStepSizeController:
    """Step-size control from the error estimate of an embedded lower-order solution (Söderlind's PID filter;
    with the default I-only coefficients h *= (1/error)^(1/order), softened by an arctan limiter)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float = 0.81, eps: float = 1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[1], self.errs[2] = self.errs[0], self.errs[1]
        self.h *= factor
        return accept


def dpm_adaptive(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
    h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
    accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0, max_steps: int = 10_000,
) -> Tensor:
    """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022, sec. 3.3 and appendix): each step compares the
    order-1/2 (or 2/3) solutions, which share their model calls (3 per attempted step for -23, 2 for -12); only
    the first and last sigmas are used, not the step count."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    sigma_min, sigma_max = _sigma_range(sigmas)
    solver = _DPMSolver(model, extra_args)
    t_end = -math.log(sigma_min)
    s = -math.log(sigma_max)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev = x
    steps = 0
    while s < t_end - 1e-5:
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"dpm_adaptive did not reach sigma_min within {max_steps} steps (rtol={rtol})")
        t = min(t_end, s + pid.h)
        t_target, sigma_up = _noisy_target(s, t, eta)
        if t_target > t_end:  # the ancestral target overshoots sigma_min: stop there, the rest is noise
            t_target = t_end
            sigma_up = math.sqrt(max(math.exp(-2 * t) - math.exp(-2 * t_end), 0.0))
        eps, denoised = solver.eps(x, s)
        if order == 2:
            x_low = solver.step_1(x, s, t_target, eps)
            x_high = solver.step_2(x, s, t_target, eps)
        else:  # the order-2 and order-3 solutions share their first stage at s + h/3: one evaluation for both
            eps_r1 = solver.first_stage(x, s, t_target, eps, 1 / 3)
            x_low = solver.step_2(x, s, t_target, eps, r1=1 / 3, eps_r1=eps_r1)
            x_high = solver.step_3(x, s, t_target, eps, eps_r1=eps_r1)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.vector_norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        report(callback, x, steps - 1, math.exp(-s), math.exp(-s), denoised)
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if sigma_up > 0:
                x = x + need_noise(noise_sampler, "dpm_adaptive")(math.exp(-s), math.exp(-t)) * s_noise * sigma_up
            s = t
    return x
