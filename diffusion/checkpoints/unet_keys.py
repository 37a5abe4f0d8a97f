"""Parameter names of diffusers' UNet2DConditionModel mapped to ours (the original LDM/SGM layout).

LoRA files in the kohya format name their targets after diffusers modules (`lora_unet_down_blocks_1_...`),
so applying them to our UNet needs this table.
"""

from __future__ import annotations

import torch

from ..models.unet import UNetConfig, UNetModel

# Inside a ResBlock (ours) / ResnetBlock2D (diffusers) only the layer names differ.
_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _module_prefixes(config: UNetConfig, adm_embedding: str) -> dict[str, str]:
    """Our module path -> diffusers module path, for every block of the UNet."""
    table = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": f"{adm_embedding}.linear_1",
        "label_emb.0.2": f"{adm_embedding}.linear_2",
        "input_blocks.0.0": "conv_in",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    levels = len(config.channel_mult)
    n = config.num_res_blocks
    block = 1
    for level in range(levels):
        for j in range(n):
            table[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            table[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level != levels - 1:
            table[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    # diffusers numbers up blocks from the deepest level; each has n + 1 ResBlocks.
    for up, level in enumerate(reversed(range(levels))):
        has_attention = config.transformer_depth[level] > 0
        for j in range(n + 1):
            block = up * (n + 1) + j
            table[f"output_blocks.{block}.0"] = f"up_blocks.{up}.resnets.{j}"
            if has_attention:
                table[f"output_blocks.{block}.1"] = f"up_blocks.{up}.attentions.{j}"
            if level > 0 and j == n:
                upsample = 2 if has_attention else 1
                table[f"output_blocks.{block}.{upsample}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
    return table


def _to_diffusers(key: str, table: dict[str, str]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        ours = ".".join(parts[:cut])
        if ours in table:
            theirs, rest = table[ours], ".".join(parts[cut:])
            if ".resnets." in theirs:
                for old, new in _RESNET_NAMES.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
            return f"{theirs}.{rest}"
    raise ValueError(f"no diffusers name known for UNet parameter {key!r}")


def diffusers_to_original_unet_keys(
    config: UNetConfig, *, adm_embedding: str = "add_embedding"
) -> dict[str, str]:
    """Every diffusers UNet2DConditionModel parameter name -> our parameter name, for `config`.

    The ADM MLP (`label_emb.0`) is diffusers' `add_embedding` for SDXL ("text_time" addition) and
    `class_embedding` for SD2 unCLIP-style models; pass `adm_embedding` to choose."""
    if adm_embedding not in ("add_embedding", "class_embedding"):
        raise ValueError(f"adm_embedding must be 'add_embedding' or 'class_embedding', got {adm_embedding!r}")
    with torch.device("meta"):
        ours = UNetModel(config).state_dict().keys()
    table = _module_prefixes(config, adm_embedding)
    return {_to_diffusers(key, table): key for key in ours}
