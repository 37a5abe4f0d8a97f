"""Sampling nodes: KSampler and KSamplerAdvanced.

Both compute a sigma schedule from the model's own noise schedule and run `run_sampler`, which the
custom-sampling nodes share: latents go into the model's scaled space, noise is drawn on the CPU from the
seed (per `batch_index`), the latent's `noise_mask` limits the repaint (inpainting), and each step reports
progress with an optional latent preview.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffusion.handles import DiffusionModel
from diffusion.sampling.guidance import Conditioning
from diffusion.sampling.ksampler import ksampler_sigmas, prepare_mask, sample, slice_sigmas
from diffusion.sampling.noise import prepare_noise
from diffusion.sampling.sampler_registry import SAMPLER_NAMES
from diffusion.sampling.schedules import SCHEDULER_NAMES
from graph.node import Combo, Float, Int, Node, Output, Socket
from graph.types import CONDITIONING, LATENT, MODEL
from nodes.control_estimates import add_control_memory, controls_of
from nodes.estimates import sampler_estimate

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def seed_input(name: str = "seed") -> Int:
    return Int(name, default=0, min=0, max=MAX_SEED, step=None, control_after_generate=True,
               tooltip="The random seed of the noise; the same seed gives the same image.")


def steps_input(default: int = 20) -> Int:
    return Int("steps", default=default, min=1, max=10000, step=None, tooltip="Denoising steps.")


def cfg_input() -> Float:
    return Float("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                 tooltip="Classifier-free guidance scale: how strongly the prompt steers the image.")


def sampler_input() -> Combo:
    return Combo("sampler_name", SAMPLER_NAMES)  # no declared default, as ComfyUI: clients take the first


def scheduler_input() -> Combo:
    return Combo("scheduler", SCHEDULER_NAMES)


SAMPLER_ADVICE = ("use a smaller size (sample small, then upscale the latent and sample again with a lower denoise) "
                  "or a smaller batch")


def cfg_batch(cfg: float) -> int:
    """UNet batch entries per latent: cond and uncond run together unless cfg is 1 (diffusion.sampling.guidance)."""
    return 1 if cfg == 1.0 else 2


def make_noise(latent: dict[str, Any], seed: int) -> torch.Tensor:
    return prepare_noise(latent["samples"], seed, latent.get("batch_index"))


def run_sampler(context: Any, model: DiffusionModel, positive: Conditioning, negative: Conditioning, cfg: float,
                sampler_name: str, sigmas: torch.Tensor, latent: dict[str, Any], noise: torch.Tensor, seed: int,
                add_noise: bool = True, sampler_options: dict[str, Any] | None = None,
                make_guider: Callable[[Any], Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample and return (the output LATENT, the LATENT of the last denoised estimate). `make_guider(denoiser)`
    replaces the model's CFG guider (guiders of other shapes, e.g. DualCFGGuider)."""
    samples = latent["samples"]
    out = dict(latent)
    if len(sigmas) < 2:  # nothing to do (denoise 0, or a start step past the end)
        return out, dict(latent)
    device, scale = model.device, model.latent_scale
    noise_mask = latent.get("noise_mask")
    concat = model.inpaint_concat(samples, noise_mask, positive)
    steps = len(sigmas) - 1
    last = {}

    def callback(state: dict[str, Any]) -> None:
        last["denoised"] = state["denoised"]
        preview = model.preview_image(state["denoised"]) if context is not None and context.previews else None
        if context is not None:
            context.progress(state["i"] + 1, steps, preview=preview)

    with model.denoiser(None if concat is None else concat.to(device)) as denoiser:
        guider = make_guider(denoiser) if make_guider else model.guider(denoiser, positive, negative, cfg)
        result = sample(guider, sampler_name, sigmas.to(device), samples.to(device).float() * scale,
                        noise.to(device), model_sampling=model.model_sampling, seed=seed,
                        noise_mask=None if noise_mask is None else noise_mask.to(device), add_noise=add_noise,
                        callback=callback, sampler_options=sampler_options, denoise_mask_fn=model.denoise_mask_fn)
    out["samples"] = result.float().cpu() / scale
    if noise_mask is not None:  # outside the mask the input comes back bit for bit, not via the scaled space
        mask = prepare_mask(noise_mask, samples).cpu()
        if model.denoise_mask_fn is not None:  # Differential Diffusion: the mask of the last step
            mask = model.denoise_mask_fn(sigmas[-2:-1].cpu(), mask, sigmas.cpu(), model.model_sampling)
        out["samples"] = out["samples"] * mask + samples.float() * (1 - mask)
    denoised = dict(latent)
    denoised["samples"] = last["denoised"].float().cpu() / scale if last else out["samples"]
    return out, denoised


def ksampler_estimate(inputs: dict[str, Any], shapes: dict[str, Any], context: Any) -> Any:
    """KSampler's and KSamplerAdvanced's: the UNet calls, with the ControlNets of the conditionings."""
    factor = cfg_batch(inputs["cfg"])
    latent, model = shapes.get("latent_image"), shapes.get("model")
    controls = controls_of(shapes.get("positive"), shapes.get("negative"))
    estimate = sampler_estimate(latent, model, context, factor)
    return add_control_memory(estimate, latent, model, controls, factor, context)


class KSampler(Node):
    category = "sampling"
    description = "Denoises a latent image guided by a positive and a negative prompt."
    hidden = ("context",)
    inputs = [Socket("model", MODEL), seed_input(), steps_input(), cfg_input(), sampler_input(), scheduler_input(),
              Socket("positive", CONDITIONING), Socket("negative", CONDITIONING), Socket("latent_image", LATENT),
              Float("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="How much of the latent to replace: 1.0 for text-to-image, less for image-to-image.")]
    outputs = [Output(LATENT)]
    memory_advice = SAMPLER_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return ksampler_estimate(inputs, shapes, context)

    def execute(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                context=None):
        sigmas = ksampler_sigmas(model.model_sampling.schedule, scheduler, steps, denoise, sampler_name)
        out, _ = run_sampler(context, model, positive, negative, cfg, sampler_name, sigmas, latent_image,
                             make_noise(latent_image, seed), seed)
        return (out,)


class KSamplerAdvanced(Node):
    display_name = "KSampler (Advanced)"
    category = "sampling"
    description = "KSampler with start and end steps, for two-stage (base then refiner) sampling."
    hidden = ("context",)
    inputs = [Socket("model", MODEL), Combo("add_noise", ["enable", "disable"]), seed_input("noise_seed"),
              steps_input(), cfg_input(), sampler_input(), scheduler_input(), Socket("positive", CONDITIONING),
              Socket("negative", CONDITIONING), Socket("latent_image", LATENT),
              Int("start_at_step", default=0, min=0, max=10000, step=None),
              Int("end_at_step", default=10000, min=0, max=10000, step=None),
              Combo("return_with_leftover_noise", ["disable", "enable"])]
    outputs = [Output(LATENT)]
    memory_advice = SAMPLER_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return ksampler_estimate(inputs, shapes, context)

    def execute(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, start_at_step, end_at_step, return_with_leftover_noise, context=None):
        sigmas = ksampler_sigmas(model.model_sampling.schedule, scheduler, steps, 1.0, sampler_name)
        sigmas = slice_sigmas(sigmas, start_at_step, end_at_step, return_with_leftover_noise == "disable")
        out, _ = run_sampler(context, model, positive, negative, cfg, sampler_name, sigmas, latent_image,
                             make_noise(latent_image, noise_seed), noise_seed, add_noise=add_noise == "enable")
        return (out,)


NODE_CLASSES = [KSampler, KSamplerAdvanced]
