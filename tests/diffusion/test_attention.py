"""Attention within a memory budget (diffusion/models/attention.py): which inputs take SDPA's fused kernels, the
query chunks the math path is split into (chunked == unchunked within float tolerance), the chunk an SDXL
2048x2048 attention gets under a budget, the budget the model manager sets around a model call, and the VAE
estimate that counts no scores where the fused kernel runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion.memory import ModelManager
from diffusion.models import attention as attention_module
from diffusion.models.attention import (
    MATH_SCORE_BYTES,
    MIN_CHUNK,
    attention,
    attention_budget,
    chunks_needed,
    current_budget,
    fused_path,
    query_chunk,
    scores_bytes,
)
from diffusion.models.vae import VAEConfig
from nodes.estimates import vae_decode_elements


def qkv(b=2, heads=3, n=300, m=200, d=16, transposed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # [B, heads, d, N] storage seen as [B, heads, N, d]: the last dimension is not contiguous
        q = torch.randn(b, heads, d, n, generator=gen).transpose(-1, -2)
        k = torch.randn(b, heads, d, m, generator=gen).transpose(-1, -2)
        v = torch.randn(b, heads, d, m, generator=gen).transpose(-1, -2)
    else:
        q = torch.randn(b, heads, n, d, generator=gen)
        k, v = torch.randn(b, heads, m, d, generator=gen), torch.randn(b, heads, m, d, generator=gen)
    return q, k, v


def test_fused_path_needs_contiguous_rows_and_one_head_size():
    assert fused_path(*qkv())
    assert not fused_path(*qkv(transposed=True))
    q, k, v = qkv()
    assert not fused_path(q, k, v[..., :8])
    assert not fused_path(q[0], k[0], v[0])  # 3-D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_equals_unchunked(monkeypatch, dtype):
    q, k, v = (t.to(dtype) for t in qkv(transposed=True))
    expected = F.scaled_dot_product_attention(q, k, v)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    per_query = 2 * 3 * 200 * MATH_SCORE_BYTES
    got = attention(q, k, v, budget=per_query * 100)  # 100 queries' scores fit: three calls of 100
    assert calls == [100, 100, 100]
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    calls.clear()
    with attention_budget(per_query * 1000):  # everything fits: one call
        attention(q, k, v)
    assert calls == [300]
    calls.clear()
    attention(*qkv(), budget=1)  # the fused kernel holds no scores: never split
    assert calls == [300]


def test_chunks_never_drop_below_the_minimum_or_exceed_the_queries():
    assert query_chunk(1, 1, 10, 10, budget=1) == 10  # fewer queries than MIN_CHUNK: all at once
    assert query_chunk(1, 1, 1000, 1000, budget=1) == MIN_CHUNK
    assert query_chunk(1, 1, 1000, 1000, budget=None) == 1000
    assert chunks_needed(1, 1, 1000, 1000, budget=1) == 1000 // MIN_CHUNK + 1


def test_sdxl_2048_attention_under_a_budget_gets_chunks_that_fit():
    # SDXL's first attention level at 2048x2048: a 128x128 map, 16384 tokens, 10 heads; cond and uncond together
    n, budget = 128 * 128, 4 * 2**30
    whole = scores_bytes(2, 10, n, n, None, fused=False)
    assert whole > 40 * 2**30  # the math path's scores unsplit: about 60 GB
    chunk = query_chunk(2, 10, n, n, budget)
    assert MIN_CHUNK <= chunk < n
    assert scores_bytes(2, 10, n, n, budget, fused=False) <= budget
    assert chunks_needed(2, 10, n, n, budget) == -(-n // chunk) > 10
    assert scores_bytes(2, 10, n, n, budget, fused=True) == 0


def test_vae_estimate_counts_scores_only_off_the_fused_path_and_within_the_budget():
    config, side = VAEConfig(), 2048 // 8  # SDXL's VAE is SD's
    cpu, mps, budgeted, row_by_row = (vae_decode_elements(config, side, side, 2, device, budget) * 2  # bytes
                                      for device, budget in (("cpu", None), ("mps", None), ("mps", 2 * 2**30),
                                                             ("mps", 1)))
    assert mps - cpu > 20 * 2**30  # 65536^2 scores unsplit
    # at most one chunk's scores on top of the same pass with one query row at a time (here: under other peaks;
    # MPS's norms hold float32 copies, the CPU's do not, so the CPU is no baseline for MPS)
    assert cpu <= row_by_row <= budgeted <= row_by_row + 2 * 2**30 < mps


def test_the_model_manager_sets_the_budget_around_a_call(monkeypatch):
    manager = ModelManager("cpu", memory_probe=lambda: 10_000, reserve_bytes=1_000)
    assert manager.working_memory() == 9_000 * 4 // 5
    assert current_budget() is None
    with attention_budget(manager.working_memory()):
        assert current_budget() == 7_200
        with attention_budget(None):
            assert current_budget() is None
        assert current_budget() == 7_200
    assert current_budget() is None
