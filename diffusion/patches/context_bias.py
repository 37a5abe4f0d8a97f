"""An additive attention bias over a conditioning's context tokens, in every cross-attention of the UNet.

ComfyUI's StyleModelApply with strength_type "attn_bias" appends a style model's tokens to the text context and,
instead of scaling those tokens, biases their attention logits by log(strength): strength 0 removes them (the bias
is -inf: they get exactly zero attention weight, the text tokens share all of it), 1 is the plain concatenation,
above 1 they get more of each query's attention, below 1 less, and their values are never scaled.

A conditioning entry carries its bias in its options as `attention_bias`: a float tensor [T'] over the first T'
of its context's T tokens (tokens appended later, e.g. by ConditioningConcat, get 0). The guider batches entries
whose contexts differ in length by repeating each context along its tokens to a common length (exact: attention
over k copies of a sequence equals attention over it); each bias is repeated the same way, which keeps it exact,
since a token's copies share its bias and so split its weight evenly. The batch's bias [rows, tokens] becomes a
`cross_attention` wrapper of that UNet call (unet_patches.py), which makes the cross-attention inside it add the
bias to its logits (attention.py's `key_bias`). A call without any biased entry gets no wrapper: its results are
the unbiased ones bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..models.attention import key_bias
from .unet_patches import Attend, Site, UNetPatches

BIAS_KEY = "attention_bias"


def append_bias(options: dict[str, Any], tokens: int, added: int, value: float) -> Tensor:
    """The `attention_bias` of an entry whose `tokens`-long context gets `added` tokens biased by `value` (0 for
    tokens appended without a bias), after the entry's own bias (padded with 0 to `tokens`)."""
    old = options.get(BIAS_KEY)
    old = torch.zeros(tokens) if old is None else entry_bias(old, tokens)
    return torch.cat([old, torch.full((added,), float(value))])


def entry_bias(bias: Tensor, tokens: int) -> Tensor:
    """An entry's bias [T'] as [tokens] float32 (zeros after its own), or a clear error if it is longer."""
    bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
    if bias.shape[0] > tokens:
        raise ValueError(f"conditioning attention_bias covers {bias.shape[0]} tokens but its context has only "
                         f"{tokens}")
    return torch.cat([bias, bias.new_zeros(tokens - bias.shape[0])]) if bias.shape[0] < tokens else bias


def batch_bias(options: list[dict[str, Any]], lengths: list[int], rows: int) -> Tensor | None:
    """[len(options) * rows, lcm(lengths)]: each entry's bias repeated as the guider repeats its context, each on
    its `rows` batch rows; None when no entry has a nonzero bias."""
    biases = [opts.get(BIAS_KEY) for opts in options]
    if all(b is None or not bool(torch.as_tensor(b).ne(0).any()) for b in biases):
        return None
    target = math.lcm(*lengths)
    parts = []
    for bias, tokens in zip(biases, lengths, strict=True):
        full = torch.zeros(tokens) if bias is None else entry_bias(bias, tokens)
        parts.append(full.repeat(target // tokens)[None].expand(rows, -1))
    return torch.cat(parts)


def context_bias_patches(bias: Tensor) -> UNetPatches:
    """The wrapper that biases every cross-attention of one UNet call by `bias` [rows, tokens]."""

    def biased(x: Tensor, context: Tensor | None, inner: Attend, site: Site) -> Tensor:
        if context is None or tuple(context.shape[:2]) != tuple(bias.shape):
            got = "no context" if context is None else f"a context of {list(context.shape[:2])} rows x tokens"
            raise ValueError(f"the conditioning's attention bias is for {list(bias.shape)} rows x tokens; the "
                             f"cross-attention at {site.block} got {got}")
        with key_bias(bias.to(context.device)):
            return inner(x, context)

    return UNetPatches(cross_attention=(biased,))
