"""Text-encoder key layouts: checkpoint layouts ↔ the layout of our CLIP text model (models/clip_text.py).

Our working layout is that model's `state_dict()`, which spells transformers 4's
`CLIPTextModelWithProjection` names: `text_model.embeddings.…`, `text_model.encoder.layers.N.…`,
`text_model.final_layer_norm.…`, and `text_projection.weight` when the encoder has a projection.
Checkpoints keep text encoders in one of two layouts under a prefix:

- HF (`cond_stage_model.transformer.`, `conditioner.embedders.0.transformer.`): transformers' own names,
  with or without the `text_model.` level;
- OpenCLIP (`cond_stage_model.model.`, `conditioner.embedders.N.model.`): `token_embedding`,
  `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}`, `ln_final`, `text_projection` (a matrix applied as x @ P: the transpose of a Linear weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

Tensor = torch.Tensor

TEXT = "text_model."
PROJECTION = "text_projection.weight"
# Keys a checkpoint may hold under a text encoder's prefix that no text encoder needs.
IGNORED_HF = ("embeddings.position_ids", "logit_scale")
IGNORED_OPEN_CLIP = ("logit_scale", "attn_mask", "visual.")

OPEN_CLIP_BLOCK = {  # OpenCLIP residual block → transformers encoder layer
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_TOP = {
    "token_embedding.weight": TEXT + "embeddings.token_embedding.weight",
    "positional_embedding": TEXT + "embeddings.position_embedding.weight",
    "ln_final.weight": TEXT + "final_layer_norm.weight",
    "ln_final.bias": TEXT + "final_layer_norm.bias",
}
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature, as real checkpoints carry it


class KeyLayoutError(ValueError):
    """A state dict whose keys are not a text encoder in any known layout."""


def under(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def detect_layout(sd: Mapping[str, Tensor], prefix: str) -> str | None:
    """'open_clip', 'hf' or None (nothing under `prefix` looks like a text encoder)."""
    keys = under(sd, prefix).keys()
    if "token_embedding.weight" in keys or any(k.startswith("transformer.resblocks.") for k in keys):
        return "open_clip"
    if any(k.startswith((TEXT + "embeddings.", "embeddings.", TEXT + "encoder.", "encoder.")) for k in keys):
        return "hf"
    return None


def from_hf_checkpoint(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """HF-layout text encoder under `prefix` → our layout, and the keys that were not understood."""
    out, unexpected = {}, []
    for key, value in under(sd, prefix).items():
        bare = key.removeprefix(TEXT)
        if bare.startswith(IGNORED_HF):
            continue
        if key == PROJECTION:
            out[PROJECTION] = value
        elif bare.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            out[TEXT + bare] = value
        else:
            unexpected.append(prefix + key)
    return out, unexpected


def from_open_clip(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """OpenCLIP-layout text encoder under `prefix` → our layout (q/k/v split out of the fused
    in-projection, projection transposed), and the keys that were not understood."""
    out, unexpected = {}, []
    for key, value in under(sd, prefix).items():
        if key.startswith(IGNORED_OPEN_CLIP):
            continue
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection":
            out[PROJECTION] = value.T.contiguous()
        elif key.startswith("transformer.resblocks."):
            converted = open_clip_block_key(key.removeprefix("transformer.resblocks."), value)
            if converted is None:
                unexpected.append(prefix + key)
            else:
                out.update(converted)
        else:
            unexpected.append(prefix + key)
    return out, unexpected


def open_clip_block_key(key: str, value: Tensor) -> dict[str, Tensor] | None:
    """One `N.<name>` entry of a residual block in our layout; None if the name is unknown."""
    index, _, name = key.partition(".")
    if not index.isdigit():
        return None
    layer = f"{TEXT}encoder.layers.{index}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[1]
        q, k, v = value.chunk(3, dim=0)
        return {f"{layer}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)}
    module, _, param = name.rpartition(".")
    if module in OPEN_CLIP_BLOCK and param in ("weight", "bias"):
        return {f"{layer}{OPEN_CLIP_BLOCK[module]}.{param}": value}
    return None


def text_encoder_state_dict(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The text encoder under `prefix`, in either checkpoint layout, converted to ours.

    Raises KeyLayoutError when nothing is there, or when keys under the prefix are not understood."""
    layout = detect_layout(sd, prefix)
    if layout is None:
        raise KeyLayoutError(f"no text encoder found under the key prefix {prefix!r}")
    convert = from_open_clip if layout == "open_clip" else from_hf_checkpoint
    out, unexpected = convert(sd, prefix)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else "")
        raise KeyLayoutError(f"{len(unexpected)} unexpected key(s) in the {layout} text encoder: {shown}")
    return out


def from_transformers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP text model's `state_dict()` → our layout: the `text_model.` level added where
    the model has none (CLIPTextModel in transformers 5), the derived `position_ids` buffer dropped."""
    out = {}
    for key, value in sd.items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key if key.startswith(TEXT) or key == PROJECTION else TEXT + key] = value
    return out


def to_hf_checkpoint(
    sd: Mapping[str, Tensor], prefix: str, *, with_position_ids: bool = False
) -> dict[str, Tensor]:
    """Our layout (or a transformers state dict) → the HF checkpoint layout under `prefix`
    (e.g. `cond_stage_model.transformer.`). Older SD1 checkpoints also carry the `position_ids` buffer."""
    out = {prefix + key: value for key, value in from_transformers(sd).items()}
    if with_position_ids:
        positions = out[prefix + TEXT + "embeddings.position_embedding.weight"].shape[0]
        out[prefix + TEXT + "embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def to_open_clip(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Our layout (or a transformers state dict) → the OpenCLIP layout under `prefix` (e.g.
    `conditioner.embedders.1.model.`), with q/k/v fused, the projection transposed, and the
    `logit_scale` real checkpoints carry."""
    top = {ours: theirs for theirs, ours in OPEN_CLIP_TOP.items()}
    block = {ours: theirs for theirs, ours in OPEN_CLIP_BLOCK.items()}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in from_transformers(sd).items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        if key == PROJECTION:
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        rest = key.removeprefix(TEXT + "encoder.layers.")
        if rest == key:
            raise KeyLayoutError(f"key {key!r} is not part of a CLIP text model")
        index, _, name = rest.partition(".")
        module, _, param = name.rpartition(".")
        if (
            module.startswith("self_attn.")
            and module[len("self_attn.")] in "qkv"
            and module.endswith("_proj")
        ):
            fused.setdefault(f"{index}.attn.in_proj_{param}", {})[module[len("self_attn.")]] = value
        elif module in block:
            out[f"{prefix}transformer.resblocks.{index}.{block[module]}.{param}"] = value
        else:
            raise KeyLayoutError(f"key {key!r} is not part of a CLIP text model")
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyLayoutError(f"layer {name}: q/k/v projections incomplete (have {sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{name}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
    out[prefix + "logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE)
    return out
