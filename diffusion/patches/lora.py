"""LoRA files → weight patches for the UNet and the text encoders.

A LoRA file names each target layer in one of several spellings:

- kohya / A1111: `lora_unet_<diffusers module path, dots as underscores>` (or the original LDM path,
  `lora_unet_input_blocks_1_1_proj_in`), `lora_te_…` (SD1/SD2's encoder), `lora_te1_…`/`lora_te2_…` (SDXL's
  CLIP-L and bigG), each with `.lora_up.weight`, `.lora_down.weight`, `.alpha` and, for LoCon with a Tucker
  core, `.lora_mid.weight`; LyCORIS full differences as `.diff` / `.diff_b`;
- diffusers / PEFT: `unet.<diffusers path>` / `text_encoder.…` / `text_encoder_2.…` with `.lora.up/down.weight`,
  `.lora_linear_layer.up/down.weight` or `.lora_B/lora_A.weight`, and the older attention-processor form
  `….processor.to_q_lora.up.weight`.

Underscores in module names make the kohya spelling ambiguous to parse, so nothing is parsed: for every layer
of our model every spelling is generated, and the file's keys are looked up in that table.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints.unet_keys import diffusers_to_original_unet_keys
from ..models.unet import UNetConfig
from .patcher import LoraDelta, Patch, WeightDiff

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# What a key ends with → which part of a layer's patch it holds. Longest first, so no suffix shadows another.
PARTS = {
    ".lora_linear_layer.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_mid.weight": "mid",
    ".lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.weight": "down",
    ".diff_b": "diff_b",
    ".alpha": "alpha",
    ".diff": "diff",
}
PEFT_WRAPPER = "base_model.model."
# How keys addressed to one part of a checkpoint begin (kohya, diffusers/PEFT, original LDM spellings).
UNET_PREFIXES = ("lora_unet_", "unet.", "diffusion_model.")
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
# Old diffusers attention processors: `attn1.processor.to_q_lora.up.weight` patches `attn1.to_q`.
PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA's tensors: from a `.safetensors` file, a pickle-free torch file (`.pt`, `.pth`, `.bin`, `.ckpt`,
    read with weights_only=True) or a state dict."""
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoRA file not found: {path}")
        try:
            if path.endswith(".safetensors"):
                sd = load_file(path, device="cpu")
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read LoRA file {path}: {e}") from e
        if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
            sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"LoRA holds a {type(sd).__name__}, not a dict of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"LoRA entries that are not tensors: {bad[:5]}")
    return dict(sd)


def _split(key: str) -> tuple[str, str] | None:
    """A file key → (layer name as spelled in the file, part), or None for a key of no known form."""
    key = key.removeprefix(PEFT_WRAPPER)
    match = PROCESSOR.search(key)
    if match:
        target = "to_out.0" if match.group(1) == "to_out" else match.group(1)
        return f"{key[: match.start()]}.{target}", match.group(2)
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _group(lora: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, tuple[str, Tensor]]], list[str]]:
    """Keys grouped by layer: {layer: {part: (file key, tensor)}}, plus keys of no known form."""
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unknown = []
    for key, value in lora.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = (key, value)
    return groups, unknown


def _patches_for_layer(layer: str, parts: dict[str, tuple[str, Tensor]]) -> dict[str, Patch]:
    """{"weight" or "bias": patch} for one layer's parts."""
    out: dict[str, Patch] = {}
    if "up" in parts or "down" in parts:
        if "up" not in parts or "down" not in parts:
            have = "up" if "up" in parts else "down"
            raise ValueError(f"LoRA layer {layer!r} has a {have} matrix but not its counterpart")
        alpha = parts.get("alpha")
        mid = parts.get("mid")
        out["weight"] = LoraDelta(
            up=parts["up"][1],
            down=parts["down"][1],
            alpha=None if alpha is None else float(alpha[1].float().item()),
            mid=None if mid is None else mid[1],
        )
    elif "diff" in parts:
        out["weight"] = WeightDiff(parts["diff"][1])
    if "diff_b" in parts:
        out["bias"] = WeightDiff(parts["diff_b"][1])
    return out


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _add_alias(table: dict[str, str], alias: str, module: str) -> None:
    """Two layers with one spelling would make a file ambiguous; our layouts have none, and this keeps it so."""
    if table.setdefault(alias, module) != module:
        raise ValueError(f"LoRA name {alias!r} would mean both {table[alias]!r} and {module!r}")


def _modules(param_names: Iterable[str]) -> set[str]:
    return {name.rsplit(".", 1)[0] for name in param_names if name.endswith((".weight", ".bias"))}


