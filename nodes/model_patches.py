"""Model patches: nodes that take a MODEL and return a patched clone (the input MODEL is left as it was).

Each is a thin declaration over diffusion/: guidance rules (guidance_patches.py) go on the clone's guidance
hooks, UNet hooks (unet_patches.py, attention_patches.py) on its UNet patches, ModelSamplingDiscrete (and the
continuous EDM and V ones) swaps its ModelSampling and DifferentialDiffusion sets its per-step inpainting mask.
Patches on one model compose in the order the nodes apply them. PerpNegGuider is a GUIDER of its own (PerpNegGuidance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from diffusion.handles import DiffusionModel
from diffusion.patches.attention_patches import (
    hypertile_patches,
    perturbed_attention_hooks,
    self_attention_guidance_hooks,
    tome_patches,
)
from diffusion.patches.differential_diffusion import differential_mask_fn
from diffusion.patches.guidance_patches import PerpNegGuidance, cfg_zero_star_hooks, perp_neg_hooks, rescale_cfg_hooks
from diffusion.patches.unet_patches import RESIZE_METHODS, deep_shrink_patches, freeu_patches
from diffusion.sampling.guidance import Conditioning
from diffusion.sampling.model_sampling import (
    CONTINUOUS_EDM_SAMPLINGS,
    CONTINUOUS_V_SAMPLINGS,
    DISCRETE_SAMPLINGS,
    continuous_edm_model_sampling,
    continuous_v_model_sampling,
    discrete_model_sampling,
)
from graph.memory_estimate import MemoryEstimate
from graph.node import Boolean, Combo, Float, Int, Node, Output, Socket
from graph.types import CONDITIONING, GUIDER, MODEL
from nodes.sampling import cfg_input, run_sampler
from nodes.sampling_custom import NoNoise, RandomNoiseSource, SamplerChoice

_MODEL_OUT = [Output(MODEL)]


class ModelSamplingDiscrete(Node):
    category = "advanced/model"
    python_module = "comfy_extras.nodes_model_advanced"
    description = ("Samples the model as another prediction type (eps, v, LCM, x0), optionally on a zero-terminal-SNR "
                   "schedule.")
    inputs = [Socket("model", MODEL), Combo("sampling", list(DISCRETE_SAMPLINGS)), Boolean("zsnr", default=False)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, sampling: str, zsnr: bool):
        return (model.with_model_sampling(discrete_model_sampling(sampling, zsnr)),)


def _sigma_input(name: str, default: float) -> Float:
    return Float(name, default=default, min=0.0, max=1000.0, step=0.001, round=False)


class ModelSamplingContinuousEDM(Node):
    category = "advanced/model"
    python_module = "comfy_extras.nodes_model_advanced"
    description = ("Samples the model as a continuous-time network with EDM's preconditioning (CosXL: v_prediction "
                   "or eps; EDM models: edm) between sigma_min and sigma_max.")
    inputs = [Socket("model", MODEL), Combo("sampling", list(CONTINUOUS_EDM_SAMPLINGS)),
              _sigma_input("sigma_max", 120.0), _sigma_input("sigma_min", 0.002)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, sampling: str, sigma_max: float, sigma_min: float):
        return (model.with_model_sampling(continuous_edm_model_sampling(sampling, sigma_max, sigma_min)),)


class ModelSamplingContinuousV(Node):
    category = "advanced/model"
    python_module = "comfy_extras.nodes_model_advanced"
    description = "Samples the model as a continuous-time v-prediction network fed arctan(sigma) * 2 / pi as its time."
    inputs = [Socket("model", MODEL), Combo("sampling", list(CONTINUOUS_V_SAMPLINGS)),
              _sigma_input("sigma_max", 500.0), _sigma_input("sigma_min", 0.03)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, sampling: str, sigma_max: float, sigma_min: float):
        return (model.with_model_sampling(continuous_v_model_sampling(sampling, sigma_max, sigma_min)),)


class RescaleCFG(Node):
    category = "advanced/model"
    python_module = "comfy_extras.nodes_model_advanced"
    description = "Rescales the guided prediction's spread to the positive prediction's (Lin et al. 2023)."
    inputs = [Socket("model", MODEL), Float("multiplier", default=0.7, min=0.0, max=1.0, step=0.01)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, multiplier: float):
        return (model.with_guidance_hooks(rescale_cfg_hooks(multiplier)),)


class CFGZeroStar(Node):
    category = "advanced/guidance"
    python_module = "comfy_extras.nodes_cfg"
    description = "Scales the negative prediction by its least-squares fit to the positive before guidance (CFG-Zero*)."
    inputs = [Socket("model", MODEL)]
    outputs = [Output(MODEL, "patched_model")]

    def execute(self, model: DiffusionModel):
        return (model.with_guidance_hooks(cfg_zero_star_hooks()),)


class PerpNeg(Node):
    display_name = "Perp-Neg (DEPRECATED by PerpNegGuider)"
    category = "_for_testing"
    python_module = "comfy_extras.nodes_perpneg"
    deprecated = True
    experimental = True
    inputs = [Socket("model", MODEL), Socket("empty_conditioning", CONDITIONING),
              Float("neg_scale", default=1.0, min=0.0, max=100.0, step=0.01)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, empty_conditioning, neg_scale: float):
        return (model.with_guidance_hooks(perp_neg_hooks(empty_conditioning, neg_scale)),)


@dataclass
class PerpNegGuiderChoice:
    """GUIDER of PerpNegGuider (diffusion.patches.guidance_patches.PerpNegGuidance)."""

    model: DiffusionModel
    positive: Conditioning
    negative: Conditioning
    empty: Conditioning
    cfg: float
    neg_scale: float

    def sample(self, context: Any, noise: RandomNoiseSource | NoNoise, sampler: SamplerChoice,
               sigmas: torch.Tensor, latent: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        model = self.model

        def make_guider(denoiser: Any) -> PerpNegGuidance:
            return PerpNegGuidance(denoiser, model.model_sampling, self.positive, self.negative, self.empty,
                                   self.cfg, self.neg_scale, extra_cond=model.extra_cond, hooks=model.guidance_hooks)

        return run_sampler(context, model, self.positive, self.negative, self.cfg, sampler.name, sigmas, latent,
                           noise.generate(latent), noise.seed, add_noise=not isinstance(noise, NoNoise),
                           sampler_options=dict(sampler.options), make_guider=make_guider)


class PerpNegGuider(Node):
    category = "_for_testing"
    python_module = "comfy_extras.nodes_perpneg"
    experimental = True
    inputs = [Socket("model", MODEL), Socket("positive", CONDITIONING), Socket("negative", CONDITIONING),
              Socket("empty_conditioning", CONDITIONING), cfg_input(),
              Float("neg_scale", default=1.0, min=0.0, max=100.0, step=0.01)]
    outputs = [Output(GUIDER)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """Positive, negative and empty conditioning run in one UNet batch: three entries per latent."""
        return MemoryEstimate(outputs=({"batch_factor": 3, "model": shapes.get("model")},))

    def execute(self, model: DiffusionModel, positive, negative, empty_conditioning, cfg: float, neg_scale: float):
        return (PerpNegGuiderChoice(model, positive, negative, empty_conditioning, cfg, neg_scale),)


def _freeu_inputs(b1: float, b2: float) -> list:
    return [Socket("model", MODEL), Float("b1", default=b1, min=0.0, max=10.0, step=0.01),
            Float("b2", default=b2, min=0.0, max=10.0, step=0.01),
            Float("s1", default=0.9, min=0.0, max=10.0, step=0.01),
            Float("s2", default=0.2, min=0.0, max=10.0, step=0.01)]


class FreeU(Node):
    category = "model_patches/unet"
    python_module = "comfy_extras.nodes_freelunch"
    description = "Amplifies the decoder's backbone features and damps the skips' low frequencies (FreeU)."
    inputs = _freeu_inputs(1.1, 1.2)
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, b1: float, b2: float, s1: float, s2: float):
        channels = model.family.unet.model_channels
        return (model.with_unet_patches(freeu_patches(channels, b1, b2, s1, s2)),)


class FreeU_V2(Node):
    category = "model_patches/unet"
    python_module = "comfy_extras.nodes_freelunch"
    description = "FreeU with the backbone scaled by its normalised channel mean (the paper's second form)."
    inputs = _freeu_inputs(1.3, 1.4)
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, b1: float, b2: float, s1: float, s2: float):
        channels = model.family.unet.model_channels
        return (model.with_unet_patches(freeu_patches(channels, b1, b2, s1, s2, v2=True)),)


class PatchModelAddDownscale(Node):
    display_name = "PatchModelAddDownscale (Kohya Deep Shrink)"
    category = "model_patches/unet"
    python_module = "comfy_extras.nodes_model_downscale"
    description = ("Shrinks the hidden state after an input block for the early steps, so large images keep a "
                   "coherent layout.")
    inputs = [Socket("model", MODEL), Int("block_number", default=3, min=1, max=32, step=1),
              Float("downscale_factor", default=2.0, min=0.1, max=9.0, step=0.001),
              Float("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
              Float("end_percent", default=0.35, min=0.0, max=1.0, step=0.001),
              Boolean("downscale_after_skip", default=True),
              Combo("downscale_method", list(RESIZE_METHODS)), Combo("upscale_method", list(RESIZE_METHODS))]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, block_number: int, downscale_factor: float, start_percent: float,
                end_percent: float, downscale_after_skip: bool, downscale_method: str, upscale_method: str):
        ms = model.model_sampling
        patches = deep_shrink_patches(block_number, downscale_factor, ms.percent_to_sigma(start_percent),
                                      ms.percent_to_sigma(end_percent), ms.sigma, downscale_after_skip,
                                      downscale_method, upscale_method)
        return (model.with_unet_patches(patches),)


class PerturbedAttentionGuidance(Node):
    category = "model_patches/unet"
    python_module = "comfy_extras.nodes_pag"
    description = "Guides away from a prediction whose middle-block self-attention is the identity (PAG)."
    inputs = [Socket("model", MODEL), Float("scale", default=3.0, min=0.0, max=100.0, step=0.01, round=0.01)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, scale: float):
        return (model.with_guidance_hooks(perturbed_attention_hooks(scale)),)


class SelfAttentionGuidance(Node):
    display_name = "Self-Attention Guidance"
    category = "_for_testing"
    python_module = "comfy_extras.nodes_sag"
    experimental = True
    description = "Guides away from a prediction whose most-attended regions were blurred (SAG)."
    inputs = [Socket("model", MODEL), Float("scale", default=0.5, min=-2.0, max=5.0, step=0.01),
              Float("blur_sigma", default=2.0, min=0.0, max=10.0, step=0.1)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, scale: float, blur_sigma: float):
        return (model.with_guidance_hooks(self_attention_guidance_hooks(scale, blur_sigma)),)


class HyperTile(Node):
    category = "model_patches/unet"
    python_module = "comfy_extras.nodes_hypertile"
    description = "Runs self-attention in tiles on large images (faster; the tiling changes every step)."
    inputs = [Socket("model", MODEL), Int("tile_size", default=256, min=1, max=2048, step=None),
              Int("swap_size", default=2, min=1, max=128, step=None),
              Int("max_depth", default=0, min=0, max=10, step=None), Boolean("scale_depth", default=False)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, tile_size: int, swap_size: int, max_depth: int, scale_depth: bool):
        return (model.with_unet_patches(hypertile_patches(tile_size, swap_size, max_depth, scale_depth)),)


class TomePatchModel(Node):
    category = "model_patches/unet"
    python_module = "comfy_extras.nodes_tomesd"
    description = "Merges similar query tokens in the full-resolution self-attentions (ToMe): faster."
    inputs = [Socket("model", MODEL), Float("ratio", default=0.3, min=0.0, max=1.0, step=0.01)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, ratio: float):
        return (model.with_unet_patches(tome_patches(ratio)),)


class DifferentialDiffusion(Node):
    display_name = "Differential Diffusion"
    category = "_for_testing"
    python_module = "comfy_extras.nodes_differential_diffusion"
    experimental = True
    description = ("Reads the inpainting mask as how much each pixel may change: a pixel joins the repainted "
                   "region at the step where the mask exceeds a threshold falling from 1 to 0.")
    inputs = [Socket("model", MODEL), Float("strength", default=1.0, min=0.0, max=1.0, step=0.01, optional=True)]
    outputs = _MODEL_OUT

    def execute(self, model: DiffusionModel, strength: float = 1.0):
        return (dataclasses.replace(model.clone(), denoise_mask_fn=differential_mask_fn(strength)),)


NODE_CLASSES = [ModelSamplingDiscrete, ModelSamplingContinuousEDM, ModelSamplingContinuousV, RescaleCFG, CFGZeroStar,
                PerpNeg, PerpNegGuider, FreeU, FreeU_V2,
                PatchModelAddDownscale, PerturbedAttentionGuidance, SelfAttentionGuidance, HyperTile, TomePatchModel,
                DifferentialDiffusion]
