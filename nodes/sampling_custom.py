"""The custom-sampling nodes: sampling split into its parts (sampler, sigmas, noise, guider) so that each
can be chosen or built separately, as in ComfyUI's SamplerCustom family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffusion.handles import DiffusionModel
from diffusion.sampling.guidance import Conditioning
from diffusion.sampling.guidance_dual import DUAL_CFG_STYLES, DualCFGGuider
from diffusion.sampling.schedules_extra import sigma_span
from graph.memory_estimate import MemoryEstimate
from graph.node import Boolean, Combo, Float, Node, Output, Socket
from graph.types import CONDITIONING, GUIDER, LATENT, MODEL, NOISE, SAMPLER, SIGMAS
from nodes.control_estimates import add_control_memory, controls_of
from nodes.estimates import sampler_estimate
from nodes.sampling import (
    SAMPLER_ADVICE,
    cfg_batch,
    cfg_input,
    make_noise,
    run_sampler,
    sampler_input,
    seed_input,
)


@dataclass(frozen=True)
class SamplerChoice:
    """SAMPLER: a sampler by name with its options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class RandomNoiseSource:
    """NOISE drawn on the CPU from a seed (per batch_index)."""

    seed: int

    def generate(self, latent: dict[str, Any]) -> torch.Tensor:
        return make_noise(latent, self.seed)


@dataclass(frozen=True)
class NoNoise:
    """NOISE that adds nothing: the latent already carries its noise."""

    seed: int = 0

    def generate(self, latent: dict[str, Any]) -> torch.Tensor:
        return torch.zeros_like(latent["samples"])


