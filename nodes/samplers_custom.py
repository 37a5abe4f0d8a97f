"""Sampler nodes of custom sampling: each returns a SAMPLER, a sampler name from the registry with the options
its node exposes (eta, s_noise, order, solver type, ...), passed by keyword to the sampler function when
SamplerCustom or SamplerCustomAdvanced runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusion.sampling.sampler_registry import get_sampler
from graph.node import Combo, Float, Input, Int, Node, Output, Socket
from graph.types import BOOLEAN, MODEL, SAMPLER
from nodes.sampling_custom import SamplerChoice

_CATEGORY = "sampling/custom_sampling/samplers"
NOISE_DEVICES = ("gpu", "cpu")


def _free_float(name: str, default: float, max: float = 100.0) -> Float:
    return Float(name, default=default, min=0.0, max=max, step=0.01, round=False)


def _eta(default: float = 1.0, max: float = 100.0) -> Float:
    return _free_float("eta", default, max)


def _s_noise(max: float = 100.0) -> Float:
    return _free_float("s_noise", 1.0, max)


def _noise_device() -> Combo:
    return Combo("noise_device", NOISE_DEVICES)


def choose(name: str, **options: Any) -> tuple[SamplerChoice]:
    """The SAMPLER output for registered sampler `name`; an unknown name fails here, naming the choices."""
    get_sampler(name)
    return (SamplerChoice(name, tuple(options.items())),)


def on_device(name: str, noise_device: str) -> str:
    """`name` or its `_gpu` variant (noise drawn on the compute device rather than the CPU)."""
    if noise_device not in NOISE_DEVICES:
        raise ValueError(f"noise_device must be one of {NOISE_DEVICES}, got {noise_device!r}")
    return f"{name}_gpu" if noise_device == "gpu" else name


class SamplerEulerAncestral(Node):
    category = _CATEGORY
    inputs = [_eta(), _s_noise()]
    outputs = [Output(SAMPLER)]

    def execute(self, eta, s_noise):
        return choose("euler_ancestral", eta=eta, s_noise=s_noise)


class SamplerEulerAncestralCFGPP(Node):
    display_name = "SamplerEulerAncestralCFG++"
    category = _CATEGORY
    inputs = [_eta(max=1.0), _s_noise(max=10.0)]
    outputs = [Output(SAMPLER)]

    def execute(self, eta, s_noise):
        return choose("euler_ancestral_cfg_pp", eta=eta, s_noise=s_noise)


class SamplerLMS(Node):
    category = _CATEGORY
    inputs = [Int("order", default=4, min=1, max=100, step=None)]
    outputs = [Output(SAMPLER)]

    def execute(self, order):
        return choose("lms", order=order)


class SamplerDPMPP_2M_SDE(Node):
    category = _CATEGORY
    inputs = [Combo("solver_type", ["midpoint", "heun"]), _eta(), _s_noise(), _noise_device()]
    outputs = [Output(SAMPLER)]

    def execute(self, solver_type, eta, s_noise, noise_device):
        return choose(on_device("dpmpp_2m_sde", noise_device), solver_type=solver_type, eta=eta, s_noise=s_noise)


class SamplerDPMPP_3M_SDE(Node):
    category = _CATEGORY
    inputs = [_eta(), _s_noise(), _noise_device()]
    outputs = [Output(SAMPLER)]

    def execute(self, eta, s_noise, noise_device):
        return choose(on_device("dpmpp_3m_sde", noise_device), eta=eta, s_noise=s_noise)


class SamplerDPMPP_SDE(Node):
    category = _CATEGORY
    inputs = [_eta(), _s_noise(), _free_float("r", 0.5), _noise_device()]
    outputs = [Output(SAMPLER)]

    def execute(self, eta, s_noise, r, noise_device):
        return choose(on_device("dpmpp_sde", noise_device), eta=eta, s_noise=s_noise, r=r)


class SamplerDPMPP_2S_Ancestral(Node):
    category = _CATEGORY
    inputs = [_eta(), _s_noise()]
    outputs = [Output(SAMPLER)]

    def execute(self, eta, s_noise):
        return choose("dpmpp_2s_ancestral", eta=eta, s_noise=s_noise)


class SamplerDPMAdaptative(Node):
    category = _CATEGORY
    description = "DPM-Solver with adaptive step size: the sigmas give only the start and end noise levels."
    inputs = [Int("order", default=3, min=2, max=3, step=None), _free_float("rtol", 0.05),
              _free_float("atol", 0.0078), _free_float("h_init", 0.05), _free_float("pcoeff", 0.0),
              _free_float("icoeff", 1.0), _free_float("dcoeff", 0.0), _free_float("accept_safety", 0.81),
              _eta(0.0), _s_noise()]
    outputs = [Output(SAMPLER)]

    def execute(self, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise):
        return choose("dpm_adaptive", order=order, rtol=rtol, atol=atol, h_init=h_init, pcoeff=pcoeff,
                      icoeff=icoeff, dcoeff=dcoeff, accept_safety=accept_safety, eta=eta, s_noise=s_noise)


@dataclass(frozen=True)
class PowerNoiseScaler:
    """ER-SDE's noise scale phi(sigma) = sigma^exponent: exponent 1 is the probability-flow ODE, 2 the
    reverse-time SDE (Cui et al. 2023 parametrise the solution space by phi); a class so a SAMPLER pickles."""

    exponent: float

    def __call__(self, sigma: float) -> float:
        return sigma**self.exponent


ER_SDE_SOLVERS = ("ER-SDE", "Reverse-time SDE", "ODE")


class SamplerER_SDE(Node):
    category = _CATEGORY
    description = ("ER-SDE-Solver: ER-SDE uses the paper's noise scale (eta unused); Reverse-time SDE uses "
                   "phi = sigma^(eta + 1); ODE (or eta 0) adds no noise.")
    inputs = [Combo("solver_type", ER_SDE_SOLVERS), Int("max_stage", default=3, min=1, max=3, step=None), _eta(),
              _s_noise()]
    outputs = [Output(SAMPLER)]

    def execute(self, solver_type, max_stage, eta, s_noise):
        if solver_type not in ER_SDE_SOLVERS:
            raise ValueError(f"SamplerER_SDE: solver_type must be one of {ER_SDE_SOLVERS}, got {solver_type!r}")
        if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
            eta, s_noise = 0.0, 0.0
        scaler = None if solver_type == "ER-SDE" else PowerNoiseScaler(eta + 1.0)
        return choose("er_sde", s_noise=s_noise, noise_scaler=scaler, max_stage=max_stage)


class SamplerSASolver(Node):
    category = _CATEGORY
    description = ("SA-Solver (stochastic Adams): noise is injected between sde_start_percent and sde_end_percent "
                   "of the sampling, converted to sigmas with the model's schedule.")
    inputs = [Socket("model", MODEL), _eta(max=10.0),
              Float("sde_start_percent", default=0.2, min=0.0, max=1.0, step=0.001),
              Float("sde_end_percent", default=0.8, min=0.0, max=1.0, step=0.001), _s_noise(),
              Int("predictor_order", default=3, min=1, max=6, step=None),
              Int("corrector_order", default=4, min=0, max=6, step=None), Input("use_pece", BOOLEAN),
              Input("simple_order_2", BOOLEAN)]
    outputs = [Output(SAMPLER)]

    def execute(self, model, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
                use_pece, simple_order_2):
        sampling = model.model_sampling
        return choose("sa_solver", eta=eta, sde_start_sigma=sampling.percent_to_sigma(sde_start_percent),
                      sde_end_sigma=sampling.percent_to_sigma(sde_end_percent), s_noise=s_noise,
                      predictor_order=predictor_order, corrector_order=corrector_order, use_pece=bool(use_pece),
                      simple_order_2=bool(simple_order_2))


NODE_CLASSES = [SamplerEulerAncestral, SamplerEulerAncestralCFGPP, SamplerLMS, SamplerDPMPP_2M_SDE,
                SamplerDPMPP_3M_SDE, SamplerDPMPP_SDE, SamplerDPMPP_2S_Ancestral, SamplerDPMAdaptative, SamplerER_SDE,
                SamplerSASolver]
