"""Pieces every sampler shares.

A sampler is `fn(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, **options) -> x`:
`model(x, sigma_batch, **extra_args)` returns the denoised estimate D(x, sigma), `x` starts at sigmas[0]
noise level, `sigmas` decreases (normally to 0). `callback` receives {x, i, sigma, sigma_hat, denoised} once
per step, with x the sample that step starts from. Stochastic samplers take fresh unit noise from
`noise_sampler(sigma, sigma_next)`. Sigmas are read into Python floats once: the per-step scalar math then
costs nothing next to a network call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .noise import NoiseSampler

Model = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None] | None


def as_floats(sigmas: Tensor) -> list[float]:
    return [float(s) for s in sigmas]


def call(model: Model, x: Tensor, sigma: float, extra_args: dict | None) -> Tensor:
    return model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))


def combine(*terms: tuple[float, Tensor]) -> Tensor:
    """sum(c * t for c, t in terms) into one fresh tensor, accumulated in place: a step's linear combination
    in one pass per term instead of two (the per-step arithmetic is what a sampler adds to the model's cost)."""
    (c0, t0), *rest = terms
    out = t0 * c0
    for c, t in rest:
        out.add_(t, alpha=c)
    return out


def report(callback: Callback, x: Tensor, i: int, sigma: float, sigma_hat: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. eq. 3 for x = x0 + sigma * noise)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic step to sigma_down and fresh noise of std sigma_up,
    with sigma_down^2 + sigma_up^2 = sigma_next^2 (eta = 1: the DDPM posterior's noise)."""
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def need_noise(noise_sampler: NoiseSampler | None, name: str) -> NoiseSampler:
    if noise_sampler is None:
        raise ValueError(f"sampler {name!r} is stochastic and needs a noise_sampler (see diffusion.sampling.noise)")
    return noise_sampler


def churn(
    x: Tensor,
    sigma: float,
    steps: int,
    noise_sampler: NoiseSampler | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    name: str,
) -> tuple[Tensor, float]:
    """Karras et al. Alg. 2 "churn": raise sigma to sigma_hat = sigma * (1 + gamma) by adding noise."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0.0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    eps = need_noise(noise_sampler, name)(sigma, sigma_hat) * s_noise
    return x + eps * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat
