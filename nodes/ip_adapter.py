"""IP-Adapter nodes with the interfaces of the ComfyUI_IPAdapter_plus node pack (class names, inputs, defaults,
ranges and outputs as its workflows save them): IPAdapterModelLoader, IPAdapterUnifiedLoader, IPAdapter,
IPAdapterAdvanced, IPAdapterEncoder, IPAdapterEmbeds, IPAdapterCombineEmbeds.

A reference image is encoded by a CLIP vision model (nodes/clip_vision.py's CLIP_VISION), projected by the
IP-Adapter into image tokens and attended to at every cross-attention of the UNet of a MODEL clone
(diffusion/patches/ip_adapter_patch.py). IPADAPTER is either the loaded adapter (IPAdapterModelLoader) or, as the
pack's unified loader makes it, a pipeline `{"ipadapter": {"file", "model"}, "clipvision": {"file", "model"}}`.

Implemented: every weight type (per-layer multipliers, diffusion/patches/ip_adapter_weights.py), embeds_scaling
"V only", every combine_embeds method, IPAdapterEncoder's mask (as the pack: it blanks part of the reference image
before CLIP vision, `encoder_pixel_mask`); the other scalings are refused by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffusion.handles import ClipVisionModel, DiffusionModel
from diffusion.models.ip_adapter import load_ip_adapter
from diffusion.patches.ip_adapter_patch import (
    COMBINE_METHODS,
    EMBEDS_COMBINE_METHODS,
    IPAdapterHandle,
    IPAttentionHook,
    check_fits,
    combine_embeds,
    encoder_pixel_mask,
    image_tokens,
    ip_adapter_patches,
)
from diffusion.patches.ip_adapter_weights import SIMPLE_WEIGHT_TYPES as SIMPLE_RULES
from diffusion.patches.ip_adapter_weights import WEIGHT_TYPES as WEIGHT_RULES
from diffusion.patches.ip_adapter_weights import block_weights
from graph.node import Combo, Float, Node, Output, Socket
from graph.types import IMAGE, MASK, MODEL
from nodes.environment import Environment
from nodes.loaders import _file_key, _ModelFileNode, _models

log = logging.getLogger(__name__)

IPADAPTER = "IPADAPTER"
EMBEDS = "EMBEDS"
CLIP_VISION = "CLIP_VISION"
WEIGHT_TYPES = list(WEIGHT_RULES)
SIMPLE_WEIGHT_TYPES = list(SIMPLE_RULES)
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
IMPLEMENTED_SCALING = ("V only",)
# The unified loader's presets and the files (names as the pack's README lists them) each one looks for.
PRESETS = {
    "LIGHT - SD1.5 only (low strength)": ({"sd1": ("ip-adapter_sd15_light_v11", "ip-adapter_sd15_light")}, "vit-h"),
    "STANDARD (medium strength)": ({"sd1": ("ip-adapter_sd15",), "sdxl": ("ip-adapter_sdxl_vit-h",)}, "vit-h"),
    "VIT-G (medium strength)": ({"sd1": ("ip-adapter_sd15_vit-G",), "sdxl": ("ip-adapter_sdxl",)}, "vit-g"),
    "PLUS (high strength)": ({"sd1": ("ip-adapter-plus_sd15",), "sdxl": ("ip-adapter-plus_sdxl_vit-h",)}, "vit-h"),
    "PLUS FACE (portraits)": ({"sd1": ("ip-adapter-plus-face_sd15",), "sdxl": ("ip-adapter-plus-face_sdxl_vit-h",)},
                              "vit-h"),
    "FULL FACE - SD1.5 only (portraits stronger)": ({"sd1": ("ip-adapter-full-face_sd15",)}, "vit-h"),
}
CLIP_VISION_FILES = {"vit-h": "CLIP-ViT-H-14-laion2B-s32B-b79K", "vit-g": "CLIP-ViT-bigG-14-laion2B-39B-b160k"}


def load_ipadapter_file(env: Environment, name: str, node: str = "IPAdapterModelLoader") -> IPAdapterHandle:
    """The IP-Adapter `ipadapter/name`, from the model cache (read once per file)."""
    path = env.find_model("ipadapter", name)

    def load() -> IPAdapterHandle:
        try:
            with env.naming_files():
                return IPAdapterHandle(load_ip_adapter(path, dtype=env.model_dtype()), Path(name).name)
        except ValueError as exc:
            raise ValueError(f"{node}: ipadapter_file {name!r}: {exc}") from None

    return env.model_cache.load(("ipadapter", *_file_key(path)), load)


class IPAdapterModelLoader(_ModelFileNode):
    display_name = "IPAdapter Model Loader"
    category = "ipadapter/loaders"
    description = "Loads an IP-Adapter (plain, plus or full; SD1.x or SDXL; .safetensors or .bin): models/ipadapter."
    hidden = ("context",)
    model_kind, name_input = "ipadapter", "ipadapter_file"
    inputs = [Combo("ipadapter_file", _models("ipadapter"))]
    outputs = [Output(IPADAPTER)]

    def execute(self, ipadapter_file, context):
        return (load_ipadapter_file(context.env, ipadapter_file),)


def _find_by_stem(env: Environment, kind: str, stems: tuple[str, ...]) -> str | None:
    wanted = [s.lower() for s in stems]
    names = env.list_models(kind)
    for stem in wanted:  # in the order of preference
        for name in names:
            if Path(name).stem.lower() == stem:
                return name
    return None


class IPAdapterUnifiedLoader(Node):
    display_name = "IPAdapter Unified Loader"
    category = "ipadapter"
    description = ("Loads the IP-Adapter and CLIP vision model of a preset, for the model's family, by the file names "
                   "the IPAdapter_plus README gives (models/ipadapter, models/clip_vision). The model passes through.")
    hidden = ("context",)
    inputs = [Socket("model", MODEL), Combo("preset", list(PRESETS)), Socket("ipadapter", IPADAPTER, optional=True)]
    outputs = [Output(MODEL, "model"), Output(IPADAPTER, "ipadapter")]

    def execute(self, model, preset, context, ipadapter=None):
        node = "IPAdapterUnifiedLoader"
        env = context.env
        files, tower = PRESETS[preset]
        family = "sdxl" if model.family.name.startswith("sdxl") else model.family.name
        stems = files.get(family)
        if stems is None:
            raise ValueError(f"{node}: preset {preset!r} has no IP-Adapter for {model.family.title} models")
        name = _find_by_stem(env, "ipadapter", stems)
        if name is None:
            raise ValueError(f"{node}: preset {preset!r} needs {' or '.join(s + '.safetensors' for s in stems)} in "
                             f"models/ipadapter for a {model.family.title} model; it is not there")
        vision_stem = CLIP_VISION_FILES[tower]
        vision_name = _find_by_stem(env, "clip_vision", (vision_stem,))
        if vision_name is None:
            raise ValueError(f"{node}: preset {preset!r} needs {vision_stem}.safetensors in models/clip_vision")
        from nodes.clip_vision import CLIPVisionLoader  # the same cached loading as the CLIPVisionLoader node

        vision = CLIPVisionLoader().execute(vision_name, context)[0]
        pipeline = {"ipadapter": {"file": name, "model": load_ipadapter_file(env, name, node)},
                    "clipvision": {"file": vision_name, "model": vision}}
        return model, pipeline


def _parts(ipadapter: Any, clip_vision: ClipVisionModel | None, node: str,
           need_vision: bool = True) -> tuple[IPAdapterHandle, ClipVisionModel | None]:
    """The adapter and CLIP vision model of an IPADAPTER (a loaded adapter or a unified loader's pipeline)."""
    if isinstance(ipadapter, dict) and "ipadapter" in ipadapter:
        handle = ipadapter["ipadapter"]["model"]
        clip_vision = clip_vision if clip_vision is not None else ipadapter.get("clipvision", {}).get("model")
    else:
        handle = ipadapter
    if not isinstance(handle, IPAdapterHandle):
        raise ValueError(f"{node}: ipadapter must come from IPAdapterModelLoader or IPAdapterUnifiedLoader, got "
                         f"{type(handle).__name__}")
    if need_vision and clip_vision is None:
        raise ValueError(f"{node}: no CLIP vision model: connect clip_vision (a Load CLIP Vision node) or use "
                         f"IPAdapterUnifiedLoader")
    return handle, clip_vision


def _encode(handle: IPAdapterHandle, clip_vision: ClipVisionModel, image: torch.Tensor,
            mask: torch.Tensor | None = None, node: str = "IPAdapterEncoder") -> torch.Tensor:
    """The CLIP vision output this adapter projects (image embeds, or penultimate hidden states) of IMAGE; `mask`
    (IPAdapterEncoder's) blanks part of the image first (`encoder_pixel_mask`)."""
    pixel_mask = None
    if mask is not None:
        pixel_mask = encoder_pixel_mask(mask, clip_vision.patcher.model.config.image_size, node)
    return getattr(clip_vision.encode(image, crop=True, pixel_mask=pixel_mask), handle.model.info.embeds)


def _negative(handle: IPAdapterHandle, clip_vision: ClipVisionModel | None, positive: torch.Tensor,
              node: str) -> torch.Tensor:
    """IP-Adapter's unconditional embedding: zeros for the plain variant, a black image's hidden states else."""
    if handle.model.info.variant == "plain":
        return torch.zeros_like(positive[:1])
    if clip_vision is None:
        raise ValueError(f"{node}: the {handle.model.info.title} needs a CLIP vision model for its negative (a black "
                         f"image's hidden states): connect clip_vision or give neg_embed")
    size = clip_vision.patcher.model.config.image_size
    return _encode(handle, clip_vision, torch.zeros(1, size, size, 3))


def apply_ip_adapter(model: DiffusionModel, handle: IPAdapterHandle, positive: torch.Tensor, negative: torch.Tensor,
                     weight: float, weight_type: str, start_at: float, end_at: float, combine: str = "concat",
                     embeds_scaling: str = "V only", attn_mask: torch.Tensor | None = None,
                     node: str = "IPAdapterAdvanced") -> DiffusionModel:
    """A MODEL clone whose UNet attends to the images' tokens (see ip_adapter_patch.py); `model` is unchanged."""
    if weight_type not in WEIGHT_RULES:
        raise ValueError(f"{node}: weight_type {weight_type!r} is not one of {', '.join(WEIGHT_RULES)}")
    if embeds_scaling not in IMPLEMENTED_SCALING:
        raise ValueError(f"{node}: embeds_scaling {embeds_scaling!r} is not implemented; only "
                         f"{', '.join(IMPLEMENTED_SCALING)} is")
    if combine not in COMBINE_METHODS:
        raise ValueError(f"{node}: combine_embeds {combine!r} is not one of {', '.join(COMBINE_METHODS)}")
    if start_at > end_at:
        raise ValueError(f"{node}: start_at {start_at} is after end_at {end_at}")
    try:
        numbers = check_fits(handle, model.patcher.model, model.family.title, node)
        cond = image_tokens(handle.model, positive, combine)
        uncond = image_tokens(handle.model, negative, combine)
        ms = model.model_sampling
        blocks = None if weight_type == "linear" else block_weights(
            model.patcher.model, weight_type, weight, model.family.name.startswith("sdxl"))
        hook = IPAttentionHook(handle, numbers, cond, uncond, weight, ms.percent_to_sigma(start_at),
                               ms.percent_to_sigma(end_at), ms.sigma, attn_mask, blocks)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(node + ":") else f"{node}: {message}") from None
    log.debug("%s: %s, %d image tokens, weight %s (%s), %s..%s", node, handle.describe(), cond.shape[1], weight,
              weight_type, start_at, end_at)
    return model.with_unet_patches(ip_adapter_patches(hook))


def _percent(name: str, default: float) -> Any:
    return Float(name, default=default, min=0.0, max=1.0, step=0.001)


class IPAdapterAdvanced(Node):
    display_name = "IPAdapter Advanced"
    category = "ipadapter"
    description = ("Adds reference images to a model: their CLIP vision embeddings, projected by the IP-Adapter, are "
                   "attended to at every cross-attention besides the text (image_negative: what the negative sees).")
    inputs = [Socket("model", MODEL), Socket("ipadapter", IPADAPTER), Socket("image", IMAGE),
              Float("weight", default=1.0, min=-1, max=5, step=0.05), Combo("weight_type", WEIGHT_TYPES),
              Combo("combine_embeds", list(COMBINE_METHODS)), _percent("start_at", 0.0), _percent("end_at", 1.0),
              Combo("embeds_scaling", EMBEDS_SCALING), Socket("image_negative", IMAGE, optional=True),
              Socket("attn_mask", MASK, optional=True), Socket("clip_vision", CLIP_VISION, optional=True)]
    outputs = [Output(MODEL)]

    def execute(self, model, ipadapter, image, weight, weight_type, combine_embeds, start_at, end_at,
                embeds_scaling, image_negative=None, attn_mask=None, clip_vision=None):
        node = "IPAdapterAdvanced"
        handle, vision = _parts(ipadapter, clip_vision, node)
        positive = _encode(handle, vision, image)
        if image_negative is not None:
            negative = _encode(handle, vision, image_negative)
        else:
            negative = _negative(handle, vision, positive, node)
        return (apply_ip_adapter(model, handle, positive, negative, weight, weight_type, start_at, end_at,
                                 combine_embeds, embeds_scaling, attn_mask, node),)


