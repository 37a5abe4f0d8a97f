"""SDE samplers: DPM-Solver++ SDE variants (heun form, noise drawn on the compute device) and ER-SDE.

Conventions in `samplers_base`. The `_gpu` names are ComfyUI's for the same sampler with its Brownian noise
drawn on the compute device instead of the CPU: faster for big latents on an accelerator, but the image then
depends on the device (on the CPU it is the same image).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .noise import BrownianNoiseSampler, NoiseSampler
from .samplers import dpmpp_sde
from .samplers_base import Callback, Model, as_floats, call, need_noise, report
from .samplers_multistep import dpmpp_2m_sde, dpmpp_3m_sde


class DeviceBrownianNoiseSampler(BrownianNoiseSampler):
    """BrownianNoiseSampler whose normals come from a generator on x's device and whose path stays there.
    On the CPU it draws exactly what BrownianNoiseSampler draws for the same seed."""

    def __init__(self, x: Tensor, seed: int) -> None:
        super().__init__(x, seed)
        self.generator = torch.Generator(device=x.device).manual_seed(int(seed))

    def _normal(self) -> Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32, device=self.device)

    def _value(self, t: float) -> Tensor:
        if not self.points:
            self.points[t] = torch.zeros(self.shape, device=self.device)
        return super()._value(t)


def on_device(noise_sampler: NoiseSampler | None, x: Tensor) -> NoiseSampler | None:
    """The noise sampler a `_gpu` sampler uses: an unused CPU-generator Brownian sampler (what
    diffusion.sampling.ksampler.sample makes for these names) is remade on x's device with the same seed; anything
    else (a caller's own noise) is used as given."""
    if (isinstance(noise_sampler, BrownianNoiseSampler) and not isinstance(noise_sampler, DeviceBrownianNoiseSampler)
            and not noise_sampler.points):
        return DeviceBrownianNoiseSampler(x, noise_sampler.generator.initial_seed())
    return noise_sampler


def dpmpp_sde_gpu(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> Tensor:
    """dpmpp_sde with its Brownian noise drawn on x's device."""
    return dpmpp_sde(model, x, sigmas, extra_args, callback, on_device(noise_sampler, x), eta=eta, s_noise=s_noise,
                     r=r)


def dpmpp_2m_sde_gpu(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
) -> Tensor:
    """dpmpp_2m_sde with its Brownian noise drawn on x's device."""
    return dpmpp_2m_sde(model, x, sigmas, extra_args, callback, on_device(noise_sampler, x), eta=eta,
                        s_noise=s_noise, solver_type=solver_type)


def dpmpp_3m_sde_gpu(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """dpmpp_3m_sde with its Brownian noise drawn on x's device."""
    return dpmpp_3m_sde(model, x, sigmas, extra_args, callback, on_device(noise_sampler, x), eta=eta,
                        s_noise=s_noise)


def dpmpp_2m_sde_heun(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M) with the Heun form of its second-order term (diffusers' solver_type="heun"):
    the scaled difference (D - D_prev) h / h_last is weighted by 1 - phi_1(-(1 + eta) h), the exact integral
    of a denoiser linear in lambda, where the midpoint form uses (1 - e^{-(1+eta)h}) / 2."""
    return dpmpp_2m_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta=eta, s_noise=s_noise,
                        solver_type="heun")


def dpmpp_2m_sde_heun_gpu(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """dpmpp_2m_sde_heun with its Brownian noise drawn on x's device."""
    return dpmpp_2m_sde(model, x, sigmas, extra_args, callback, on_device(noise_sampler, x), eta=eta,
                        s_noise=s_noise, solver_type="heun")


NoiseScaler = Callable[[float], float]


def er_sde_noise_scaler(sigma: float) -> float:
    """ER-SDE's noise scale function phi(sigma) = sigma * (e^{sigma^0.3} + 10) (Cui et al., the one their
    ER-SDE-Solver uses by default). phi(sigma) = sigma gives the ODE, phi(sigma) = sigma^2 the reverse SDE."""
    return sigma * (math.exp(sigma**0.3) + 10.0)


# Gauss–Legendre on [-1, 1]: the integrals below are smooth in log sigma, where 16 nodes are exact to rounding.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)


def er_sde_coefficients(sigma: float, sigma_next: float, phi: NoiseScaler) -> tuple[float, float, float]:
    """Weights (r, c_1, c_2) of D, D' and D'' in one ER-SDE step from sigma down to sigma_next > 0.

    The VE ER-SDE solution with data prediction (Cui et al. 2023, eq. for the VE case) is
        x_t = r x_s + phi_t * integral_{sigma_t}^{sigma_s} phi'(u) / phi(u)^2 D(u) du + noise,  r = phi_t / phi_s.
    With D(u) = D + (u - sigma_s) D' + (u - sigma_s)^2 / 2 D'' and integration by parts:
        weight of D   = 1 - r
        c_1 (of D')   = (sigma_t - sigma_s) + phi_t * S_1,   S_1 = integral 1 / phi(u) du
        c_2 (of D'')  = (sigma_t - sigma_s)^2 / 2 + phi_t * S_2,   S_2 = integral (u - sigma_s) / phi(u) du
    over [sigma_t, sigma_s]; S_1 and S_2 by Gauss–Legendre in log u (du = u dlog u).
    """
    phi_s, phi_t = phi(sigma), phi(sigma_next)
    lo, hi = math.log(sigma_next), math.log(sigma)
    half = 0.5 * (hi - lo)
    s_1 = s_2 = 0.0
    for node, weight in zip(_GL_NODES, _GL_WEIGHTS, strict=True):
        u = math.exp(lo + half * (node + 1))
        w = float(weight) * half * u / phi(u)
        s_1 += w
        s_2 += w * (u - sigma)
    dt = sigma_next - sigma
    return phi_t / phi_s, dt + phi_t * s_1, dt * dt / 2 + phi_t * s_2


def er_sde(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, s_noise: float = 1.0, noise_scaler: NoiseScaler | None = None,
    max_stage: int = 3,
) -> Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for
    diffusion models"), VE form: per step x = r x + (1 - r) D + c_1 D' + c_2 D'' (see er_sde_coefficients)
    with D' and D'' backward divided differences in sigma of the last denoisers,
        D'  = (D_i - D_{i-1}) / (sigma_i - sigma_{i-1}),
        D'' = (D'_i - D'_{i-1}) / ((sigma_i - sigma_{i-2}) / 2),
    warming up from stage 1 (first step) to `max_stage`; then noise of std sqrt(sigma_t^2 - r^2 sigma_s^2),
    which keeps the marginal variance. The step to sigma 0 returns D."""
    if max_stage not in (1, 2, 3):
        raise ValueError(f"er_sde max_stage must be 1, 2 or 3, got {max_stage}")
    phi = noise_scaler or er_sde_noise_scaler
    sig = as_floats(sigmas)
    old_denoised: Tensor | None = None
    old_slope: Tensor | None = None
    for i in range(len(sig) - 1):
        denoised = call(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        stage = min(max_stage, i + 1)
        r, c_1, c_2 = er_sde_coefficients(sig[i], sig[i + 1], phi)
        x = r * x + (1 - r) * denoised
        slope = None
        if stage >= 2 and old_denoised is not None and sig[i] != sig[i - 1]:
            slope = (denoised - old_denoised) / (sig[i] - sig[i - 1])
            x = x + c_1 * slope
            if stage >= 3 and old_slope is not None and sig[i] != sig[i - 2]:
                x = x + c_2 * ((slope - old_slope) / ((sig[i] - sig[i - 2]) / 2))
        std = math.sqrt(max(sig[i + 1] ** 2 - (r * sig[i]) ** 2, 0.0))
        if s_noise != 0 and std > 0:
            x = x + need_noise(noise_sampler, "er_sde")(sig[i], sig[i + 1]) * s_noise * std
        old_denoised, old_slope = denoised, slope
    return x


Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "dpmpp_sde_gpu": dpmpp_sde_gpu,
    "dpmpp_2m_sde_gpu": dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde_gpu": dpmpp_3m_sde_gpu,
    "er_sde": er_sde,
}
