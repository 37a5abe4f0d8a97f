"""AnimateDiff nodes under the class names, inputs and categories of the AnimateDiff-Evolved node pack, so that its
basic txt2vid workflows run (Gen1: AnimateDiff Loader + context options; Gen2: Load AnimateDiff Model -> Apply
AnimateDiff Model -> Use Evolved Sampling; the legacy loader with context).

A motion module file (`models/animatediff_models`) is read once per version; applying it gives a clone of the MODEL
whose UNet calls run the modules (diffusion/patches/motion_patch.py) and whose guider sees the latent batch as the
frames of one clip, window by window with context options (diffusion/sampling/context_windows.py). The input
MODEL is unchanged. Motion LoRAs (`models/animatediff_motion_lora`) change the modules' weights for that clone
only. Inputs of the pack that we do not implement (AD settings and keyframes, sample
settings, per-block values, view options, chained context options) are refused by name when connected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusion.checkpoints.motion_files import load_motion_file, motion_lora_deltas, read_motion_lora
from diffusion.handles import DiffusionModel
from diffusion.models.motion_module import MotionModuleSet
from diffusion.patches.motion_patch import (
    BETA_SCHEDULES,
    beta_schedule_sampling,
    check_fits,
    motion_guidance,
    motion_patches,
)
from diffusion.sampling.context_windows import FUSE_METHODS, ContextOptions, ContextWindowWrapper
from diffusion.sampling.guidance import GuidanceHooks
from graph.node import Boolean, Combo, Float, Int, Node, Output, Socket
from graph.types import MODEL
from nodes.environment import Environment
from nodes.loaders import _file_key, _ModelFileNode, _models

FOLDER = "animatediff_models"
LORA_FOLDER = "animatediff_motion_lora"
GEN1 = "Animate Diff 🎭🅐🅓/① Gen1 nodes ①"
GEN2 = "Animate Diff 🎭🅐🅓/② Gen2 nodes ②"
CONTEXT = "Animate Diff 🎭🅐🅓/context opts"
MOTION_MODEL, M_MODELS, CONTEXT_OPTIONS = "MOTION_MODEL_ADE", "M_MODELS", "CONTEXT_OPTIONS"
BIGMAX = 2**53 - 1
# ADE's fuse methods, in its order; we blend with the first two (see context_windows.py)
FUSE_LIST = ["pyramid", "flat", "overlap-linear", "🔬delayed reverse sawtooth", "🔬pyramid-sigma",
             "🔬pyramid-sigma inverse", "🔬gauss-sigma", "🔬gauss-sigma inverse", "🔬random"]
FUSE_LIST_STATIC = [FUSE_LIST[0], "relative", *FUSE_LIST[1:]]


@dataclass(frozen=True)
class MotionModel:
    """MOTION_MODEL_ADE: a loaded motion module set and its file name."""

    name: str
    module: MotionModuleSet


@dataclass(frozen=True)
class MotionLora:
    """One entry of MOTION_LORA (a tuple of them, in the order chained): a motion LoRA file's tensors."""

    name: str
    strength: float
    tensors: dict[str, Any]


@dataclass(frozen=True)
class ContextChoice:
    """CONTEXT_OPTIONS: the windows and the sampling progress from which they apply."""

    options: ContextOptions
    start_percent: float = 0.0


def load_motion_model(env: Environment, name: str) -> MotionModel:
    path = env.find_model(FOLDER, name)

    def load() -> MotionModel:
        with env.naming_files():
            return MotionModel(name, load_motion_file(path))

    return env.model_cache.load(("animatediff", *_file_key(path)), load)


def load_motion_lora_file(env: Environment, name: str) -> dict[str, Any]:
    path = env.find_model(LORA_FOLDER, name)

    def load() -> dict[str, Any]:
        with env.naming_files():
            return read_motion_lora(path)

    return env.model_cache.load(("animatediff_lora", *_file_key(path)), load)


def _lora_deltas(motion: MotionModel, loras: tuple[MotionLora, ...]) -> dict[str, Any] | None:
    """The summed weight changes of `loras` on `motion`'s modules."""
    total: dict[str, Any] = {}
    for lora in loras:
        for key, delta in motion_lora_deltas(lora.tensors, motion.module.config, lora.name, lora.strength).items():
            total[key] = total[key] + delta if key in total else delta
    return total or None