@dataclass
class Guider:
    """GUIDER: a model with its conditionings and guidance scale (cfg 1 and no negative: BasicGuider)."""

    model: DiffusionModel
    positive: Conditioning
    negative: Conditioning
    cfg: float

    def sample(self, context: Any, noise: RandomNoiseSource | NoNoise, sampler: SamplerChoice,
               sigmas: torch.Tensor, latent: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return run_sampler(context, self.model, self.positive, self.negative, self.cfg, sampler.name, sigmas, latent,
                           noise.generate(latent), noise.seed, add_noise=not isinstance(noise, NoNoise),
                           sampler_options=dict(sampler.options))


@dataclass
class DualGuider:
    """GUIDER of DualCFGGuider: two positive conditionings and a negative with two scales
    (diffusion.sampling.guidance_dual)."""

    model: DiffusionModel
    cond1: Conditioning
    cond2: Conditioning
    negative: Conditioning
    cfg_conds: float
    cfg_cond2_negative: float
    style: str

    def sample(self, context: Any, noise: RandomNoiseSource | NoNoise, sampler: SamplerChoice,
               sigmas: torch.Tensor, latent: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        model = self.model

        def make_guider(denoiser: Any) -> DualCFGGuider:
            return DualCFGGuider(denoiser, model.model_sampling, self.cond1, self.cond2, self.negative,
                                 self.cfg_conds, self.cfg_cond2_negative, self.style, extra_cond=model.extra_cond,
                                 hooks=model.guidance_hooks)

        return run_sampler(context, model, self.cond1, self.negative, self.cfg_conds, sampler.name, sigmas, latent,
                           noise.generate(latent), noise.seed, add_noise=not isinstance(noise, NoNoise),
                           sampler_options=dict(sampler.options), make_guider=make_guider)


class KSamplerSelect(Node):
    category = "sampling/custom_sampling/samplers"
    inputs = [sampler_input()]
    outputs = [Output(SAMPLER)]

    def execute(self, sampler_name):
        return (SamplerChoice(sampler_name),)


class RandomNoise(Node):
    category = "sampling/custom_sampling/noise"
    inputs = [seed_input("noise_seed")]
    outputs = [Output(NOISE)]

    def execute(self, noise_seed):
        return (RandomNoiseSource(noise_seed),)


class DisableNoise(Node):
    category = "sampling/custom_sampling/noise"
    inputs = []
    outputs = [Output(NOISE)]

    def execute(self):
        return (NoNoise(),)


class AddNoise(Node):
    category = "_for_testing/custom_sampling/noise"
    description = ("Adds noise to a latent at the noise level the sigmas span (first minus last), e.g. to "
                   "continue a schedule split with SplitSigmas from an unnoised latent.")
    inputs = [Socket("model", MODEL), Socket("noise", NOISE), Socket("sigmas", SIGMAS), Socket("latent_image", LATENT)]
    outputs = [Output(LATENT)]

    def execute(self, model, noise, sigmas, latent_image):
        if len(sigmas) == 0:
            return (latent_image,)
        samples = latent_image["samples"].float()
        scale = model.latent_scale
        x = samples * scale if torch.count_nonzero(samples) > 0 else samples  # an empty latent stays 0
        noisy = model.model_sampling.noise_scaling(sigma_span(sigmas), noise.generate(latent_image), x) / scale
        out = dict(latent_image)
        out["samples"] = torch.nan_to_num(noisy, nan=0.0, posinf=0.0, neginf=0.0)
        return (out,)


class CFGGuider(Node):
    category = "sampling/custom_sampling/guiders"
    inputs = [Socket("model", MODEL), Socket("positive", CONDITIONING), Socket("negative", CONDITIONING),
              cfg_input()]
    outputs = [Output(GUIDER)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """Not memory of its own: its shape tells the sampler how many UNet batch entries a latent takes."""
        return MemoryEstimate(outputs=({"batch_factor": cfg_batch(inputs["cfg"]), "model": shapes.get("model"),
                                        "controls": controls_of(shapes.get("positive"), shapes.get("negative"))},))

    def execute(self, model, positive, negative, cfg):
        return (Guider(model, positive, negative, cfg),)


class BasicGuider(Node):
    category = "sampling/custom_sampling/guiders"
    inputs = [Socket("model", MODEL), Socket("conditioning", CONDITIONING)]
    outputs = [Output(GUIDER)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return MemoryEstimate(outputs=({"batch_factor": 1, "model": shapes.get("model"),
                                        "controls": controls_of(shapes.get("conditioning"))},))

    def execute(self, model, conditioning):
        return (Guider(model, conditioning, [], 1.0),)


def _scale(name: str) -> Float:
    return Float(name, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)


class DualCFGGuiderNode(Node):
    node_type = "DualCFGGuider"
    category = "sampling/custom_sampling/guiders"
    description = ("Guidance by two conditionings and a negative: cond1 against cond2 at cfg_conds, cond2 against "
                   "the negative at cfg_cond2_negative, added (regular) or applied one inside the other (nested).")
    inputs = [Socket("model", MODEL), Socket("cond1", CONDITIONING), Socket("cond2", CONDITIONING),
              Socket("negative", CONDITIONING), _scale("cfg_conds"), _scale("cfg_cond2_negative"),
              Combo("style", DUAL_CFG_STYLES)]
    outputs = [Output(GUIDER)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """Up to three UNet batch entries per latent (cond1, cond2, negative)."""
        return MemoryEstimate(outputs=({"batch_factor": 3, "model": shapes.get("model"), "controls": controls_of(
            shapes.get("cond1"), shapes.get("cond2"), shapes.get("negative"))},))

    def execute(self, model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style):
        if style not in DUAL_CFG_STYLES:
            raise ValueError(f"DualCFGGuider: style must be one of {DUAL_CFG_STYLES}, got {style!r}")
        return (DualGuider(model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style),)


_LATENT_OUTPUTS = [Output(LATENT, "output"), Output(LATENT, "denoised_output")]


class SamplerCustom(Node):
    category = "sampling/custom_sampling"
    hidden = ("context",)
    inputs = [Socket("model", MODEL), Boolean("add_noise", default=True), seed_input("noise_seed"), cfg_input(),
              Socket("positive", CONDITIONING), Socket("negative", CONDITIONING), Socket("sampler", SAMPLER),
              Socket("sigmas", SIGMAS), Socket("latent_image", LATENT)]
    outputs = _LATENT_OUTPUTS
    memory_advice = SAMPLER_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        latent, model, factor = shapes.get("latent_image"), shapes.get("model"), cfg_batch(inputs["cfg"])
        controls = controls_of(shapes.get("positive"), shapes.get("negative"))
        return add_control_memory(sampler_estimate(latent, model, context, factor, outputs=2), latent, model,
                                  controls, factor, context)

    def execute(self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image,
                context=None):
        noise = RandomNoiseSource(noise_seed) if add_noise else NoNoise(noise_seed)
        return Guider(model, positive, negative, cfg).sample(context, noise, sampler, sigmas, latent_image)


class SamplerCustomAdvanced(Node):
    category = "sampling/custom_sampling"
    hidden = ("context",)
    inputs = [Socket("noise", NOISE), Socket("guider", GUIDER), Socket("sampler", SAMPLER),
              Socket("sigmas", SIGMAS), Socket("latent_image", LATENT)]
    outputs = _LATENT_OUTPUTS
    memory_advice = SAMPLER_ADVICE

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """An unknown guider counts one UNet batch entry per latent: the least any guider runs."""
        guider = shapes.get("guider") if isinstance(shapes.get("guider"), dict) else {}
        latent, model, factor = shapes.get("latent_image"), guider.get("model"), guider.get("batch_factor", 1)
        return add_control_memory(sampler_estimate(latent, model, context, factor, outputs=2), latent, model,
                                  guider.get("controls", ()), factor, context)

    def execute(self, noise, guider, sampler, sigmas, latent_image, context=None):
        return guider.sample(context, noise, sampler, sigmas, latent_image)


NODE_CLASSES = [KSamplerSelect, RandomNoise, DisableNoise, AddNoise, CFGGuider, BasicGuider, DualCFGGuiderNode,
                SamplerCustom, SamplerCustomAdvanced]
