"""CLIP vision towers (image encoders) through transformers' `CLIPVisionModelWithProjection`.

Image prompts (unCLIP, SDXL "revision", style models, IP-Adapter) start from a CLIP image encoder: its
projected image embedding, its last hidden state or its penultimate one. The files people have hold one of
four towers — OpenAI ViT-L/14 (224 or 336 pixels), OpenCLIP ViT-H/14, OpenCLIP ViT-bigG/14 — in one of two
single-file layouts:

- HF: transformers' own names, `vision_model.*` + `visual_projection.weight` (ComfyUI's `clip_vision_g`,
  IP-Adapter's `image_encoder`);
- OpenCLIP / OpenAI: `visual.conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
  `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_post` and
  `proj` (applied as x @ proj), found bare, under `visual.` or under `embedder.model.visual.` in SD2.1 unCLIP
  checkpoints.

Which tower a file holds is read from its shapes (width, depth, MLP width, patch size, positions,
projection); heads are not in the shapes (all four real towers have 16) and neither is the activation (OpenAI's
ViT-L uses quick GELU, OpenCLIP's towers GELU), so tiny test files carry both in `latentloom.config` metadata.
The model is built on the meta device and filled by assignment: its parameters are the file's tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..checkpoints.clip_keys import open_clip_block_key
from ..checkpoints.files import (
    CheckpointError,
    key_prefixes,
    read_metadata,
    read_state_dict,
    write_safetensors,
)
from ..checkpoints.random_checkpoints import random_tensor
from .clip_vision_preprocess import clip_preprocess
from .transformers_clip import clip_classes

if TYPE_CHECKING:  # imported when a tower is built (transformers_clip.py)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

log = logging.getLogger(__name__)

Tensor = torch.Tensor

CONFIG_METADATA_KEY = "latentloom.config"  # the same key families.py reads for checkpoints
VISION = "vision_model."
PROJECTION = "visual_projection.weight"
OPEN_CLIP_PREFIXES = ("embedder.model.visual.", "visual.", "model.visual.", "")  # most specific first
HF_PREFIXES = ("", "model.", "clip_vision.")
OPEN_CLIP_TOP = {  # OpenCLIP visual tower → transformers' names (proj handled apart: transposed)
    "conv1.weight": VISION + "embeddings.patch_embedding.weight",
    "class_embedding": VISION + "embeddings.class_embedding",
    "positional_embedding": VISION + "embeddings.position_embedding.weight",
    "ln_pre.weight": VISION + "pre_layrnorm.weight",
    "ln_pre.bias": VISION + "pre_layrnorm.bias",
    "ln_post.weight": VISION + "post_layernorm.weight",
    "ln_post.bias": VISION + "post_layernorm.bias",
}


class ClipVisionError(CheckpointError):
    """A file (or state dict) that is not a CLIP vision tower the loader knows."""


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    projection_dim: int
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"  # OpenAI ViT-L: "quick_gelu"

    def transformers_config(self) -> CLIPVisionConfig:
        return clip_classes().CLIPVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            projection_dim=self.projection_dim, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act=self.hidden_act, layer_norm_eps=1e-5, num_channels=3, attn_implementation="sdpa",
        )


PRESETS: dict[str, ClipVisionConfig] = {
    "vit_l": ClipVisionConfig(1024, 24, 4096, 16, 768, hidden_act="quick_gelu"),
    "vit_l_336": ClipVisionConfig(1024, 24, 4096, 16, 768, image_size=336, hidden_act="quick_gelu"),
    "vit_h": ClipVisionConfig(1280, 32, 5120, 16, 1024),
    "vit_bigg": ClipVisionConfig(1664, 48, 8192, 16, 1280),
    # tiny (tests): 32 wide, 7x7 patches of 32 pixels on the real 224-pixel input
    "tiny": ClipVisionConfig(32, 3, 64, 2, 16, patch_size=32),
}


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: what CLIPVisionEncode hands on. `image_embeds` [B, projection] (unCLIP, revision),
    `last_hidden_state` [B, tokens, width] (style models), `penultimate_hidden_states` [B, tokens, width]
    (IP-Adapter "plus"); read as attributes or, as ComfyUI's node packs do, as `output["image_embeds"]`."""

    image_embeds: Tensor
    last_hidden_state: Tensor
    penultimate_hidden_states: Tensor

    def __getitem__(self, key: str) -> Tensor:
        if key not in ("image_embeds", "last_hidden_state", "penultimate_hidden_states"):
            raise KeyError(key)
        return getattr(self, key)


def _layer_indices(sd: Mapping[str, Tensor], prefix: str) -> set[int]:
    return {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix) and k[len(prefix)].isdigit()}


