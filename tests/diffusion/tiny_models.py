"""Tiny UNets and CLIP text models with seeded random weights, for the LoRA, patcher and memory tests."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion.models.unet import UNetConfig, UNetModel
from tests.diffusion.random_weights import randomize_

TINY_SD1 = UNetConfig(
    model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), context_dim=32, num_heads=2, norm_groups=8,
    num_res_blocks=1,
)
TINY_SDXL = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1), transformer_depth_middle=1,
    context_dim=48, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=40,
    norm_groups=8, num_res_blocks=1,
)


def tiny_unet(config: UNetConfig, seed: int = 0) -> UNetModel:
    return randomize_(UNetModel(config), seed).eval().requires_grad_(False)


def tiny_clip(seed: int, hidden: int = 32, projection: int | None = None, layers: int = 2):
    """A transformers CLIP text model (with a text projection when `projection` is given)."""
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=998, eos_token_id=999, pad_token_id=999, attn_implementation="sdpa",
    )
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    return randomize_(model, seed).eval().requires_grad_(False)


def unet_inputs(config: UNetConfig, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 5, config.context_dim, generator=gen)
    t = torch.tensor([321.0])
    if config.adm_in_channels is None:
        return x, t, context
    return x, t, context, torch.randn(1, config.adm_in_channels, generator=gen)


def clip_ids(seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 998, (1, 9), generator=gen)
    return torch.cat([torch.tensor([[998]]), ids, torch.tensor([[999]])], dim=1)
