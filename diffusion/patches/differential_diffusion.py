"""Differential Diffusion (Levin & Fried 2023, "Differential Diffusion: Giving Each Pixel Its Strength").

An inpainting mask m in 0..1 is read as a change map: how much each pixel may change. Instead of a fixed
region, the region being repainted grows during sampling: at a step whose (network) timestep is t, a pixel is
repainted iff m >= threshold(t), with the threshold falling linearly from 1 at the first step to 0 at the end:

    threshold(t) = (t - t_end) / (t_start - t_end),

t_start the timestep of the schedule's first sigma and t_end that of its last (or of the model's smallest
sigma when the schedule ends at 0). So m = 1 pixels are repainted from the first step, m = 0.5 ones from
halfway, m = 0 ones never. `strength` < 1 blends the thresholded mask with the soft one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..sampling.model_sampling import ModelSampling

# (sigma, mask, sigmas, model_sampling) -> the mask of the step at sigma
DenoiseMaskFn = Callable[[Tensor, Tensor, Tensor, ModelSampling], Tensor]


def differential_mask(model_sampling: ModelSampling, sigma: Tensor, mask: Tensor, sigmas: Tensor,
                      strength: float = 1.0) -> Tensor:
    """The mask to use at `sigma` for change map `mask` over the schedule `sigmas` (see the module doc)."""
    sigma_end = float(sigmas[-1])
    if sigma_end <= model_sampling.sigma_min:
        sigma_end = model_sampling.sigma_min
    as_tensor = torch.tensor
    t_start = float(model_sampling.timestep(as_tensor([float(sigmas[0])])).reshape(-1)[0])
    t_end = float(model_sampling.timestep(as_tensor([sigma_end])).reshape(-1)[0])
    t_now = float(model_sampling.timestep(as_tensor([float(torch.as_tensor(sigma).reshape(-1)[0])])).reshape(-1)[0])
    span = t_start - t_end
    threshold = (t_now - t_end) / span if span else 0.0
    binary = (mask >= threshold).to(mask.dtype)
    if strength < 1.0:
        return strength * binary + (1.0 - strength) * mask
    return binary


def differential_mask_fn(strength: float = 1.0) -> DenoiseMaskFn:
    """The per-step mask of Differential Diffusion, for the model sampling the run uses."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"DifferentialDiffusion strength must be within 0..1, got {strength}")

    def fn(sigma: Tensor, mask: Tensor, sigmas: Tensor, model_sampling: ModelSampling) -> Tensor:
        return differential_mask(model_sampling, sigma, mask, sigmas, strength)

    return fn