def config_from_state_dict(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> ClipVisionConfig:
    """The tower's sizes from a state dict in transformers' layout (see `to_transformers_layout`)."""
    meta = _metadata_config(metadata)
    patch = sd[VISION + "embeddings.patch_embedding.weight"]
    positions = int(sd[VISION + "embeddings.position_embedding.weight"].shape[0])
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ClipVisionError(f"CLIP vision position table has {positions} rows: not a square grid plus a class token")
    layers = _layer_indices(sd, VISION + "encoder.layers.")
    if not layers:
        raise ClipVisionError("CLIP vision weights have no encoder layers")
    act = meta.get("hidden_act") or ("quick_gelu" if hidden == 1024 else "gelu")
    heads = int(meta.get("num_heads") or (16 if hidden % 16 == 0 else max(hidden // 64, 1)))
    return ClipVisionConfig(
        hidden_size=hidden, num_layers=max(layers) + 1,
        intermediate_size=int(sd[VISION + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_heads=heads, projection_dim=int(sd[PROJECTION].shape[0]),
        image_size=grid * patch_size, patch_size=patch_size, hidden_act=act,
    )


def _metadata_config(metadata: Mapping[str, str] | None) -> dict:
    raw = (metadata or {}).get(CONFIG_METADATA_KEY)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ClipVisionError(f"metadata {CONFIG_METADATA_KEY!r} is not valid JSON: {e}") from None
    section = parsed.get("clip_vision", {}) if isinstance(parsed, dict) else {}
    return section if isinstance(section, dict) else {}


def detect_layout(sd: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """(layout, prefix) of the CLIP vision tower in `sd`: ("hf", p) or ("open_clip", p); None if there is none."""
    for prefix in HF_PREFIXES:
        if prefix + VISION + "embeddings.patch_embedding.weight" in sd:
            return "hf", prefix
    for prefix in OPEN_CLIP_PREFIXES:
        if prefix + "conv1.weight" in sd and prefix + "class_embedding" in sd:
            return "open_clip", prefix
    return None


def from_open_clip(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """An OpenCLIP / OpenAI visual tower under `prefix` → transformers' layout (q/k/v split out of the fused
    in-projection, `proj` transposed into a Linear weight), and the keys not understood."""
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for full, value in sd.items():
        if not full.startswith(prefix):
            continue
        key = full[len(prefix):]
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
        elif key == "proj":
            out[PROJECTION] = value.T
        elif key.startswith("transformer.resblocks."):
            converted = open_clip_block_key(key.removeprefix("transformer.resblocks."), value)
            if converted is None:
                unexpected.append(full)
                continue
            out.update({"vision_model." + k.removeprefix("text_model."): v for k, v in converted.items()})
        elif prefix:  # a bare layout shares its keys with whatever else the file holds
            unexpected.append(full)
    return out, unexpected


def from_hf(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """An HF-layout tower under `prefix`; the derived `position_ids` buffer some files carry and the text half of
    a whole CLIP model (`text_model.*`, `text_projection`, `logit_scale`) are dropped."""
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for full, value in sd.items():
        if not full.startswith(prefix):
            continue
        key = full[len(prefix):]
        if key.endswith("embeddings.position_ids") or key.startswith(("text_model.", "text_projection", "logit_scale")):
            continue
        if key.startswith(VISION) or key == PROJECTION:
            out[key] = value
        else:
            unexpected.append(full)
    return out, unexpected


def to_transformers_layout(sd: Mapping[str, Tensor], what: str = "CLIP vision") -> dict[str, Tensor]:
    """The CLIP vision tower in `sd` (either layout, any known prefix) in transformers' layout. Raises
    ClipVisionError naming what the keys look like when no tower is there."""
    found = detect_layout(sd)
    if found is None:
        shown = dict(sorted(key_prefixes(sd).items(), key=lambda kv: -kv[1])[:8])
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in sd):
            hint = " (this is a Stable Diffusion checkpoint: load it with a checkpoint loader)"
        elif any(k.startswith(("encoder.", "decoder.")) for k in sd):
            hint = " (this looks like a VAE)"
        raise ClipVisionError(
            f"not a {what} model: found {len(sd)} keys with prefixes {shown}; expected vision_model.* and "
            f"visual_projection.weight (HF) or visual.conv1/class_embedding/transformer.resblocks (OpenCLIP){hint}")
    layout, prefix = found
    out, unexpected = (from_open_clip if layout == "open_clip" else from_hf)(sd, prefix)
    if unexpected:
        raise ClipVisionError(f"{len(unexpected)} unexpected key(s) in the {layout} {what} tower: {unexpected[:6]}")
    if PROJECTION not in out:
        name = "proj" if layout == "open_clip" else PROJECTION
        raise ClipVisionError(f"the {what} tower has no image projection ({name})")
    return out


def build_clip_vision(sd: Mapping[str, Tensor], config: ClipVisionConfig, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> CLIPVisionModelWithProjection:
    """A transformers vision model holding exactly the tensors of `sd` (transformers' layout): built on the
    meta device and filled with `assign=True`, cast tensor by tensor only where the dtype differs."""
    device = torch.device(device)
    with torch.device("meta"):
        model = clip_classes().CLIPVisionModelWithProjection(config.transformers_config())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    wrong = [f"{k}: file {list(sd[k].shape)}, model {list(s)}" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or wrong:
        raise ClipVisionError(f"CLIP vision weights do not fit the detected tower ({config}): missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}, wrong shapes {wrong[:4]}")
    cast = {k: v.to(device=device, dtype=dtype or v.dtype) if v.dtype.is_floating_point else v.to(device)
            for k, v in sd.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    positions = model.vision_model.embeddings.position_embedding.weight.shape[0]
    model.vision_model.embeddings.position_ids = torch.arange(positions, device=device).expand(1, -1)
    return model.eval().requires_grad_(False)


def clip_vision_from_state_dict(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *,
                                dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                                what: str = "CLIP vision") -> CLIPVisionModelWithProjection:
    hf = to_transformers_layout(sd, what)
    try:
        config = config_from_state_dict(hf, metadata)
    except KeyError as e:
        raise ClipVisionError(f"the {what} tower is incomplete: no {e.args[0]!r}") from None
    return build_clip_vision(hf, config, dtype=dtype, device=device)


def load_clip_vision(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> CLIPVisionModelWithProjection:
    """A CLIP vision file (`models/clip_vision`), either layout, read through the safe readers."""
    sd = read_state_dict(path)
    try:
        model = clip_vision_from_state_dict(sd, read_metadata(path), dtype=dtype, device=device)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    config = model.config
    log.info("loaded %s: CLIP vision %d wide, %d layers, %d px", path, config.hidden_size,
             config.num_hidden_layers, config.image_size)
    return model


@torch.no_grad()
def encode_image(model: CLIPVisionModelWithProjection, image: Tensor, crop: bool = True,
                 pixel_mask: Tensor | None = None) -> ClipVisionOutput:
    """CLIP_VISION_OUTPUT of IMAGE [B, H, W, C] in 0..1: ComfyUI's preprocessing at the tower's own size,
    then the tower; outputs on the CPU in fp32. `pixel_mask` ([1, size, size] at the tower's size) multiplies the
    normalised pixels (IPAdapterEncoder's mask: what it zeroes reads as the normalisation's mean colour)."""
    param = model.vision_model.embeddings.patch_embedding.weight
    pixels = clip_preprocess(image, model.config.image_size, crop=crop)
    if pixel_mask is not None:
        pixels = pixels * pixel_mask.to(pixels.dtype)[:, None]
    pixels = pixels.to(param.device, param.dtype)
    out = model(pixel_values=pixels, output_hidden_states=True)
    return ClipVisionOutput(out.image_embeds.float().cpu(), out.last_hidden_state.float().cpu(),
                            out.hidden_states[-2].float().cpu())


# -- random-weight files for tests ---------------------------------------------------------------------------

def to_open_clip(sd: Mapping[str, Tensor], prefix: str = "visual.") -> dict[str, Tensor]:
    """transformers' layout → the OpenCLIP layout under `prefix` (q/k/v fused, projection transposed)."""
    top = {ours: theirs for theirs, ours in OPEN_CLIP_TOP.items()}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[prefix + top[key]] = value
        elif key == PROJECTION:
            out[prefix + "proj"] = value.T.contiguous()
        else:
            index, _, name = key.removeprefix(VISION + "encoder.layers.").partition(".")
            module, _, param = name.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{index}.attn.in_proj_{param}", {})[module[len("self_attn.")]] = value
            else:
                out[f"{prefix}transformer.resblocks.{index}.{block[module]}.{param}"] = value
    for name, parts in fused.items():
        out[f"{prefix}transformer.resblocks.{name}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
    return out


def clip_vision_layout(config: ClipVisionConfig, layout: str = "hf", prefix: str | None = None) -> dict[str, Tensor]:
    """Key → meta tensor of a tower's file in `layout` ("hf" or "open_clip") under `prefix`
    (default: none for HF, `visual.` for OpenCLIP)."""
    with torch.device("meta"):
        tower = clip_classes().CLIPVisionModelWithProjection(config.transformers_config())
        sd = {k: v for k, v in tower.state_dict().items()
              if not k.endswith("position_ids")}
    if layout == "hf":
        return {(prefix or "") + k: v for k, v in sd.items()}
    if layout == "open_clip":
        return to_open_clip(sd, "visual." if prefix is None else prefix)
    raise ValueError(f"layout must be 'hf' or 'open_clip', got {layout!r}")


def config_metadata(config: ClipVisionConfig) -> dict[str, str]:
    return {CONFIG_METADATA_KEY: json.dumps({"clip_vision": {"num_heads": config.num_heads,
                                                            "hidden_act": config.hidden_act}})}


def write_random_clip_vision(path: str | os.PathLike, preset: str | ClipVisionConfig = "tiny", *, layout: str = "hf",
                             prefix: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                             **overrides: int) -> ClipVisionConfig:
    """A random-weight CLIP vision file in the real layout; `overrides` change fields of the preset (e.g.
    projection_dim to match a tiny SDXL's pooled width). Tiny towers carry heads and activation as metadata."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    config = replace(config, **overrides)
    shapes_of = clip_vision_layout(config, layout, prefix)
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(shapes_of)
    shapes = {k: (dtype, tuple(shapes_of[k].shape)) for k in keys}
    metadata = {"format": "pt", **config_metadata(config)}
    write_safetensors(path, shapes, lambda k: random_tensor(k, shapes[k][1], gen).to(dtype), metadata)
    return config

