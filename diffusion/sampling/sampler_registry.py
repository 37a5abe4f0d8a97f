"""Every sampler by the name ComfyUI gives it, in the order ComfyUI lists them (its `KSampler` combo).

Each sampler module keeps a `SAMPLERS` dict of its own functions; this module only assembles them, so that
adding a family of samplers is a new module and one line here.
"""

from __future__ import annotations

from . import samplers, samplers_cfgpp, samplers_extrapolating, samplers_sa_solver, samplers_sde, samplers_seeds
from .samplers import Sampler

# ComfyUI's `sampler_name` list, in its order (../shared/reference/comfyui-object-info.json).
COMFYUI_ORDER: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)

_MODULES = (samplers, samplers_cfgpp, samplers_extrapolating, samplers_sde, samplers_seeds, samplers_sa_solver)

_ALL: dict[str, Sampler] = {name: fn for module in _MODULES for name, fn in module.SAMPLERS.items()}
SAMPLERS: dict[str, Sampler] = {name: _ALL[name] for name in COMFYUI_ORDER if name in _ALL}
SAMPLER_NAMES = tuple(SAMPLERS)

# Samplers that ComfyUI runs with one extra step and drops the second-to-last sigma: their final step to 0
# would otherwise be a wasted or harmful second-order step from a tiny sigma.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

# Samplers that draw noise during sampling (they need a noise_sampler).
STOCHASTIC_SAMPLERS = frozenset(
    {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde",
     "ddpm", "lcm", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde_gpu", "dpmpp_2m_sde_gpu",
     "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "res_multistep_ancestral",
     "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"}
)

# SDE samplers whose sub-steps query overlapping intervals; ComfyUI gives them Brownian-tree noise.
BROWNIAN_NOISE_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde_gpu",
                                     "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"})
# Samplers that read the model's schedule (SA-Solver: the sigmas at 20 % and 80 % bound its noise window).
MODEL_SAMPLING_SAMPLERS = frozenset({"sa_solver", "sa_solver_pece"})


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]
