"""ComfyUI's `comfy.samplers` for packs: the sampler and scheduler names (ours, which are ComfyUI's)."""

from __future__ import annotations

from diffusion.sampling.sampler_registry import SAMPLER_NAMES as _SAMPLERS
from diffusion.sampling.schedules import SCHEDULER_NAMES as _SCHEDULERS

SAMPLER_NAMES = list(_SAMPLERS)
SCHEDULER_NAMES = list(_SCHEDULERS)


class KSampler:
    """Only the name lists: packs read them to declare sampler and scheduler combos."""

    SAMPLERS = SAMPLER_NAMES
    SCHEDULERS = SCHEDULER_NAMES
