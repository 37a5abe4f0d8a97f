"""SEEDS: stochastic explicit exponential derivative-free solvers (Gonzalez et al., NeurIPS 2023), data
prediction, in the variance-exploding variable x = x0 + sigma * noise.

With lambda = -log sigma and h = lambda_t - lambda_s, the SDE family indexed by eta (eta = 0: the probability
flow ODE; eta = 1: the reverse diffusion SDE) has, for a denoiser held at D over the step, the exact solution

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + (1 - e^{-(1 + eta) h}) D + sigma_t sqrt(1 - e^{-2 eta h}) z,

and the linear part is solved exactly whatever D does: with k = 1 + eta the D-term is the integral over
[lambda_s, lambda_t] of k e^{-k (lambda_t - u)} D(u) du. The noise term is a stochastic integral; over
sub-intervals it splits into independent pieces, the piece of [a, b] reaching t as
sigma_t e^{-eta (lambda_t - b)} sqrt(1 - e^{-2 eta (b - a)}) z_ab, so a stage at an intermediate lambda and
the full step see the same Brownian path (draws are made per sub-interval, in time order).

SEEDS-2 evaluates D once more at lambda_s + r h and uses the blend (1 - 1/(2r)) D_s + 1/(2r) D_r for the whole
step; SEEDS-3 evaluates at r_1 h and r_2 h and uses D's linear interpolant in lambda, whose integral against
the exponential weight is phi-function weighted: over [0, H] the slope term is (H - (1 - e^{-k H}) / k) per unit
lambda. Conventions in `samplers_base`; the step to sigma 0 returns the denoised estimate.
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from .noise import NoiseSampler
from .samplers_base import Callback, Model, as_floats, call, combine, need_noise, report


def _noise_weights(eta: float, h: float, cuts: list[float], upto: float) -> list[float]:
    """Weights, relative to sigma at `upto` (a fraction of the step), of the unit draws of the sub-intervals
    [cuts[j], cuts[j + 1]] (fractions of the step) that end at or before `upto`."""
    return [
        math.exp(-eta * h * (upto - b)) * math.sqrt(-math.expm1(-2 * eta * h * (b - a)))
        for a, b in itertools.pairwise(cuts)
        if b <= upto
    ]


def _draws(noise_sampler: NoiseSampler, sigmas: list[float]) -> list[Tensor]:
    return [noise_sampler(a, b) for a, b in itertools.pairwise(sigmas)]


def _check(name: str, eta: float, s_noise: float, fractions: list[float]) -> None:
    if eta < 0 or s_noise < 0:
        raise ValueError(f"sampler {name!r}: eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")
    if not all(a < b for a, b in itertools.pairwise([0.0, *fractions, 1.0])):
        raise ValueError(f"sampler {name!r}: stage fractions must increase strictly within (0, 1), got {fractions}")


class _Step:
    """One SEEDS step from (x_s, D_s) at sigma_s over log-sigma length h, with its per-sub-interval draws."""

    def __init__(self, x: Tensor, denoised: Tensor, sigma: float, h: float, eta: float, s_noise: float,
                 cuts: list[float], draws: list[Tensor]) -> None:
        self.x, self.denoised, self.sigma, self.h = x, denoised, sigma, h
        self.eta, self.s_noise, self.cuts, self.draws = eta, s_noise, cuts, draws

    def to(self, frac: float, sigma_to: float, slope: Tensor | None = None, slope_at: float = 1.0,
           denoised: Tensor | None = None) -> Tensor:
        """x at lambda_s + frac * h, with D linear in lambda through D_s and D_s + slope at slope_at * h
        (or held at `denoised` instead of D_s)."""
        kh = (1 + self.eta) * frac * self.h
        held = self.denoised if denoised is None else denoised
        terms = [((sigma_to / self.sigma) * math.exp(-self.eta * frac * self.h), self.x), (-math.expm1(-kh), held)]
        if slope is not None:
            terms.append(((frac / slope_at) * (1 + math.expm1(-kh) / kh), slope))
        if self.draws:
            weights = _noise_weights(self.eta, self.h, self.cuts, frac)
            terms.extend((sigma_to * self.s_noise * w, n) for w, n in zip(weights, self.draws, strict=False))
        return combine(*terms)


def seeds_2(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> Tensor:
    """SEEDS-2: a first-order exponential SDE step to lambda_s + r h, a second denoiser there, then the whole
    step with the two denoisers blended by 1/(2r). Two model calls a step; two noise draws (one per sub-step)."""
    _check("seeds_2", eta, s_noise, [r])
    sig = as_floats(sigmas)
    noisy = eta > 0 and s_noise > 0
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        sigma_r = sig[i] * math.exp(-r * h)
        z = _draws(need_noise(noise_sampler, "seeds_2"), [sig[i], sigma_r, sig[i + 1]]) if noisy else []
        step = _Step(x, denoised, sig[i], h, eta, s_noise, [0.0, r, 1.0], z)
        denoised_r = call(model, step.to(r, sigma_r), sigma_r, extra_args)
        x = step.to(1.0, sig[i + 1], denoised=(1 - 1 / (2 * r)) * denoised + (1 / (2 * r)) * denoised_r)
    return x


def seeds_3(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1 / 3,
    r_2: float = 2 / 3,
) -> Tensor:
    """SEEDS-3: stages at lambda_s + r_1 h and r_2 h, each an exponential SDE step with D linear in lambda
    through the points known so far (phi_2-weighted slope); three model calls and three noise draws a step."""
    _check("seeds_3", eta, s_noise, [r_1, r_2])
    sig = as_floats(sigmas)
    noisy = eta > 0 and s_noise > 0
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        sigma_1, sigma_2 = sig[i] * math.exp(-r_1 * h), sig[i] * math.exp(-r_2 * h)
        cuts = [0.0, r_1, r_2, 1.0]
        z = _draws(need_noise(noise_sampler, "seeds_3"), [sig[i], sigma_1, sigma_2, sig[i + 1]]) if noisy else []

        step = _Step(x, denoised, sig[i], h, eta, s_noise, cuts, z)
        denoised_1 = call(model, step.to(r_1, sigma_1), sigma_1, extra_args)
        denoised_2 = call(model, step.to(r_2, sigma_2, denoised_1 - denoised, r_1), sigma_2, extra_args)
        x = step.to(1.0, sig[i + 1], denoised_2 - denoised, r_2)
    return x


SAMPLERS = {"seeds_2": seeds_2, "seeds_3": seeds_3}