class IPAdapter(Node):
    display_name = "IPAdapter"
    category = "ipadapter"
    description = "IPAdapterAdvanced with fewer options; needs the pipeline of IPAdapterUnifiedLoader."
    inputs = [Socket("model", MODEL), Socket("ipadapter", IPADAPTER), Socket("image", IMAGE),
              Float("weight", default=1.0, min=-1, max=3, step=0.05), _percent("start_at", 0.0),
              _percent("end_at", 1.0), Combo("weight_type", SIMPLE_WEIGHT_TYPES),
              Socket("attn_mask", MASK, optional=True)]
    outputs = [Output(MODEL)]

    def execute(self, model, ipadapter, image, weight, start_at, end_at, weight_type, attn_mask=None):
        node = "IPAdapter"
        if weight_type not in SIMPLE_RULES:
            raise ValueError(f"{node}: weight_type {weight_type!r} is not one of {', '.join(SIMPLE_RULES)}")
        if not (isinstance(ipadapter, dict) and "ipadapter" in ipadapter and "clipvision" in ipadapter):
            raise ValueError(f"{node}: ipadapter must be the pipeline of IPAdapterUnifiedLoader (it carries the CLIP "
                             f"vision model); with IPAdapterModelLoader use IPAdapterAdvanced")
        handle, vision = _parts(ipadapter, None, node)
        positive = _encode(handle, vision, image)
        negative = _negative(handle, vision, positive, node)
        return (apply_ip_adapter(model, handle, positive, negative, weight, SIMPLE_RULES[weight_type], start_at,
                                 end_at, attn_mask=attn_mask, node=node),)