def _refuse(node: str, **inputs: Any) -> None:
    for name, value in inputs.items():
        if value is not None:
            raise ValueError(f"{node}: input {name!r} is not supported by Latent Loom (leave it unconnected)")


def _effect(node: str, name: str, value: Any) -> float:
    """A MULTIVAL given as a number; masks and per-frame values are refused."""
    if value is None:
        return 1.0
    if isinstance(value, (int, float)):
        return float(value)
    raise ValueError(f"{node}: {name} must be a single number here (masks and per-frame multivals are not supported)")


def apply_animatediff(node: str, model: DiffusionModel,
                      motions: list[tuple[MotionModel, float, tuple[MotionLora, ...]]],
                      context_options: ContextChoice | None, beta_schedule: str,
                      v2_properly: bool = True) -> DiffusionModel:
    """A clone of `model` running `motions` (each with its effect), windowed by `context_options`, with the
    beta schedule chosen. With a v1 module first (or a v2 one and not `v2_properly`, the legacy loader's
    option) the UNet's ResBlocks normalise the clip's frames together, as AnimateDiff v1's UNet did. Errors
    name the node."""
    unet = model.family.unet
    try:
        deltas = []
        for motion, _, loras in motions:
            deltas.append(_lora_deltas(motion, loras))
            check_fits(motion.module, unet.model_channels, unet.channel_mult, unet.num_res_blocks,
                       model.family.title, motion.name)
        sampling = beta_schedule_sampling(beta_schedule, [m.module.config.version for m, _, _ in motions],
                                          model.model_sampling)
    except ValueError as exc:
        raise ValueError(f"{node}: {exc}") from exc
    out = model.clone()
    for (motion, effect, _), delta in zip(motions, deltas, strict=True):
        out = out.with_unet_patches(motion_patches(motion.module, unet.num_res_blocks, effect, delta))
    if motions:
        first = motions[0][0].module.config.version
        out = out.with_guidance_hooks(motion_guidance(first == "v1" or (first == "v2" and not v2_properly)))
    if sampling is not None:
        out = out.with_model_sampling(sampling)
    if context_options is not None:
        options = context_options.options
        if context_options.start_percent > 0:
            start = out.model_sampling.percent_to_sigma(context_options.start_percent)
            options = ContextOptions(options.length, options.overlap, options.stride, options.schedule, options.fuse,
                                     start_sigma=start)
        out = out.with_guidance_hooks(GuidanceHooks(wrap=[ContextWindowWrapper(options)]))
    return out


def _beta_input() -> Combo:
    return Combo("beta_schedule", list(BETA_SCHEDULES), default="autoselect")


class _MotionFileNode(_ModelFileNode):
    model_kind, name_input = FOLDER, "model_name"


class ADE_AnimateDiffLoaderGen1(_MotionFileNode):
    display_name = "AnimateDiff Loader 🎭🅐🅓①"
    category = GEN1
    description = "Loads a motion module and applies it to the MODEL: the latent batch becomes the frames of a clip."
    hidden = ("context",)
    inputs = [Socket("model", MODEL), Combo("model_name", _models(FOLDER)), _beta_input(),
              Socket("context_options", CONTEXT_OPTIONS, optional=True),
              Socket("motion_lora", "MOTION_LORA", optional=True), Socket("ad_settings", "AD_SETTINGS", optional=True),
              Socket("ad_keyframes", "AD_KEYFRAMES", optional=True),
              Socket("sample_settings", "SAMPLE_SETTINGS", optional=True),
              Socket("scale_multival", "MULTIVAL", optional=True), Socket("effect_multival", "MULTIVAL", optional=True),
              Socket("per_block", "PER_BLOCK", optional=True)]
    outputs = [Output(MODEL)]

    def execute(self, model, model_name, beta_schedule, context_options=None, motion_lora=None, ad_settings=None,
                ad_keyframes=None, sample_settings=None, scale_multival=None, effect_multival=None, per_block=None,
                context=None):
        node = type(self).__name__
        _refuse(node, ad_settings=ad_settings, ad_keyframes=ad_keyframes, sample_settings=sample_settings,
                per_block=per_block)
        if _effect(node, "scale_multival", scale_multival) != 1.0:
            raise ValueError(f"{node}: scale_multival other than 1.0 is not supported (use effect_multival)")
        motion = load_motion_model(context.env, model_name)
        effect = _effect(node, "effect_multival", effect_multival)
        return (apply_animatediff(node, model, [(motion, effect, tuple(motion_lora or ()))], context_options,
                                  beta_schedule),)


