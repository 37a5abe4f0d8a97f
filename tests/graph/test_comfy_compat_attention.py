"""comfy.ldm.modules.attention.optimized_attention for packs (attn replace patches call it): the layouts, heads and
masks ComfyUI's function takes, against attention written out as softmax(q k^T / sqrt(d)) v."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_compat.comfy.ldm.modules.attention import optimized_attention


def explicit(q, k, v, heads, bias=None):
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, inner)


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, n, 24, generator=gen) for n in (5, 7, 7)]


def test_heads_and_layouts(qkv):
    q, k, v = qkv
    for heads in (1, 3, 4):
        torch.testing.assert_close(optimized_attention(q, k, v, heads), explicit(q, k, v, heads), atol=1e-5, rtol=1e-5)
    split = [t.reshape(2, -1, 3, 8).transpose(1, 2) for t in qkv]
    out = optimized_attention(*split, 3, skip_reshape=True, skip_output_reshape=True)
    assert out.shape == (2, 3, 5, 8)
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, 5, 24), explicit(q, k, v, 3), atol=1e-5, rtol=1e-5)


def test_masks_bias_the_scores(qkv):
    q, k, v = qkv
    bias = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(optimized_attention(q, k, v, 2, mask=bias), explicit(q, k, v, 2, bias),
                               atol=1e-5, rtol=1e-5)
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[:, 3:] = False  # a bool mask keeps the True keys: as if the others were not there
    torch.testing.assert_close(optimized_attention(q, k, v, 2, mask=keep),
                               explicit(q, k[:, :3], v[:, :3], 2), atol=1e-5, rtol=1e-5)