class IPAdapterEncoder(Node):
    display_name = "IPAdapter Encoder"
    category = "ipadapter/embeds"
    description = ("The CLIP vision embeddings an IP-Adapter projects (times weight), and its negative, for "
                   "IPAdapterEmbeds.")
    inputs = [Socket("ipadapter", IPADAPTER), Socket("image", IMAGE),
              Float("weight", default=1.0, min=-1.0, max=3.0, step=0.01), Socket("mask", MASK, optional=True),
              Socket("clip_vision", CLIP_VISION, optional=True)]
    outputs = [Output(EMBEDS, "pos_embed"), Output(EMBEDS, "neg_embed")]

    def execute(self, ipadapter, image, weight, mask=None, clip_vision=None):
        node = "IPAdapterEncoder"
        handle, vision = _parts(ipadapter, clip_vision, node)
        positive = _encode(handle, vision, image, mask, node)
        negative = _negative(handle, vision, positive, node)
        return positive * weight if weight != 1 else positive, negative


class IPAdapterEmbeds(Node):
    display_name = "IPAdapter Embeds"
    category = "ipadapter/embeds"
    description = "IPAdapterAdvanced from embeddings (IPAdapterEncoder) instead of images; several are concatenated."
    inputs = [Socket("model", MODEL), Socket("ipadapter", IPADAPTER), Socket("pos_embed", EMBEDS),
              Float("weight", default=1.0, min=-1, max=3, step=0.05), Combo("weight_type", WEIGHT_TYPES),
              _percent("start_at", 0.0), _percent("end_at", 1.0), Combo("embeds_scaling", EMBEDS_SCALING),
              Socket("neg_embed", EMBEDS, optional=True), Socket("attn_mask", MASK, optional=True),
              Socket("clip_vision", CLIP_VISION, optional=True)]
    outputs = [Output(MODEL)]

    def execute(self, model, ipadapter, pos_embed, weight, weight_type, start_at, end_at, embeds_scaling,
                neg_embed=None, attn_mask=None, clip_vision=None):
        node = "IPAdapterEmbeds"
        handle, vision = _parts(ipadapter, clip_vision, node, need_vision=False)
        if not isinstance(pos_embed, torch.Tensor):
            raise ValueError(f"{node}: pos_embed must be EMBEDS from IPAdapterEncoder, got {type(pos_embed).__name__}")
        negative = neg_embed if neg_embed is not None else _negative(handle, vision, pos_embed, node)
        return (apply_ip_adapter(model, handle, pos_embed, negative, weight, weight_type, start_at, end_at,
                                 "concat", embeds_scaling, attn_mask, node),)


class IPAdapterCombineEmbeds(Node):
    display_name = "IPAdapter Combine Embeds"
    category = "ipadapter/embeds"
    description = ("Several EMBEDS as one: concatenated (each image keeps its tokens) or combined element by element "
                   "(add, subtract the mean of the others from the first, average, norm average, max, min).")
    inputs = [Socket("embed1", EMBEDS), Combo("method", list(EMBEDS_COMBINE_METHODS)),
              *(Socket(f"embed{i}", EMBEDS, optional=True) for i in range(2, 6))]
    outputs = [Output(EMBEDS)]

    def execute(self, embed1, method, embed2=None, embed3=None, embed4=None, embed5=None):
        embeds = [e for e in (embed1, embed2, embed3, embed4, embed5) if e is not None]
        shapes = {tuple(e.shape[1:]) for e in embeds}
        if len(shapes) > 1:
            raise ValueError(f"IPAdapterCombineEmbeds: the embeds differ in shape ({sorted(shapes)}): they come from "
                             f"different CLIP vision models or IP-Adapter variants")
        return (combine_embeds(torch.cat(embeds), method),)


NODE_CLASSES = [IPAdapterUnifiedLoader, IPAdapterModelLoader, IPAdapter, IPAdapterAdvanced, IPAdapterEncoder,
                IPAdapterEmbeds, IPAdapterCombineEmbeds]