class ADE_AnimateDiffLoaderWithContext(_MotionFileNode):
    display_name = "AnimateDiff Loader [Legacy] 🎭🅐🅓①"
    category = GEN1
    deprecated = True
    description = "The legacy AnimateDiff loader (use AnimateDiff Loader)."
    hidden = ("context",)
    inputs = [Socket("model", MODEL), Combo("model_name", _models(FOLDER)), _beta_input(),
              Socket("context_options", CONTEXT_OPTIONS, optional=True),
              Socket("motion_lora", "MOTION_LORA", optional=True), Socket("ad_settings", "AD_SETTINGS", optional=True),
              Socket("sample_settings", "SAMPLE_SETTINGS", optional=True),
              Float("motion_scale", default=1.0, min=0.0, max=None, step=0.001, optional=True),
              Boolean("apply_v2_models_properly", default=True, optional=True),
              Socket("ad_keyframes", "AD_KEYFRAMES", optional=True),
              Socket("deprecation_warning", "ADEWARN", optional=True,
                     extra={"text": "Deprecated; use AnimateDiff Loader instead."})]
    outputs = [Output(MODEL)]

    def execute(self, model, model_name, beta_schedule, context_options=None, motion_lora=None, ad_settings=None,
                sample_settings=None, motion_scale=1.0, apply_v2_models_properly=True, ad_keyframes=None,
                deprecation_warning=None, context=None):
        node = type(self).__name__
        _refuse(node, ad_settings=ad_settings, sample_settings=sample_settings, ad_keyframes=ad_keyframes)
        if motion_scale != 1.0:
            raise ValueError(f"{node}: motion_scale {motion_scale} is not supported (only 1.0)")
        motion = load_motion_model(context.env, model_name)
        motions = [(motion, 1.0, tuple(motion_lora or ()))]
        return (apply_animatediff(node, model, motions, context_options, beta_schedule, apply_v2_models_properly),)


class ADE_LoadAnimateDiffModel(_MotionFileNode):
    display_name = "Load AnimateDiff Model 🎭🅐🅓②"
    category = GEN2
    description = "Loads a motion module file (AnimateDiff v1, v2, v3 for SD1.x; the SDXL beta)."
    hidden = ("context",)
    inputs = [Combo("model_name", _models(FOLDER)), Socket("ad_settings", "AD_SETTINGS", optional=True)]
    outputs = [Output(MOTION_MODEL, "MOTION_MODEL")]

    def execute(self, model_name, ad_settings=None, context=None):
        _refuse(type(self).__name__, ad_settings=ad_settings)
        return (load_motion_model(context.env, model_name),)


class ADE_ApplyAnimateDiffModelSimple(Node):
    display_name = "Apply AnimateDiff Model 🎭🅐🅓②"
    category = GEN2
    description = "Prepares a loaded motion module for Use Evolved Sampling."
    inputs = [Socket("motion_model", MOTION_MODEL), Socket("motion_lora", "MOTION_LORA", optional=True),
              Socket("scale_multival", "MULTIVAL", optional=True), Socket("effect_multival", "MULTIVAL", optional=True),
              Socket("ad_keyframes", "AD_KEYFRAMES", optional=True), Socket("per_block", "PER_BLOCK", optional=True)]
    outputs = [Output(M_MODELS)]

    def execute(self, motion_model, motion_lora=None, scale_multival=None, effect_multival=None, ad_keyframes=None,
                per_block=None):
        node = type(self).__name__
        _refuse(node, ad_keyframes=ad_keyframes, per_block=per_block)
        if _effect(node, "scale_multival", scale_multival) != 1.0:
            raise ValueError(f"{node}: scale_multival other than 1.0 is not supported (use effect_multival)")
        return ([(motion_model, _effect(node, "effect_multival", effect_multival), tuple(motion_lora or ()))],)


class ADE_UseEvolvedSampling(Node):
    display_name = "Use Evolved Sampling 🎭🅐🅓②"
    category = GEN2
    description = "Applies motion modules and context options to the MODEL for the samplers that use it."
    inputs = [Socket("model", MODEL), _beta_input(), Socket("m_models", M_MODELS, optional=True),
              Socket("context_options", CONTEXT_OPTIONS, optional=True),
              Socket("sample_settings", "SAMPLE_SETTINGS", optional=True)]
    outputs = [Output(MODEL)]

    def execute(self, model, beta_schedule, m_models=None, context_options=None, sample_settings=None):
        node = type(self).__name__
        _refuse(node, sample_settings=sample_settings)
        return (apply_animatediff(node, model, list(m_models or []), context_options, beta_schedule),)