def unet_aliases(config: UNetConfig, param_names: Iterable[str]) -> dict[str, str]:
    """Every spelling a LoRA may use for a UNet layer → our module path (a prefix of our parameter names)."""
    modules = _modules(param_names)
    table: dict[str, str] = {}
    for module in sorted(modules):
        _add_alias(table, "lora_unet_" + _underscored(module), module)
        _add_alias(table, "diffusion_model." + module, module)
    for theirs, ours in diffusers_to_original_unet_keys(config).items():
        module, theirs_module = ours.rsplit(".", 1)[0], theirs.rsplit(".", 1)[0]
        if module in modules:
            for alias in ("lora_unet_" + _underscored(theirs_module), "unet." + theirs_module, theirs_module):
                _add_alias(table, alias, module)
    return table


def kohya_unet_names(config: UNetConfig, param_names: Iterable[str]) -> dict[str, str]:
    """Our module path → its kohya name in the diffusers spelling, the one other tools read most widely."""
    modules = _modules(param_names)
    names = {}
    for theirs, ours in diffusers_to_original_unet_keys(config).items():
        module = ours.rsplit(".", 1)[0]
        if module in modules:
            names[module] = "lora_unet_" + _underscored(theirs.rsplit(".", 1)[0])
    return names


def _text_prefixes(names: list[str]) -> dict[str, tuple[str, str]]:
    """Encoder name → (kohya prefix, diffusers prefix): one encoder is `te`, two are `te1`/`te2` in order."""
    if len(names) == 1:
        return {names[0]: ("lora_te_", "text_encoder.")}
    if len(names) == 2:
        return {names[0]: ("lora_te1_", "text_encoder."), names[1]: ("lora_te2_", "text_encoder_2.")}
    raise ValueError(f"LoRA text keys are defined for one or two text encoders, not {len(names)}: {names}")


def _text_models(text_encoders: object) -> dict[str, nn.Module]:
    """Encoder name → its text model (our CLIP text transformer, or a transformers CLIPTextModel a caller passes),
    from a `TextEncoders`, a mapping of `ClipTextEncoder`s or of models."""
    encoders = getattr(text_encoders, "encoders", text_encoders)
    if not isinstance(encoders, Mapping):
        raise TypeError(f"expected text encoders or a mapping of them, got {type(text_encoders).__name__}")
    return {name: getattr(enc, "model", enc) for name, enc in encoders.items()}


def _text_modules(model: nn.Module) -> dict[str, str]:
    """Module path in `model` → the path LoRA files spell, which is transformers 4's CLIPTextModel layout:
    everything under `text_model.` except the projection, as in our CLIP text model. transformers 5's CLIPTextModel
    has no such level, so it is added for it."""
    nested = hasattr(model, "text_model")
    return {
        module: module if nested or module == "text_projection" else "text_model." + module
        for module in sorted(_modules(n for n, _ in model.named_parameters()))
    }


def text_aliases(text_encoders: object) -> dict[str, tuple[str, str]]:
    """Every spelling a LoRA may use for a text-encoder layer → (encoder name, module path)."""
    models = _text_models(text_encoders)
    table: dict[str, tuple[str, str]] = {}
    for name, (kohya, diffusers) in _text_prefixes(list(models)).items():
        for module, spelled in _text_modules(models[name]).items():
            for alias in (kohya + _underscored(spelled), diffusers + spelled):
                if table.setdefault(alias, (name, module)) != (name, module):
                    raise ValueError(f"LoRA name {alias!r} would mean two text-encoder layers")
    return table


def kohya_text_names(text_encoders: object) -> dict[str, dict[str, str]]:
    """Encoder name → {module path in that encoder's model → kohya name}."""
    models = _text_models(text_encoders)
    names = {}
    for name, (kohya, _) in _text_prefixes(list(models)).items():
        names[name] = {module: kohya + _underscored(spelled) for module, spelled in _text_modules(models[name]).items()}
    return names


def _match(
    lora: Mapping[str, Tensor], table: Mapping[str, object]
) -> tuple[list[tuple[object, dict[str, Patch]]], list[str]]:
    """[(table value, {"weight"/"bias": patch})] for the layers found in `table`, and the file keys not found."""
    groups, unmatched = _group(lora)
    found = []
    for layer, parts in groups.items():
        target = table.get(layer)
        if target is None:
            unmatched.extend(key for key, _ in parts.values())
        else:
            found.append((target, _patches_for_layer(layer, parts)))
    return found, sorted(unmatched)


