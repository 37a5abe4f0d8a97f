"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained classifier free guidance for diffusion models").

Plain CFG takes a step with the guided estimate D = U + cfg * (C - U) both as the clean image and as the noise
direction. CFG++ keeps the guided D as the clean image but re-noises with the *unconditional* noise estimate
eps_u = (x - U) / sigma, so that the sample stays on the data manifold the unconditional model knows; for DDIM
(in the VE form x = x0 + sigma * eps used here):

    x_next = D + sigma_next * eps_u = sigma_next / sigma * (x + D - U) + (1 - sigma_next / sigma) * D

i.e. every CFG++ step is its base sampler's step taken from the shifted sample x + (D - U). The multistep and
two-stage variants follow ComfyUI's forms (what a user switching expects to reproduce), which extrapolate from
the unconditional estimates: see each docstring. With cfg = 1 (U = D) each sampler is exactly its base sampler.

The guider reports U through a per-call post hook (`GuidanceHooks` in `model_options`). A model that cannot
take `model_options` (a bare denoiser, no guidance) has U = D.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from torch import Tensor

from .guidance import GuidanceHooks, GuidanceStep
from .noise import NoiseSampler
from .samplers_base import Callback, Model, ancestral_step, as_floats, call, need_noise, report, to_d


def _accepts_model_options(model: Model) -> bool:
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "model_options" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class UncondCapture:
    """Calls the model with a post hook that records the guider's unconditional prediction, so a sampler gets
    (D, U) per evaluation. Built once per sampling run; the hook adds nothing but a reference per call."""

    def __init__(self, model: Model, extra_args: dict | None) -> None:
        self.model = model
        self.uncond: Tensor | None = None
        self.extra_args = extra_args
        if _accepts_model_options(model):
            options = dict((extra_args or {}).get("model_options") or {})
            mine = GuidanceHooks(post=[self._capture])
            existing = options.get("guidance_hooks")
            options["guidance_hooks"] = existing.merged(mine) if existing is not None else mine
            self.extra_args = {**(extra_args or {}), "model_options": options}

    def _capture(self, step: GuidanceStep) -> Tensor:
        self.uncond = step.uncond
        return step.denoised

    def __call__(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """(guided denoised, unconditional denoised) at (x, sigma)."""
        self.uncond = None
        denoised = call(self.model, x, sigma, self.extra_args)
        return denoised, denoised if self.uncond is None else self.uncond


def _exp_step(x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> Tensor:
    """First-order step in lambda = -log sigma (exact for a denoiser constant over the step); for the VE ODE
    it equals the Euler step in sigma."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


def euler_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM/Euler with CFG++: x_next = D + sigma_next * (x - U) / sigma."""
    sig = as_floats(sigmas)
    guided = UncondCapture(model, extra_args)
    for i in range(len(sig) - 1):
        denoised, uncond = guided(x, sig[i])
        report(callback, x, i, sig[i], sig[i], denoised)
        x = denoised + to_d(x, sig[i], uncond) * sig[i + 1]
    return x


def euler_ancestral_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral with CFG++: x = D + sigma_down * (x - U) / sigma, then fresh noise of std sigma_up
    (sigma_down^2 + sigma_up^2 = sigma_next^2, see samplers_base.ancestral_step)."""
    sig = as_floats(sigmas)
    guided = UncondCapture(model, extra_args)
    for i in range(len(sig) - 1):
        denoised, uncond = guided(x, sig[i])
        report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = denoised + to_d(x, sig[i], uncond) * sigma_down
        if sig[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise_sampler, "euler_ancestral_cfg_pp")(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_2s_ancestral_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) ancestral with CFG++, in ComfyUI's form: the two-stage step to sigma_down is taken on the
    unconditional estimates alone (U at x, then U_2 at the log-midpoint sigma_mid = sqrt(sigma * sigma_down) of
    a first-order step), ancestral noise of std sigma_up is added, and then the guidance vector D - U of the
    step's start:  x_next = step_U(x) + sigma_up * z + (D - U). A step whose sigma_down is 0 returns D."""
    sig = as_floats(sigmas)
    guided = UncondCapture(model, extra_args)
    for i in range(len(sig) - 1):
        denoised, uncond = guided(x, sig[i])
        report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(sig[i] * sigma_down)
            _, uncond_2 = guided(_exp_step(x, sig[i], sigma_mid, uncond), sigma_mid)
            x = _exp_step(x, sig[i], sigma_down, uncond_2) + (denoised - uncond)
        if sig[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise_sampler, "dpmpp_2s_ancestral_cfg_pp")(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_2m_cfg_pp(
    model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M) with CFG++, in ComfyUI's form. With ratio = sigma_next / sigma = e^{-h} and
    r = h_last / h, from the CFG++ Euler step D + ratio * (x - U) the second-order correction extrapolates
    from the previous step's *unconditional* estimate U_prev:
        x_next = D + ratio * (x - U) + (1 - ratio) / (2r) * (D - U_prev);
    the first step is first order, the step to 0 returns D."""
    sig = as_floats(sigmas)
    guided = UncondCapture(model, extra_args)
    old_uncond: Tensor | None = None
    for i in range(len(sig) - 1):
        denoised, uncond = guided(x, sig[i])
        report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        ratio = sig[i + 1] / sig[i]
        step = denoised + ratio * (x - uncond)
        if old_uncond is not None:
            r = (math.log(sig[i - 1]) - math.log(sig[i])) / (math.log(sig[i]) - math.log(sig[i + 1]))
            step = step + ((1 - ratio) / (2 * r)) * (denoised - old_uncond)
        x, old_uncond = step, uncond
    return x


Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "euler_cfg_pp": euler_cfg_pp,
    "euler_ancestral_cfg_pp": euler_ancestral_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": dpmpp_2m_cfg_pp,
}
