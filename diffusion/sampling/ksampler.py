"""The KSampler-level flow: sigmas for (scheduler, steps, denoise), step slicing, and one sampling run with
optional inpainting mask."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .model_sampling import ModelSampling
from .noise import BrownianNoiseSampler, seeded_noise_sampler
from .sampler_registry import (
    BROWNIAN_NOISE_SAMPLERS,
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    MODEL_SAMPLING_SAMPLERS,
    get_sampler,
)
from .samplers_base import Callback
from .schedules import DiscreteSchedule, calculate_sigmas


def ksampler_sigmas(
    schedule: DiscreteSchedule, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str | None = None
) -> Tensor:
    """Sigmas as ComfyUI's KSampler computes them.

    denoise < 1 computes a schedule of int(steps / denoise) steps and keeps its last steps + 1 sigmas (the run
    starts part-way down); denoise <= 0 gives no sigmas. Samplers in DISCARD_PENULTIMATE_SIGMA_SAMPLERS get a
    schedule one step longer with its second-to-last sigma removed.
    """
    if sampler_name is not None:
        get_sampler(sampler_name)
    if steps < 1 or denoise <= 0.0:
        return torch.zeros(0)
    discard = sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS

    def compute(n: int) -> Tensor:
        sigmas = calculate_sigmas(schedule, scheduler, n + 1 if discard else n)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    if denoise > 0.9999:
        return compute(steps)
    return compute(int(steps / denoise))[-(steps + 1) :]


def slice_sigmas(
    sigmas: Tensor, start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False
) -> Tensor:
    """Steps start_step..last_step of a schedule (KSamplerAdvanced). With `force_full_denoise` a run cut at
    last_step still ends at sigma 0; without it the result keeps the noise of sigmas[last_step] so a second
    run can continue from there. An empty result means there is nothing to do."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return sigmas[:0]
        sigmas = sigmas[start_step:]
    return sigmas


def prepare_mask(mask: Tensor, latent: Tensor) -> Tensor:
    """A [H, W], [B, H, W] or [B, 1, H, W] mask at any resolution as a tensor in the latent's shape."""
    mask = mask.to(latent.device, torch.float32)
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    if mask.shape[-2:] != latent.shape[-2:]:
        mask = F.interpolate(mask, size=latent.shape[-2:], mode="bilinear")
    if mask.shape[0] not in (1, latent.shape[0]):
        mask = mask.repeat(math.ceil(latent.shape[0] / mask.shape[0]), 1, 1, 1)[: latent.shape[0]]
    return mask.expand(latent.shape[0], latent.shape[1], *latent.shape[-2:]).to(latent.dtype)


def sample(
    model_fn: Callable[..., Tensor],
    sampler_name: str,
    sigmas: Tensor,
    latent: Tensor,
    noise: Tensor,
    *,
    model_sampling: ModelSampling,
    seed: int,
    noise_mask: Tensor | None = None,
    add_noise: bool = True,
    callback: Callback = None,
    extra_args: dict[str, Any] | None = None,
    sampler_options: dict[str, Any] | None = None,
    denoise_mask_fn: Callable[[Tensor, Tensor, Tensor, ModelSampling], Tensor] | None = None,
) -> Tensor:
    """Run `sampler_name` over `sigmas` from `latent` and return the final latent.

    The start is noise_scaling(sigmas[0], noise, latent) (noise scaled by sqrt(1 + sigma^2) when starting at the
    top of the model's schedule, as ComfyUI does); with add_noise False the noise is zero, i.e. `latent` already
    carries its noise. With `noise_mask` (1 = repaint) the model sees the unmasked region as the input latent
    re-noised to the current sigma, its output there is replaced by the input latent, and the result equals
    the input latent outside the mask. Fewer than two sigmas return the input unchanged. `denoise_mask_fn(sigma,
    mask, sigmas, model_sampling)` gives each step its own mask (Differential Diffusion); the last one is final.
    """
    sampler = get_sampler(sampler_name)
    if len(sigmas) < 2:
        return latent.clone()
    if noise.shape != latent.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(latent.shape)}")
    noise = noise.to(latent.device, latent.dtype)
    if not add_noise:
        noise = torch.zeros_like(noise)
    sigmas = sigmas.to(latent.device)
    sigma_0 = float(sigmas[0])
    max_denoise = math.isclose(sigma_0, model_sampling.sigma_max, rel_tol=1e-5) or sigma_0 > model_sampling.sigma_max
    x = model_sampling.noise_scaling(sigma_0, noise, latent, max_denoise=max_denoise)

    model = model_fn
    mask = final_mask = None
    if noise_mask is not None:
        mask = final_mask = prepare_mask(noise_mask, latent)
        keep = 1 - mask
        inpaint_noise = noise
        if sampler_name == "ddim":  # ComfyUI's ddim re-noises the kept region with its own noise (seed + 1)
            generator = torch.Generator().manual_seed(int(seed) + 1)
            inpaint_noise = torch.randn(latent.shape, generator=generator).to(latent.device, latent.dtype)

        def model(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
            nonlocal final_mask
            known = model_sampling.noise_scaling(sigma, inpaint_noise, latent)
            step_mask, step_keep = mask, keep
            if denoise_mask_fn is not None:
                step_mask = final_mask = denoise_mask_fn(sigma, mask, sigmas, model_sampling)
                step_keep = 1 - step_mask
            out = model_fn(x * step_mask + known * step_keep, sigma, **kwargs)
            return out * step_mask + latent * step_keep

    if sampler_name in BROWNIAN_NOISE_SAMPLERS:
        noise_sampler = BrownianNoiseSampler(x, seed)
    else:
        noise_sampler = seeded_noise_sampler(x, seed)
    options = dict(sampler_options or {})
    if sampler_name in MODEL_SAMPLING_SAMPLERS:  # their noise window is in the model's own sigmas
        options.setdefault("model_sampling", model_sampling)
    out = sampler(model, x, sigmas, extra_args=extra_args, callback=callback, noise_sampler=noise_sampler, **options)
    out = model_sampling.inverse_noise_scaling(sigmas[-1], out)
    if final_mask is not None:
        out = out * final_mask + latent * (1 - final_mask)
    return out
