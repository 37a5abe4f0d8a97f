"""The custom-sampling nodes: sampling split into its parts (sampler, sigmas, noise, guider) so that each
can be chosen or built separately, as in ComfyUI's SamplerCustom family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffusion.guidance import Conditioning
from diffusion.models import DiffusionModel
from diffusion.sampling import ksampler_sigmas
from diffusion.schedules import exponential_sigmas, karras_sigmas
from graph.memory_estimate import MemoryEstimate
from graph.node import Boolean, Float, Int, Node, Output, Socket
from graph.types import CONDITIONING, GUIDER, LATENT, MODEL, NOISE, SAMPLER, SIGMAS
from nodes.estimates import sampler_estimate
from nodes.sampling import (
    SAMPLER_ADVICE,
    cfg_batch,
    cfg_input,
    make_noise,
    run_sampler,
    sampler_input,
    scheduler_input,
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


class KSamplerSelect(Node):
    category = "sampling/custom_sampling/samplers"
    inputs = [sampler_input()]
    outputs = [Output(SAMPLER)]

    def execute(self, sampler_name):
        return (SamplerChoice(sampler_name),)


class BasicScheduler(Node):
    category = "sampling/custom_sampling/schedulers"
    inputs = [Socket("model", MODEL), scheduler_input(), Int("steps", default=20, min=1, max=10000),
              Float("denoise", default=1.0, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(SIGMAS)]

    def execute(self, model, scheduler, steps, denoise):
        return (ksampler_sigmas(model.model_sampling.schedule, scheduler, steps, denoise),)


def _sigma_inputs() -> list[Float]:
    return [Float("sigma_max", default=14.614642, min=0.0, max=5000.0, step=0.01, round=False),
            Float("sigma_min", default=0.0291675, min=0.0, max=5000.0, step=0.01, round=False)]


class KarrasScheduler(Node):
    category = "sampling/custom_sampling/schedulers"
    inputs = [Int("steps", default=20, min=1, max=10000), *_sigma_inputs(),
              Float("rho", default=7.0, min=0.0, max=100.0, step=0.01, round=False)]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, sigma_max, sigma_min, rho):
        return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    category = "sampling/custom_sampling/schedulers"
    inputs = [Int("steps", default=20, min=1, max=10000), *_sigma_inputs()]
    outputs = [Output(SIGMAS)]

    def execute(self, steps, sigma_max, sigma_min):
        return (exponential_sigmas(steps, sigma_min, sigma_max),)


class SplitSigmas(Node):
    category = "sampling/custom_sampling/sigmas"
    description = "Splits a schedule at a step: the high sigmas run first, the low ones continue from there."
    inputs = [Socket("sigmas", SIGMAS), Int("step", default=0, min=0, max=10000)]
    outputs = [Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas")]

    def execute(self, sigmas, step):
        return (sigmas[: step + 1], sigmas[step:])


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


class CFGGuider(Node):
    category = "sampling/custom_sampling/guiders"
    inputs = [Socket("model", MODEL), Socket("positive", CONDITIONING), Socket("negative", CONDITIONING),
              cfg_input()]
    outputs = [Output(GUIDER)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        """Not memory of its own: its shape tells the sampler how many UNet batch entries a latent takes."""
        return MemoryEstimate(outputs=({"batch_factor": cfg_batch(inputs["cfg"]), "model": shapes.get("model")},))

    def execute(self, model, positive, negative, cfg):
        return (Guider(model, positive, negative, cfg),)


class BasicGuider(Node):
    category = "sampling/custom_sampling/guiders"
    inputs = [Socket("model", MODEL), Socket("conditioning", CONDITIONING)]
    outputs = [Output(GUIDER)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return MemoryEstimate(outputs=({"batch_factor": 1, "model": shapes.get("model")},))

    def execute(self, model, conditioning):
        return (Guider(model, conditioning, [], 1.0),)


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
        return sampler_estimate(shapes.get("latent_image"), shapes.get("model"), context, cfg_batch(inputs["cfg"]),
                                outputs=2)

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
        return sampler_estimate(shapes.get("latent_image"), guider.get("model"), context,
                                guider.get("batch_factor", 1), outputs=2)

    def execute(self, noise, guider, sampler, sigmas, latent_image, context=None):
        return guider.sample(context, noise, sampler, sigmas, latent_image)


NODE_CLASSES = [KSamplerSelect, BasicScheduler, KarrasScheduler, ExponentialScheduler, SplitSigmas, RandomNoise,
                DisableNoise, CFGGuider, BasicGuider, SamplerCustom, SamplerCustomAdvanced]
