"""Attention that fits a memory budget: SDPA, split along the queries when its score matrix would not fit.

`F.scaled_dot_product_attention` has fused kernels (flash on the CPU; flash and memory-efficient on CUDA) that work
in blocks and never hold the N x M score matrix. They take q, k and v whose last dimension is contiguous. Otherwise
(a transposed layout, another device such as MPS, a head size a CUDA kernel lacks) SDPA takes its math path,
which materialises the scores and their softmax: about 9-12 bytes a score on this CPU (measured: 3.2 GB for
one SD1 512x512 self-attention with cond and uncond; an SDXL 2048x2048 one would need 48 GB, a 2048x2048 VAE
decode's mid-block attention 51 GB). There the queries are split into chunks sized so each chunk's scores fit the
budget: the model manager's free memory, set with `attention_budget` around a model call. Each query row's
softmax is over all keys whatever the chunking, so chunked = unchunked up to the kernels' float rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

# Bytes a score costs on SDPA's math path (the scores, their softmax and dtype copies); measured on the CPU with
# bench/attention.py: 9.5 (bf16, 10 heads) to 12 (bf16, one 512-wide head).
MATH_SCORE_BYTES = 12
FUSED_DEVICES = ("cpu", "cuda")
MIN_CHUNK = 64  # fewer queries per call costs more in call overhead than it saves

_BUDGET: ContextVar[int | None] = ContextVar("latentloom_attention_budget", default=None)


@contextlib.contextmanager
def attention_budget(nbytes: int | None) -> Iterator[None]:
    """Within the block, attentions on the math path keep their scores under `nbytes` (None: no limit)."""
    token = _BUDGET.set(None if nbytes is None else max(0, int(nbytes)))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current_budget() -> int | None:
    return _BUDGET.get()


# An additive bias [B, M] on the logits of the M keys of the cross-attention running now (a conditioning's
# attention_bias: patches/context_bias.py sets it around each cross-attention of a UNet call that has one).
_KEY_BIAS: ContextVar[Tensor | None] = ContextVar("latentloom_key_bias", default=None)


@contextlib.contextmanager
def key_bias(bias: Tensor | None) -> Iterator[None]:
    """Within the block, a cross-attention adds `bias` [B, M] to the attention logits of its M keys."""
    token = _KEY_BIAS.set(bias)
    try:
        yield
    finally:
        _KEY_BIAS.reset(token)


def current_key_bias() -> Tensor | None:
    return _KEY_BIAS.get()


def fused_path(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether SDPA's fused kernels take these [B, heads, N, d] inputs: a CPU or CUDA device, 4-D, every last
    dimension contiguous, one head size (on CUDA also what torch says its flash or memory-efficient kernel takes)."""
    if q.device.type not in FUSED_DEVICES or not q.ndim == k.ndim == v.ndim == 4:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        return False
    if q.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
        return bool(torch.backends.cuda.can_use_flash_attention(params)
                    or torch.backends.cuda.can_use_efficient_attention(params))
    return True


def query_chunk(batch: int, heads: int, queries: int, keys: int, budget: int | None,
                score_bytes: int = MATH_SCORE_BYTES) -> int:
    """Queries per SDPA call on the math path so that one call's scores fit `budget` bytes: all of them when
    they fit (or there is no budget), else as many as fit, at least MIN_CHUNK (or all, if fewer)."""
    per_query = max(1, batch * heads * keys * score_bytes)
    if budget is None or per_query * queries <= budget:
        return queries
    return min(queries, max(MIN_CHUNK, budget // per_query))


def scores_bytes(batch: int, heads: int, queries: int, keys: int, budget: int | None, fused: bool,
                 score_bytes: int = MATH_SCORE_BYTES) -> int:
    """Peak bytes of score matrices one `attention` call holds: none on the fused path, else one chunk's."""
    if fused:
        return 0
    return batch * heads * keys * score_bytes * query_chunk(batch, heads, queries, keys, budget, score_bytes)


def attention(q: Tensor, k: Tensor, v: Tensor, budget: int | None = None, bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over [B, heads, N, d] inputs, as F.scaled_dot_product_attention; on the
    math path split along the queries to keep the scores under `budget` (default: `attention_budget`'s). `bias`
    (optional, [B, 1, 1, M], -inf allowed where a row keeps a finite key) biases every query's logit of each key;
    SDPA's fused CPU kernels take no bias, so a biased call counts as the math path."""
    if torch.compiler.is_compiling():  # compiled graphs run on CPUs and CUDA, where the fused kernels are; and
        return F.scaled_dot_product_attention(q, k, v)  # torch.compile cannot trace ContextVar.get
    budget = current_budget() if budget is None else budget
    if budget is None or (bias is None and fused_path(q, k, v)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    b, heads, n, _ = q.shape
    chunk = query_chunk(b, heads, n, k.shape[-2], budget)
    if chunk >= n:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    parts = [F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v, attn_mask=bias) for i in range(0, n, chunk)]
    return torch.cat(parts, dim=2)


def chunks_needed(batch: int, heads: int, queries: int, keys: int, budget: int | None) -> int:
    """How many SDPA calls the math path makes for these sizes under `budget`."""
    return math.ceil(queries / query_chunk(batch, heads, queries, keys, budget))
