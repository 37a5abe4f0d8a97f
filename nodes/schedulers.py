"""Schedule nodes of custom sampling: SIGMAS from a model's schedule, from closed forms or published tables, and
the nodes that reshape a SIGMAS list (split, flip, set its first sigma). The math is in diffusion/."""

from __future__ import annotations

from diffusion.sampling.ksampler import ksampler_sigmas
from diffusion.sampling.schedules import beta_scheduler, exponential_sigmas, karras_sigmas
from diffusion.sampling.schedules_extra import (
    AYS_NOISE_LEVELS,
    align_your_steps_sigmas,
    flip_sigmas,
    laplace_sigmas,
    polyexponential_sigmas,
    sd_turbo_sigmas,
    set_first_sigma,
    split_sigmas_denoise,
    vp_sigmas,
)
from graph.node import Combo, Float, Int, Node, Output, Socket
from graph.types import MODEL, SIGMAS
from nodes.sampling import scheduler_input

_SCHEDULERS = "sampling/custom_sampling/schedulers"
_SIGMAS = "sampling/custom_sampling/sigmas"


def _steps(default: int = 20, min: int = 1, max: int = 10000) -> Int:
    return Int("steps", default=default, min=min, max=max, step=None)


def _denoise(min: float = 0.0) -> Float:
    return Float("denoise", default=1.0, min=min, max=1.0, step=0.01)


def _free_float(name: str, default: float, min: float = 0.0, max: float = 5000.0, step: float = 0.01) -> Float:
    """A float widget that is not rounded to its step (ComfyUI's `round: False`)."""
    return Float(name, default=default, min=min, max=max, step=step, round=False)


def _sigma_inputs() -> list[Float]:
    return [_free_float("sigma_max", 14.614642), _free_float("sigma_min", 0.0291675)]


class BasicScheduler(Node):
    category = _SCHEDULERS
    inputs = [Socket("model", MODEL), scheduler_input(), _steps(), _denoise()]
    outputs = [Output(SIGMAS)]

    def execute(self, model, scheduler, steps, denoise):
        return (ksampler_sigmas(model.model_sampling.schedule, scheduler, steps, denoise),)


class KarrasScheduler(Node):
    category = _SCHEDULERS
    inputs = [_steps(), *_sigma_inputs(), _free_float("rho", 7.0, max=100.0)]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, sigma_max, sigma_min, rho):
        return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    category = _SCHEDULERS
    inputs = [_steps(), *_sigma_inputs()]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, sigma_max, sigma_min):
        return (exponential_sigmas(steps, sigma_min, sigma_max),)


class PolyexponentialScheduler(Node):
    category = _SCHEDULERS
    description = "Steps uniform in (log sigma)^(1/rho): rho 1 is exponential, larger rho favours low noise."
    inputs = [_steps(), *_sigma_inputs(), _free_float("rho", 1.0, max=100.0)]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, sigma_max, sigma_min, rho):
        return (polyexponential_sigmas(steps, sigma_min, sigma_max, rho),)


class LaplaceScheduler(Node):
    category = _SCHEDULERS
    description = "Log sigma at Laplace(mu, beta) quantiles: steps gather around sigma = e^mu."
    inputs = [_steps(), *_sigma_inputs(), _free_float("mu", 0.0, min=-10.0, max=10.0, step=0.1),
              _free_float("beta", 0.5, max=10.0, step=0.1)]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, sigma_max, sigma_min, mu, beta):
        return (laplace_sigmas(steps, sigma_min, sigma_max, mu, beta),)


class VPScheduler(Node):
    category = _SCHEDULERS
    description = "The variance-preserving SDE's noise levels (linear beta(t)) as sigmas."
    inputs = [_steps(), _free_float("beta_d", 19.9), _free_float("beta_min", 0.1),
              _free_float("eps_s", 0.001, max=1.0, step=0.0001)]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, beta_d, beta_min, eps_s):
        return (vp_sigmas(steps, beta_d, beta_min, eps_s),)


class BetaSamplingScheduler(Node):
    category = _SCHEDULERS
    description = "Timesteps at Beta(alpha, beta) quantiles of the model's schedule (more steps at both ends)."
    inputs = [Socket("model", MODEL), _steps(), _free_float("alpha", 0.6, max=50.0), _free_float("beta", 0.6, max=50.0)]
    outputs = [Output(SIGMAS)]

    def execute(self, model, steps, alpha, beta):
        return (beta_scheduler(model.model_sampling.schedule, steps, alpha, beta),)


class SDTurboScheduler(Node):
    category = _SCHEDULERS
    description = "SD/SDXL Turbo's distilled timesteps (999, 899, ..., 99); denoise starts further down."
    inputs = [Socket("model", MODEL), _steps(default=1, max=10), _denoise(min=0)]
    outputs = [Output(SIGMAS)]

    def execute(self, model, steps, denoise):
        return (sd_turbo_sigmas(model.model_sampling.schedule, steps, denoise),)


class AlignYourStepsScheduler(Node):
    category = _SCHEDULERS
    description = "NVIDIA's Align Your Steps schedules, interpolated to the step count."
    inputs = [Combo("model_type", list(AYS_NOISE_LEVELS)), _steps(default=10), _denoise()]
    outputs = [Output(SIGMAS)]

    def execute(self, model_type, steps, denoise):
        return (align_your_steps_sigmas(model_type, steps, denoise),)


class SplitSigmas(Node):
    category = _SIGMAS
    description = "Splits a schedule at a step: the high sigmas run first, the low ones continue from there."
    inputs = [Socket("sigmas", SIGMAS), Int("step", default=0, min=0, max=10000, step=None)]
    outputs = [Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas")]

    def execute(self, sigmas, step):
        return (sigmas[: step + 1], sigmas[step:])


class SplitSigmasDenoise(Node):
    category = _SIGMAS
    description = "Splits a schedule so that the low part holds the last denoise fraction of its steps."
    inputs = [Socket("sigmas", SIGMAS), _denoise()]
    outputs = [Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas")]

    def execute(self, sigmas, denoise):
        return split_sigmas_denoise(sigmas, denoise)


class FlipSigmas(Node):
    category = _SIGMAS
    description = "Reverses a schedule (low to high noise), e.g. to invert an image back to its noise."
    inputs = [Socket("sigmas", SIGMAS)]
    outputs = [Output(SIGMAS)]

    def execute(self, sigmas):
        return (flip_sigmas(sigmas),)


class SetFirstSigma(Node):
    category = _SIGMAS
    description = "Replaces the first sigma of a schedule."
    inputs = [Socket("sigmas", SIGMAS), _free_float("sigma", 136.0, max=20000.0, step=0.001)]
    outputs = [Output(SIGMAS)]

    def execute(self, sigmas, sigma):
        return (set_first_sigma(sigmas, sigma),)


NODE_CLASSES = [BasicScheduler, KarrasScheduler, ExponentialScheduler, PolyexponentialScheduler, LaplaceScheduler,
                VPScheduler, BetaSamplingScheduler, SDTurboScheduler, AlignYourStepsScheduler, SplitSigmas,
                SplitSigmasDenoise, FlipSigmas, SetFirstSigma]
