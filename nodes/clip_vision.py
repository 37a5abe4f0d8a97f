"""Image-prompt nodes: CLIP vision loading and encoding, unCLIP (SD2.1 unCLIP checkpoints, SDXL revision) and
T2I-Adapter style models, with ComfyUI's interfaces.

The models behind them live in diffusion/models/ (clip_vision.py, unclip.py, style_model.py); every file is
read through the safe readers and cached by file like checkpoints, and every model runs through the model
manager. CLIP_VISION_OUTPUT carries `image_embeds`, `last_hidden_state` and `penultimate_hidden_states`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from diffusion.checkpoints.files import read_metadata, read_state_dict
from diffusion.handles import ClipVisionModel
from diffusion.models.clip_vision import clip_vision_from_state_dict, load_clip_vision
from diffusion.models.style_model import StyleModel, load_style_model
from diffusion.patches.context_bias import BIAS_KEY, append_bias
from diffusion.patches.patcher import ModelPatcher
from graph.node import Combo, Float, Node, Output, Socket
from graph.types import CLIP, CONDITIONING, IMAGE, MODEL, VAE
from nodes.environment import Environment
from nodes.loaders import _file_key, _ModelFileNode, _models, load_checkpoint_handles

log = logging.getLogger(__name__)

CLIP_VISION = "CLIP_VISION"
CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
STYLE_MODEL = "STYLE_MODEL"


def _clip_vision_handle(env: Environment, model: torch.nn.Module, name: str) -> ClipVisionModel:
    manager = env.model_manager()
    return ClipVisionModel(ModelPatcher(model, manager.device, "cpu", name=f"{name} clip_vision"), manager)


class CLIPVisionLoader(_ModelFileNode):
    display_name = "Load CLIP Vision"
    category = "loaders"
    description = ("Loads a CLIP image encoder (OpenAI ViT-L/14, OpenCLIP ViT-H/14 or ViT-bigG/14; HF or OpenCLIP "
                   "layout).")
    hidden = ("context",)
    model_kind, name_input = "clip_vision", "clip_name"
    inputs = [Combo("clip_name", _models("clip_vision"))]
    outputs = [Output(CLIP_VISION)]

    def execute(self, clip_name, context):
        env = context.env
        path = env.find_model("clip_vision", clip_name)

        def load() -> ClipVisionModel:
            with env.naming_files():
                model = load_clip_vision(path, dtype=env.model_dtype())
            return _clip_vision_handle(env, model, Path(clip_name).stem)

        return (env.model_cache.load(("clip_vision", *_file_key(path)), load),)


class CLIPVisionEncode(Node):
    display_name = "CLIP Vision Encode"
    category = "conditioning"
    inputs = [Socket("clip_vision", CLIP_VISION), Socket("image", IMAGE), Combo("crop", ["center", "none"])]
    outputs = [Output(CLIP_VISION_OUTPUT)]

    def execute(self, clip_vision, image, crop):
        return (clip_vision.encode(image, crop=crop == "center"),)


class unCLIPCheckpointLoader(_ModelFileNode):
    display_name = "unCLIPCheckpointLoader"
    category = "loaders"
    description = "Loads an SD2.1 unCLIP checkpoint: its model, text encoder, VAE and image encoder."
    hidden = ("context",)
    model_kind, name_input = "checkpoints", "ckpt_name"
    inputs = [Combo("ckpt_name", _models("checkpoints"))]
    outputs = [Output(MODEL), Output(CLIP), Output(VAE), Output(CLIP_VISION)]

    def execute(self, ckpt_name, context):
        env = context.env
        model, clip, vae = load_checkpoint_handles(env, ckpt_name)
        path = env.find_model("checkpoints", ckpt_name)

        def load() -> ClipVisionModel:
            with env.naming_files():
                sd = read_state_dict(path)
                try:
                    vision = clip_vision_from_state_dict(sd, read_metadata(path), what="unCLIP image encoder",
                                                         dtype=env.model_dtype())
                except ValueError as e:
                    raise ValueError(f"{path}: {e} (is this an unCLIP checkpoint? it was read as "
                                     f"{model.family.title})") from None
            return _clip_vision_handle(env, vision, Path(ckpt_name).stem)

        return model, clip, vae, env.model_cache.load(("unclip_vision", *_file_key(path)), load)


class unCLIPConditioning(Node):
    display_name = "unCLIPConditioning"
    category = "conditioning"
    description = ("Adds a CLIP image embedding to every conditioning entry: the image prompt of SD2.1 unCLIP "
                   "models, or SDXL revision (it replaces the pooled text embedding).")
    inputs = [Socket("conditioning", CONDITIONING), Socket("clip_vision_output", CLIP_VISION_OUTPUT),
              Float("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
              Float("noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, clip_vision_output, strength, noise_augmentation):
        if strength == 0:
            return (conditioning,)
        item = {"clip_vision_output": clip_vision_output, "strength": strength,
                "noise_augmentation": noise_augmentation}
        return ([(t, {**opts, "unclip_conditioning": [*opts.get("unclip_conditioning", []), item]})
                 for t, opts in conditioning],)


class StyleModelLoader(_ModelFileNode):
    display_name = "Load Style Model"
    category = "loaders"
    hidden = ("context",)
    model_kind, name_input = "style_models", "style_model_name"
    inputs = [Combo("style_model_name", _models("style_models"))]
    outputs = [Output(STYLE_MODEL)]

    def execute(self, style_model_name, context):
        env = context.env
        path = env.find_model("style_models", style_model_name)

        def load() -> StyleModel:
            manager = env.model_manager()
            with env.naming_files():
                model = load_style_model(path, dtype=env.model_dtype())
            return StyleModel(ModelPatcher(model, manager.device, "cpu", name=Path(style_model_name).stem), manager)

        return (env.model_cache.load(("style_model", *_file_key(path)), load),)


class StyleModelApply(Node):
    display_name = "Apply Style Model"
    category = "conditioning/style_model"
    description = "Appends the style model's tokens for a reference image to every conditioning entry."
    inputs = [Socket("conditioning", CONDITIONING), Socket("style_model", STYLE_MODEL),
              Socket("clip_vision_output", CLIP_VISION_OUTPUT),
              Float("strength", default=1.0, min=0.0, max=10.0, step=0.001),
              Combo("strength_type", ["multiply", "attn_bias"])]
    outputs = [Output(CONDITIONING)]

    def execute(self, conditioning, style_model, clip_vision_output, strength, strength_type):
        """multiply: the style tokens times strength; attn_bias: the tokens as they are, their attention logits in
        every cross-attention biased by log(strength) (diffusion/patches/context_bias.py; 0 removes them)."""
        tokens = style_model.get_cond(clip_vision_output.last_hidden_state)
        tokens = tokens.reshape(1, -1, tokens.shape[-1])
        if strength_type == "multiply":
            tokens = tokens * strength
        # strength 1 adds no bias (log 1 = 0): the plain concatenation, as multiply at 1, bit for bit
        bias = None
        if strength_type == "attn_bias" and strength != 1.0:
            bias = math.log(strength) if strength > 0 else -math.inf  # 0: the tokens masked out
        out = []
        for t, opts in conditioning:
            if t.shape[-1] != tokens.shape[-1]:
                raise ValueError(f"StyleModelApply: the style model makes {tokens.shape[-1]}-wide tokens but the "
                                 f"conditioning is {t.shape[-1]} wide (the style model is for SD1.x prompts)")
            opts = dict(opts)
            if bias is not None or BIAS_KEY in opts:  # a bias already there keeps covering its tokens
                opts[BIAS_KEY] = append_bias(opts, t.shape[1], tokens.shape[1], 0.0 if bias is None else bias)
            out.append((torch.cat([t, tokens.to(t)], dim=1), opts))
        return (out,)


NODE_CLASSES = [CLIPVisionLoader, CLIPVisionEncode, unCLIPCheckpointLoader, unCLIPConditioning, StyleModelLoader,
                StyleModelApply]