def lora_patches_for_unet(
    lora: Mapping[str, Tensor], unet_config: UNetConfig, unet_param_names: Iterable[str]
) -> tuple[dict[str, Patch], list[str]]:
    """({our parameter name: patch}, the file keys that name no UNet layer — text-encoder keys included)."""
    names = list(unet_param_names)
    found, unmatched = _match(lora, unet_aliases(config=unet_config, param_names=names))
    present = set(names)
    patches: dict[str, Patch] = {}
    for module, by_param in found:
        for param, patch in by_param.items():
            if f"{module}.{param}" in present:
                patches[f"{module}.{param}"] = patch
    return patches, unmatched


def lora_patches_for_text(
    lora: Mapping[str, Tensor], text_encoders: object
) -> tuple[dict[str, dict[str, Patch]], list[str]]:
    """({encoder name: {parameter name in that encoder's model: patch}}, the file keys that name no
    text-encoder layer). Encoders are a `TextEncoders`, or a mapping of name → `ClipTextEncoder` or model; one
    encoder takes `lora_te_` / `text_encoder.` keys, two take `lora_te1_`/`lora_te2_` and `text_encoder.` /
    `text_encoder_2.` in their order (SDXL: CLIP-L, then bigG)."""
    found, unmatched = _match(lora, text_aliases(text_encoders))
    patches: dict[str, dict[str, Patch]] = {name: {} for name in _text_models(text_encoders)}
    for (encoder, module), by_param in found:
        for param, patch in by_param.items():
            patches[encoder][f"{module}.{param}"] = patch
    return patches, unmatched


@dataclass
class LoraPatches:
    unet: dict[str, Patch]
    text: dict[str, dict[str, Patch]]
    unmatched: list[str]  # file keys that name no layer of the UNet or of any text encoder


def lora_patches(
    lora: Mapping[str, Tensor],
    *,
    unet_config: UNetConfig | None = None,
    unet_param_names: Iterable[str] = (),
    text_encoders: object | None = None,
    name: str = "LoRA",
) -> LoraPatches:
    """Patches for whichever of the UNet and the text encoders are given; keys that match neither are
    reported once, by count with a few examples. A key spelled for a part that is not given (a `lora_te_` key
    when only the UNet is patched, as LoraLoaderModelOnly does) is for a module that exists elsewhere, not a
    mismatch, so it is neither patched nor reported."""
    unet, text = {}, {}
    unmatched = set(lora)
    if unet_config is not None:
        unet, missed = lora_patches_for_unet(lora, unet_config, unet_param_names)
        unmatched &= set(missed)
    else:
        unmatched = {key for key in unmatched if not key.removeprefix(PEFT_WRAPPER).startswith(UNET_PREFIXES)}
    if text_encoders is not None:
        text, missed = lora_patches_for_text(lora, text_encoders)
        unmatched &= set(missed)
    else:
        unmatched = {key for key in unmatched if not key.removeprefix(PEFT_WRAPPER).startswith(TEXT_PREFIXES)}
    if unmatched:
        examples = ", ".join(sorted(unmatched)[:3])
        log.warning("%s: %d keys matched nothing (e.g. %s)", name, len(unmatched), examples)
    return LoraPatches(unet, text, sorted(unmatched))


def save_lora(path: str | os.PathLike, layers: Mapping[str, Patch], metadata: Mapping[str, str] | None = None) -> None:
    """Write patches keyed by kohya layer name (see `kohya_unet_names`, `kohya_text_names`) as a kohya
    `.safetensors` LoRA: `.lora_up.weight`, `.lora_down.weight`, `.alpha` (when set), `.lora_mid.weight`,
    or `.diff` for full differences."""
    tensors: dict[str, Tensor] = {}
    for layer, patch in layers.items():
        if isinstance(patch, LoraDelta):
            tensors[f"{layer}.lora_up.weight"] = patch.up.contiguous()
            tensors[f"{layer}.lora_down.weight"] = patch.down.contiguous()
            if patch.alpha is not None:
                tensors[f"{layer}.alpha"] = torch.tensor(float(patch.alpha))
            if patch.mid is not None:
                tensors[f"{layer}.lora_mid.weight"] = patch.mid.contiguous()
        elif isinstance(patch, WeightDiff):
            tensors[f"{layer}.diff"] = patch.diff.contiguous()
        else:
            raise TypeError(f"cannot save a {type(patch).__name__} for {layer!r}")
    save_file(tensors, os.fspath(path), metadata=dict(metadata) if metadata else None)
