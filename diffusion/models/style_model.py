"""The T2I-Adapter style model (TencentARC's `StyleAdapter`): CLIP vision's last hidden state → extra tokens
appended to the text conditioning, so the UNet's cross-attention also attends to the reference image's style.

A small transformer: `num_token` learned style tokens are appended to the image's hidden states, the whole
sequence goes through `ln_pre`, a few OpenAI-CLIP residual attention blocks (`ln_1`, fused-projection
multi-head attention, `ln_2`, a quick-GELU MLP `c_fc`/`c_proj`), and the style tokens come out through
`ln_post` and `proj` (x @ proj, to the UNet's context width). Attribute names equal the file's keys
(`style_embedding`, `ln_pre.*`, `transformer_layes.N.*` as the original spells it, `ln_post.*`, `proj`). The
released file (t2iadapter_style_sd14v1) is 1024 wide (CLIP ViT-L's hidden width), 3 blocks of 8 heads, 8
tokens, 768-wide output (SD1's context); heads are not in the shapes, so tiny test files carry them in
`latentloom.config` metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoints.files import CheckpointError, key_prefixes, read_metadata, read_state_dict, write_safetensors
from ..checkpoints.random_checkpoints import random_tensor

log = logging.getLogger(__name__)

Tensor = torch.Tensor
CONFIG_METADATA_KEY = "latentloom.config"


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation x·σ(1.702x), which the style adapter's blocks use."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); sequences are [N, L, D]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class StyleAdapterConfig:
    width: int = 1024
    context_dim: int = 768
    num_heads: int = 8
    num_layers: int = 3
    num_tokens: int = 8


class StyleAdapter(nn.Module):
    """forward(last_hidden_state [N, T, width]) → style tokens [N, num_tokens, context_dim]."""

    def __init__(self, config: StyleAdapterConfig):
        super().__init__()
        c = config
        self.config = c
        self.style_embedding = nn.Parameter(torch.empty(1, c.num_tokens, c.width))
        self.ln_pre = nn.LayerNorm(c.width)
        self.transformer_layes = nn.Sequential(*[ResidualAttentionBlock(c.width, c.num_heads)
                                                 for _ in range(c.num_layers)])
        self.ln_post = nn.LayerNorm(c.width)
        self.proj = nn.Parameter(torch.empty(c.width, c.context_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.width:
            raise ValueError(f"the style model takes CLIP vision hidden states [N, tokens, {self.config.width}], got "
                             f"{list(x.shape)} (use the CLIP vision model it was trained with: ViT-L/14)")
        x = x.to(self.proj.dtype)
        x = torch.cat([x, self.style_embedding.expand(x.shape[0], -1, -1)], dim=1)
        x = self.transformer_layes(self.ln_pre(x))
        return self.ln_post(x[:, -self.config.num_tokens:]) @ self.proj


def config_from_state_dict(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> StyleAdapterConfig:
    if "style_embedding" not in sd or "proj" not in sd:
        shown = dict(sorted(key_prefixes(sd).items(), key=lambda kv: -kv[1])[:8])
        hint = ""
        if any(k.startswith(("redux_up", "redux_down")) for k in sd):
            hint = " (a Flux Redux model: not supported)"
        elif any(k.startswith("model.diffusion_model.") for k in sd):
            hint = " (a Stable Diffusion checkpoint)"
        raise CheckpointError(f"not a T2I-Adapter style model: found {len(sd)} keys with prefixes {shown}; expected "
                              f"style_embedding, ln_pre, transformer_layes.N, ln_post and proj{hint}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_layes\.(\d+)\.", k))}
    raw = (metadata or {}).get(CONFIG_METADATA_KEY)
    heads = (json.loads(raw).get("style_model", {}).get("num_heads") if raw else None) or 8
    embedding = sd["style_embedding"]
    return StyleAdapterConfig(width=int(embedding.shape[-1]), context_dim=int(sd["proj"].shape[1]),
                              num_heads=int(heads), num_layers=max(layers) + 1 if layers else 0,
                              num_tokens=int(embedding.shape[1]))


def load_style_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> StyleAdapter:
    """A style model file (`models/style_models`, .safetensors or the released .pth) through the safe readers,
    built on the meta device and filled by assignment."""
    sd = read_state_dict(path)
    try:
        config = config_from_state_dict(sd, read_metadata(path))
        if config.width % config.num_heads:
            raise CheckpointError(f"width {config.width} does not split into {config.num_heads} heads")
        with torch.device("meta"):
            model = StyleAdapter(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = sorted(set(expected) ^ set(sd)) + [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
        if wrong:
            raise CheckpointError(f"style model weights do not fit the detected shape ({config}): {wrong[:6]}")
    except (CheckpointError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    cast = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    log.info("loaded %s: style model, %d tokens of %d", path, config.num_tokens, config.context_dim)
    return model.eval().requires_grad_(False)


@dataclass
class StyleModel:
    """STYLE_MODEL: a style adapter run through the model manager (`manager.use` of its patcher)."""

    patcher: Any  # ModelPatcher
    manager: Any  # ModelManager

    @torch.no_grad()
    def get_cond(self, last_hidden_state: Tensor) -> Tensor:
        """Style tokens [N, num_tokens, context_dim] (CPU, fp32) of CLIP vision hidden states [N, T, width]."""
        with self.manager.use([self.patcher]) as (model,):
            return model(last_hidden_state.to(self.manager.device)).float().cpu()


def write_random_style_model(path: str | os.PathLike, config: StyleAdapterConfig = StyleAdapterConfig(32, 16, 2, 2, 4),
                             *, seed: int = 0, dtype: torch.dtype = torch.float32) -> StyleAdapterConfig:
    """A random style model in the released key layout (tiny by default: 32 wide to take the tiny CLIP vision's
    hidden states, 16-wide tokens for the tiny SD1 context)."""
    with torch.device("meta"):
        layout = StyleAdapter(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: (dtype, tuple(layout[k].shape)) for k in sorted(layout)}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps({"style_model": {"num_heads": config.num_heads}})}
    write_safetensors(path, shapes, lambda k: random_tensor(k, shapes[k][1], gen).to(dtype), metadata)
    return config
