"""ControlNet parameter names: diffusers' ControlNetModel layout <-> the original release's (ours).

The encoder copy shares the UNet's names (`conv_in`, `time_embedding`, `add_embedding`, `down_blocks`,
`mid_block` <-> `input_blocks`, `time_embed`, `label_emb`, `middle_block`; unet_keys.py's table); what is
ControlNet's own maps as:

- `controlnet_cond_embedding.conv_in` -> `input_hint_block.0`, `.blocks.k` -> `input_hint_block.{2k+2}`,
  `.conv_out` -> the last conv of `input_hint_block` (its index counts the SiLUs in between);
- `controlnet_down_blocks.i` -> `zero_convs.i.0`, `controlnet_mid_block` -> `middle_block_out.0`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..models.controlnet import ControlNet, ControlNetConfig
from .files import CheckpointError
from .part_files import diffusers_unet_to_original
from .unet_keys import diffusers_to_original_unet_keys

Tensor = torch.Tensor

_HINT = "controlnet_cond_embedding."
_DOWN = re.compile(r"controlnet_down_blocks\.(\d+)\.(.+)")
_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)")


def _own_key(key: str, hint_convs: int) -> str | None:
    """Our name for one of ControlNet's own diffusers keys; None for keys of the encoder copy."""
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block."):]
    if m := _DOWN.fullmatch(key):
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if key.startswith(_HINT + "conv_in."):
        return "input_hint_block.0." + key[len(_HINT + "conv_in."):]
    if key.startswith(_HINT + "conv_out."):
        return f"input_hint_block.{2 * (hint_convs - 1)}." + key[len(_HINT + "conv_out."):]
    if m := _BLOCK.fullmatch(key):
        return f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"
    return None


def _hint_conv_count(keys: list[str]) -> int:
    """conv_in + blocks + conv_out of the diffusers hint encoder."""
    blocks = {int(m.group(1)) for k in keys if (m := _BLOCK.fullmatch(k))}
    return len(blocks) + 2


def diffusers_to_original_controlnet_keys(config: ControlNetConfig) -> dict[str, str]:
    """Every diffusers ControlNetModel parameter name -> ours, for `config` (SDXL's ADM MLP is `add_embedding`)."""
    with torch.device("meta"):
        ours = set(ControlNet(config).state_dict())
    table = {theirs: mine for theirs, mine in diffusers_to_original_unet_keys(config.unet).items() if mine in ours}
    convs = len(config.hint_widths) * 2
    own = [f"controlnet_mid_block.{p}" for p in ("weight", "bias")]
    blocks = len(config.unet.channel_mult) * (config.unet.num_res_blocks + 1)  # conv_in, ResBlocks, downsamplers
    own += [f"controlnet_down_blocks.{i}.{p}" for i in range(blocks) for p in ("weight", "bias")]
    own += [f"{_HINT}{name}.{p}" for name in ("conv_in", "conv_out", *(f"blocks.{k}" for k in range(convs - 2)))
            for p in ("weight", "bias")]
    for key in own:
        mine = _own_key(key, convs)
        if mine in ours:
            table[key] = mine
    missing = ours - set(table.values())
    if missing:
        raise AssertionError(f"ControlNet parameters without a diffusers name: {sorted(missing)[:6]}")
    return table


def original_to_diffusers(sd: Mapping[str, Tensor], config: ControlNetConfig) -> dict[str, Tensor]:
    """Our state dict renamed to diffusers' ControlNetModel layout (for writing diffusers-layout files)."""
    names = {mine: theirs for theirs, mine in diffusers_to_original_controlnet_keys(config).items()}
    unknown = sorted(set(sd) - names.keys())
    if unknown:
        raise CheckpointError(f"{len(unknown)} ControlNet keys have no diffusers name, e.g. {unknown[:4]}")
    return {names[k]: v for k, v in sd.items()}


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ControlNetModel state dict renamed to ours, the block structure read from the keys."""
    keys = list(sd)
    convs = _hint_conv_count(keys)
    out: dict[str, Tensor] = {}
    encoder: dict[str, Tensor] = {}
    for key, value in sd.items():
        mine = _own_key(key, convs)
        if mine is not None:
            out[mine] = value
        elif key.startswith(("controlnet_", _HINT)):
            raise CheckpointError(f"diffusers ControlNet key {key!r} has no original name")
        else:
            encoder[key] = value
    out.update(diffusers_unet_to_original(encoder))
    return out
