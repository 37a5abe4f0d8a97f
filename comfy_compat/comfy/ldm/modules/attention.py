"""ComfyUI's `comfy.ldm.modules.attention` for packs: the attention functions attn replace patches call.

`optimized_attention(q, k, v, heads)` takes q, k, v as [B, tokens, heads * dim_head] (with `skip_reshape`:
[B, heads, tokens, dim_head]) and returns [B, tokens, heads * dim_head] (with `skip_output_reshape`: [B, heads,
tokens, dim_head]); `mask` is added to the scores (a bool mask keeps the True positions). One implementation,
PyTorch's scaled_dot_product_attention, stands behind every name. `BasicTransformerBlock` and `CrossAttention`
are our UNet's own classes (for isinstance checks on `model.model.diffusion_model`'s modules)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from comfy_compat.comfy._offered import not_offered
from diffusion.models.unet_blocks import BasicTransformerBlock, CrossAttention

__all__ = ["BasicTransformerBlock", "CrossAttention", "optimized_attention"]
_ATTN_PRECISION = None  # ComfyUI's global precision override: none here (attention runs in the model's dtype)


def optimized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        mask: torch.Tensor | None = None, attn_precision: Any = None, skip_reshape: bool = False,
                        skip_output_reshape: bool = False, **kwargs: Any) -> torch.Tensor:
    b = q.shape[0]
    if not skip_reshape:
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        mask = mask.to(q.device) if mask.dtype == torch.bool else mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1])


optimized_attention_masked = optimized_attention
attention_basic = optimized_attention
attention_pytorch = optimized_attention
attention_split = optimized_attention
attention_sub_quad = optimized_attention
attention_xformers = optimized_attention


def optimized_attention_for_device(device: Any = None, mask: bool = False, small_input: bool = False) -> Any:
    return optimized_attention


def __getattr__(name: str) -> Any:
    raise not_offered("comfy.ldm.modules.attention", name)
