"""ControlNet nodes: loading ControlNets (plain and diff), applying them to conditionings, and the Canny
preprocessor that makes edge hints from images.

A loaded ControlNet is cached by file like a checkpoint (one copy however many prompts and conditionings use it);
applying it adds a `ControlStep` to the conditioning's `control` chain (diffusion/patches/control.py), which the
sampler's guider hands to each UNet call.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from diffusion.checkpoints.control_lora import is_control_lora_file, read_control_lora
from diffusion.checkpoints.controlnet_files import build_controlnet, is_diff_controlnet, read_controlnet
from diffusion.checkpoints.t2i_adapter_files import is_t2i_adapter_file, load_t2i_adapter
from diffusion.handles import DiffusionModel
from diffusion.models.controlnet_union import UNION_TYPES
from diffusion.patches.control import ControlNetHandle, ControlStep, apply_control, load_controlnet_handle
from diffusion.patches.control_lora_handle import ControlLoraHandle
from diffusion.patches.t2i_adapter_control import load_t2i_adapter_handle
from diffusion.preprocessors import canny
from graph.memory_estimate import MemoryEstimate
from graph.node import Combo, Float, Node, Output, Socket
from graph.types import CONDITIONING, IMAGE, MODEL, VAE
from nodes.control_estimates import apply_estimate, controlnet_file_shape
from nodes.environment import Environment
from nodes.loaders import _file_key, _ModelFileNode, _models

log = logging.getLogger(__name__)

CONTROL_NET = "CONTROL_NET"


def _load(env: Environment, name: str, node: str, model: DiffusionModel | None = None) -> ControlNetHandle:
    """The ControlNet of `controlnet/name` from the model cache; a diff ControlNet gets `model`'s UNet weights
    added (and is cached per model)."""
    path = env.find_model("controlnet", name)
    try:
        adapter = is_t2i_adapter_file(path)  # T2I-Adapters load here too, as in ComfyUI (never diff files)
        diff = not adapter and is_diff_controlnet(path)
    except ValueError as exc:
        raise ValueError(f"{node}: control_net_name {name!r}: {exc}") from None
    if diff and model is None:
        raise ValueError(f"{node}: control_net_name {name!r} is a diff ControlNet (its weights are differences to "
                         f"a base model): load it with DiffControlNetLoader and the model it was made for")

    def load() -> ControlNetHandle:
        manager = env.model_manager()
        try:
            with env.naming_files():
                if adapter:
                    t2i, t2i_info = load_t2i_adapter(path, dtype=env.model_dtype())
                    return load_t2i_adapter_handle(t2i, t2i_info, manager, Path(name).stem)
                if is_control_lora_file(path):  # composed with the model it is applied to when sampling
                    lora, lora_info = read_control_lora(path)
                    return ControlLoraHandle(lora, lora_info, manager, env.model_dtype(), Path(name).stem)
                sd, info = read_controlnet(path)
                base = None
                if diff:
                    if info.family != model.family.name:
                        raise ValueError(f"it is an {info.title} diff ControlNet and the model is {model.family.title}")
                    params = {n for n, _ in model.patcher.model.named_parameters()}

                    def base(key: str):  # the MODEL's weights, its own patches (LoRA) applied
                        return model.patcher.patched_weight(key, "cpu") if key in params else None

                net = build_controlnet(sd, info, dtype=env.model_dtype(), base=base)
        except ValueError as exc:
            raise ValueError(f"{node}: control_net_name {name!r}: {exc}") from None
        return load_controlnet_handle(net, info, manager, Path(name).stem)

    key = ("controlnet", *_file_key(path))
    if diff:  # the objects themselves (hashed by identity, kept alive by the key): an id could be reused
        key += (model.patcher.model, model.patcher.patch_token)
    return env.model_cache.load(key, load)


class ControlNetLoader(_ModelFileNode):
    display_name = "Load ControlNet Model"
    category = "loaders"
    description = "Loads a ControlNet (SD1.x, SD2.x or SDXL; original or diffusers layout) from models/controlnet."
    hidden = ("context",)
    model_kind, name_input = "controlnet", "control_net_name"
    inputs = [Combo("control_net_name", _models("controlnet"))]
    outputs = [Output(CONTROL_NET)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return controlnet_file_shape(context, inputs.get("control_net_name"))

    def execute(self, control_net_name, context):
        return (_load(context.env, control_net_name, "ControlNetLoader"),)


class DiffControlNetLoader(_ModelFileNode):
    display_name = "Load ControlNet Model (diff)"
    category = "loaders"
    description = ("Loads a ControlNet; a diff ControlNet (stored as differences to its base model) gets the "
                   "model's weights added.")
    hidden = ("context",)
    model_kind, name_input = "controlnet", "control_net_name"
    inputs = [Socket("model", MODEL), Combo("control_net_name", _models("controlnet"))]
    outputs = [Output(CONTROL_NET)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return controlnet_file_shape(context, inputs.get("control_net_name"))

    def execute(self, model, control_net_name, context):
        return (_load(context.env, control_net_name, "DiffControlNetLoader", model),)


def _strength() -> Float:
    return Float("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                 tooltip="How strongly the hint steers the image (0: not at all).")


def _step(control_net: ControlNetHandle, image: Any, strength: float, start: float, end: float,
          node: str) -> ControlStep:
    if image.ndim != 4:
        raise ValueError(f"{node}: image must be an IMAGE [B, H, W, C], got {list(image.shape)}")
    if start > end:  # ComfyUI runs such a workflow: the ControlNet then never acts
        log.warning("%s: start_percent %s is after end_percent %s: the ControlNet will not act", node, start, end)
    return ControlStep(control_net, image.detach().float().cpu(), float(strength), float(start), float(end))


class ControlNetApply(Node):
    display_name = "Apply ControlNet (OLD)"
    category = "conditioning/controlnet"
    deprecated = True
    description = "Applies a ControlNet with a hint image to a conditioning, for the whole sampling."
    inputs = [Socket("conditioning", CONDITIONING), Socket("control_net", CONTROL_NET), Socket("image", IMAGE),
              _strength()]
    outputs = [Output(CONDITIONING)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return apply_estimate((shapes.get("conditioning"),), shapes.get("control_net"), inputs.get("strength"))

    def execute(self, conditioning, control_net, image, strength):
        if strength == 0:
            return (conditioning,)
        step = _step(control_net, image, strength, 0.0, 1.0, "ControlNetApply")
        return (apply_control(conditioning, step, to_uncond=True),)


class ControlNetApplyAdvanced(Node):
    display_name = "Apply ControlNet"
    category = "conditioning/controlnet"
    description = ("Applies a ControlNet with a hint image to the positive and the negative conditioning, with a "
                   "strength and the part of the sampling (start to end percent) in which it acts. The VAE is "
                   "accepted for ComfyUI's workflows; SD1.x/SD2.x/SDXL ControlNets take the hint as pixels.")
    inputs = [Socket("positive", CONDITIONING), Socket("negative", CONDITIONING),
              Socket("control_net", CONTROL_NET), Socket("image", IMAGE), _strength(),
              Float("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
              Float("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
              Socket("vae", VAE, optional=True)]
    outputs = [Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative")]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return apply_estimate((shapes.get("positive"), shapes.get("negative")), shapes.get("control_net"),
                              inputs.get("strength"))

    def execute(self, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None):
        if strength == 0:
            return (positive, negative)
        step = _step(control_net, image, strength, start_percent, end_percent, "ControlNetApplyAdvanced")
        return (apply_control(positive, step), apply_control(negative, step))


class SetUnionControlNetType(Node):
    display_name = "SetUnionControlNetType"
    category = "conditioning/controlnet"
    description = ("Tells a union ControlNet (controlnet-union-sdxl) which kind of hint it is given; auto lets it "
                   "take the hint as it is.")
    inputs = [Socket("control_net", CONTROL_NET), Combo("type", ["auto", *UNION_TYPES])]
    outputs = [Output(CONTROL_NET)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return MemoryEstimate(outputs=(shapes.get("control_net"),), kept_bytes=0)

    def execute(self, control_net, type):
        if type != "auto" and type not in UNION_TYPES:
            raise ValueError(f"SetUnionControlNetType: type must be auto or one of {list(UNION_TYPES)}, got {type!r}")
        union = getattr(getattr(control_net, "info", None), "union", None)
        if union is None:  # ComfyUI passes the type on and a plain ControlNet ignores it
            log.warning("SetUnionControlNetType: %s is not a union ControlNet; the type %r has no effect",
                        getattr(control_net, "title", "the ControlNet"), type)
            return (control_net,)
        index = None if type == "auto" else UNION_TYPES.index(type)
        if index is not None and index >= union.control_types:
            raise ValueError(f"SetUnionControlNetType: {control_net.title} knows {union.control_types} control types "
                             f"({', '.join(UNION_TYPES[:union.control_types])}), not {type!r}")
        # a copy sharing the loaded network: other uses of the same ControlNet keep their own type
        return (dataclasses.replace(control_net, options={**control_net.options, "control_type": index}),)


class Canny(Node):
    category = "image/preprocessors"
    description = "Canny edge detection: white edges on black, a hint for edge ControlNets."
    inputs = [Socket("image", IMAGE),
              Float("low_threshold", default=0.4, min=0.01, max=0.99, step=0.01),
              Float("high_threshold", default=0.8, min=0.01, max=0.99, step=0.01)]
    outputs = [Output(IMAGE)]

    def execute(self, image, low_threshold, high_threshold):
        if low_threshold > high_threshold:
            raise ValueError(f"Canny: low_threshold {low_threshold} is above high_threshold {high_threshold}")
        return (canny(image, low_threshold, high_threshold),)


NODE_CLASSES = [ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced,
                SetUnionControlNetType, Canny]
