"""Union ControlNets (xinsir's controlnet-union-sdxl-1.0 and its "promax" version): one SDXL ControlNet trained on
several kinds of hint, told per use which kind it is given.

On top of a ControlNet (models/controlnet.py) such a file has:
- `task_embedding` [types, C]: one learned vector per control type, C the UNet's base width;
- `control_add_embedding.linear_1/2`: an MLP from the one-hot control-type vector, each entry taken through the
  sinusoidal timestep embedding of SDXL's size-conditioning width (256), to the time embedding, which it joins;
- `transformer_layes.N` (sic, the files' name) with `ln_1`, `attn.in_proj_weight/bias`, `attn.out_proj`, `ln_2`,
  `mlp.c_fc`, `mlp.c_proj` (QuickGELU): a CLIP-style residual block over "task tokens";
- `spatial_ch_projs`: a linear map from the processed task token to a per-channel offset of the encoded hint.

The encoded hint's spatial mean plus the chosen type's task embedding is the task token; the block processes it and
`spatial_ch_projs` turns it into a per-channel shift added to the encoded hint before it joins the first input
block's output, as in diffusers' ControlNetUnionModel.

Attention over one token: the reference code runs its blocks' `nn.MultiheadAttention` on [B, tokens, C] tensors
with the default sequence-first layout, so attention runs across the *batch* axis; for one image (and for the
identical cond/uncond rows of a CFG batch) each token attends to itself alone, softmax is 1, and the attention
reduces to the value and output projections. We compute exactly that per image, so a result does not depend on
the other images in the batch, and it equals the reference for one image; the token of the latent's own features
that the reference appends never reaches the hint's token then, so it is not computed.

Control type "auto" (no type given): the hint is encoded as by a plain ControlNet and the type vector is all zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .controlnet import ControlNet, ControlNetConfig
from .unet_blocks import timestep_embedding

# The type indices of xinsir's model card (ComfyUI's SetUnionControlNetType lists them in this order after "auto");
# the first six are in every union file, "tile" and "repaint" only in promax (8 types).
UNION_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal",
               "segment", "tile", "repaint")
UNION_KEYS = ("task_embedding", "control_add_embedding.", "transformer_layes.", "spatial_ch_projs.")
_LAYER = re.compile(r"transformer_layes\.(\d+)\.")


@dataclass(frozen=True)
class UnionConfig:
    """How many control types the file knows, its task-token width, how many task blocks it has and the width of
    each type's sinusoidal embedding in `control_add_embedding`."""

    control_types: int = 8
    channels: int = 320
    layers: int = 1
    type_embed_dim: int = 256

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> UnionConfig:
        types, channels = (int(n) for n in sd["task_embedding"].shape)
        layers = len({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
        in_features = int(sd["control_add_embedding.linear_1.weight"].shape[1])
        if in_features % types:
            raise ValueError(f"union ControlNet: control_add_embedding takes {in_features} features, not a multiple "
                             f"of its {types} control types")
        return cls(types, channels, layers, in_features // types)


def is_union(sd: Mapping[str, Tensor]) -> bool:
    return "task_embedding" in sd


class _TokenAttention(nn.Module):
    """The reference's attention on a sequence of one token: value projection, then output projection (the query
    and key thirds of `in_proj_weight` are stored but have no effect; see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * channels))
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[-1]
        value = F.linear(x, self.in_proj_weight[2 * c:], self.in_proj_bias[2 * c:])
        return self.out_proj(value)


class _QuickGELUMLP(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.c_fc = nn.Linear(channels, 4 * channels)
        self.c_proj = nn.Linear(4 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))


class _TaskBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(channels)
        self.attn = _TokenAttention(channels)
        self.ln_2 = nn.LayerNorm(channels)
        self.mlp = _QuickGELUMLP(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _TypeEmbedding(nn.Module):
    """One-hot control types [B, types] -> an addition to the time embedding."""

    def __init__(self, union: UnionConfig, time_embed_dim: int):
        super().__init__()
        self.dim = union.type_embed_dim
        self.linear_1 = nn.Linear(union.control_types * union.type_embed_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, one_hot: Tensor, dtype: torch.dtype) -> Tensor:
        emb = timestep_embedding(one_hot.flatten(), self.dim).reshape(one_hot.shape[0], -1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class UnionControlNet(ControlNet):
    """A ControlNet whose forward takes `control_type`: an index into UNION_TYPES (below the file's number of
    types), or None for "auto"."""

    def __init__(self, config: ControlNetConfig, union: UnionConfig):
        super().__init__(config)
        if union.channels != config.unet.model_channels:
            raise ValueError(f"union ControlNet: task tokens of {union.channels} channels do not fit a hint "
                             f"encoded to {config.unet.model_channels}")
        self.union = union
        self.task_embedding = nn.Parameter(torch.empty(union.control_types, union.channels))
        self.control_add_embedding = _TypeEmbedding(union, config.unet.time_embed_dim)
        self.transformer_layes = nn.ModuleList(_TaskBlock(union.channels) for _ in range(union.layers))
        self.spatial_ch_projs = nn.Linear(union.channels, union.channels)

    def check_options(self, options: dict) -> None:
        unknown = set(options) - {"control_type"}
        if unknown:
            raise ValueError(f"a union ControlNet takes control_type only, got {sorted(unknown)}")
        index = options.get("control_type")
        if index is not None and not 0 <= int(index) < self.union.control_types:
            name = UNION_TYPES[index] if 0 <= index < len(UNION_TYPES) else str(index)
            raise ValueError(f"this union ControlNet knows {self.union.control_types} control types "
                             f"({', '.join(UNION_TYPES[:self.union.control_types])}), not {name!r}")

    def extra_embedding(self, emb: Tensor, control_type: int | None = None) -> Tensor:
        one_hot = torch.zeros(emb.shape[0], self.union.control_types, device=emb.device)
        if control_type is not None:
            one_hot[:, control_type] = 1.0
        return emb + self.control_add_embedding(one_hot, emb.dtype)

    def guided_hint(self, hint: Tensor, h: Tensor, control_type: int | None = None) -> Tensor:
        encoded = self.input_hint_block(hint)
        if control_type is None:
            return encoded
        token = encoded.mean(dim=(2, 3)) + self.task_embedding[control_type].to(encoded.dtype)
        for block in self.transformer_layes:
            token = block(token)
        return encoded + self.spatial_ch_projs(token)[:, :, None, None]