class ADE_AnimateDiffLoRALoader(_ModelFileNode):
    display_name = "Load AnimateDiff LoRA 🎭🅐🅓"
    category = "Animate Diff 🎭🅐🅓"
    description = "A motion LoRA (e.g. a camera move) for the motion module it is given to; LoRAs chain."
    hidden = ("context",)
    model_kind, name_input = LORA_FOLDER, "name"
    inputs = [Combo("name", _models(LORA_FOLDER)), Float("strength", default=1.0, min=0.0, max=10.0, step=0.001),
              Socket("prev_motion_lora", "MOTION_LORA", optional=True)]
    outputs = [Output("MOTION_LORA")]

    def execute(self, name, strength, prev_motion_lora=None, context=None):
        lora = MotionLora(name, float(strength), load_motion_lora_file(context.env, name))
        return ((*tuple(prev_motion_lora or ()), lora),)


def _context_inputs(stride: bool, fuse_list: list[str]) -> list:
    inputs = [Int("context_length", default=16, min=1, max=128, step=None)]
    if stride:
        inputs.append(Int("context_stride", default=1, min=1, max=32, step=None))
    inputs += [Int("context_overlap", default=4, min=0, max=128, step=None),
               Combo("fuse_method", fuse_list, optional=True),
               Boolean("use_on_equal_length", default=False, optional=True),
               Float("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True),
               Int("guarantee_steps", default=1, min=0, max=BIGMAX, step=None, optional=True),
               Socket("prev_context", CONTEXT_OPTIONS, optional=True), Socket("view_opts", "VIEW_OPTS", optional=True)]
    return inputs


def _context(node: str, schedule: str, length: int, stride: int, overlap: int, fuse_method: str,
             start_percent: float, prev_context: Any, view_opts: Any) -> ContextChoice:
    _refuse(node, prev_context=prev_context, view_opts=view_opts)
    if fuse_method not in FUSE_METHODS:
        raise ValueError(f"{node}: fuse_method {fuse_method!r} is not supported; supported: {', '.join(FUSE_METHODS)}")
    try:
        options = ContextOptions(length, overlap, stride, schedule, fuse_method)
    except ValueError as exc:
        raise ValueError(f"{node}: {exc}") from exc
    return ContextChoice(options, start_percent)


class ADE_StandardUniformContextOptions(Node):
    display_name = "Context Options◆Standard Uniform 🎭🅐🅓"
    category = CONTEXT
    description = "Context windows whose placement shifts at every step, for clips longer than the motion module."
    inputs = _context_inputs(True, FUSE_LIST)
    outputs = [Output(CONTEXT_OPTIONS, "CONTEXT_OPTS")]

    def execute(self, context_length, context_stride, context_overlap, fuse_method="pyramid",
                use_on_equal_length=False, start_percent=0.0, guarantee_steps=1, prev_context=None, view_opts=None):
        return (_context(type(self).__name__, "uniform", context_length, context_stride, context_overlap,
                         fuse_method, start_percent, prev_context, view_opts),)


class ADE_StandardStaticContextOptions(Node):
    display_name = "Context Options◆Standard Static 🎭🅐🅓"
    category = CONTEXT
    description = "Fixed overlapping context windows, for clips longer than the motion module."
    inputs = _context_inputs(False, FUSE_LIST_STATIC)
    outputs = [Output(CONTEXT_OPTIONS, "CONTEXT_OPTS")]

    def execute(self, context_length, context_overlap, fuse_method="pyramid", use_on_equal_length=False,
                start_percent=0.0, guarantee_steps=1, prev_context=None, view_opts=None):
        return (_context(type(self).__name__, "static", context_length, 1, context_overlap, fuse_method,
                         start_percent, prev_context, view_opts),)


NODE_CLASSES = [ADE_AnimateDiffLoaderGen1, ADE_AnimateDiffLoaderWithContext, ADE_LoadAnimateDiffModel,
                ADE_AnimateDiffLoRALoader,
                ADE_ApplyAnimateDiffModelSimple, ADE_UseEvolvedSampling, ADE_StandardUniformContextOptions,
                ADE_StandardStaticContextOptions]
