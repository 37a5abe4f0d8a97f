"""ComfyUI's `comfy.samplers` for packs: the sampler and scheduler names (ours, which are ComfyUI's) and
`calc_cond_batch`, which guidance packs (PAG and its kin) call from a cfg function to evaluate the model again."""

from __future__ import annotations

from typing import Any

import torch

from comfy_compat.comfy._offered import not_offered
from diffusion.patches.comfy_options import evaluate_conds
from diffusion.sampling.sampler_registry import SAMPLER_NAMES as _SAMPLERS
from diffusion.sampling.schedules import SCHEDULER_NAMES as _SCHEDULERS

SAMPLER_NAMES = list(_SAMPLERS)
SCHEDULER_NAMES = list(_SCHEDULERS)


class KSampler:
    """Only the name lists: packs read them to declare sampler and scheduler combos."""

    SAMPLERS = SAMPLER_NAMES
    SCHEDULERS = SCHEDULER_NAMES


def calc_cond_batch(model: Any, conds: list[Any], x_in: torch.Tensor, timestep: torch.Tensor,
                    model_options: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """The denoised estimate of each conditioning list in `conds` at sigma `timestep` (ComfyUI passes the sigma
    under this name), the UNet running `model_options`' transformer patches. `model` must be the args["model"] a cfg,
    pre-cfg or post-cfg function received: it knows the step's guider."""
    guider = getattr(model, "guider", None)
    if guider is None:
        raise RuntimeError("comfy.samplers.calc_cond_batch: Latent Loom runs it only with the args['model'] of a cfg, "
                           "pre-cfg or post-cfg function (inside sampling)")
    options = (model_options or {}).get("transformer_options")
    return evaluate_conds(guider, list(conds), x_in, timestep, options)


def __getattr__(name: str) -> Any:
    raise not_offered("comfy.samplers", name)
