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

The ControlNets of that call get the same context, style tokens included, so they get the same bias: the wrapper
carries it (`patches_bias` finds it among a call's patches) and `cross_attention_bias` applies it to every
cross-attention of a ControlNet, whose forward takes no UNet patches; without it a style model at strength 0
would still steer the result through the ControlNet.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..models.attention import key_bias
from ..models.unet_blocks import BasicTransformerBlock
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


def _check(bias: Tensor, context: Tensor | None, where: str) -> None:
    if context is None or tuple(context.shape[:2]) != tuple(bias.shape):
        got = "no context" if context is None else f"a context of {list(context.shape[:2])} rows x tokens"
        raise ValueError(f"the conditioning's attention bias is for {list(bias.shape)} rows x tokens; the "
                         f"cross-attention at {where} got {got}")


class _Biased:
    """The `cross_attention` wrapper of one UNet call; its `bias` is what the call's ControlNets get too."""

    def __init__(self, bias: Tensor):
        self.bias = bias

    def __call__(self, x: Tensor, context: Tensor | None, inner: Attend, site: Site) -> Tensor:
        _check(self.bias, context, str(site.block))
        with key_bias(self.bias.to(context.device)):
            return inner(x, context)


def context_bias_patches(bias: Tensor) -> UNetPatches:
    """The wrapper that biases every cross-attention of one UNet call by `bias` [rows, tokens]."""
    return UNetPatches(cross_attention=(_Biased(bias),))


def patches_bias(patches: UNetPatches | None) -> Tensor | None:
    """The bias [rows, tokens] of a UNet call's patches (`context_bias_patches`, merged with others), or None."""
    for wrapper in patches.cross_attention if patches is not None else ():
        if isinstance(wrapper, _Biased):
            return wrapper.bias
    return None


@contextlib.contextmanager
def cross_attention_bias(net: nn.Module, bias: Tensor | None) -> Iterator[None]:
    """Within the block, every transformer block's cross-attention (attn2) in `net` adds `bias` [rows, tokens] to
    its logits and its self-attentions add nothing: for a ControlNet, whose forward takes no UNet patches. The
    hooks are removed on leaving, also after an error."""
    if bias is None:
        yield
        return
    active: list[contextlib.AbstractContextManager] = []

    def before(module: nn.Module, args: tuple) -> None:
        context = args[1] if len(args) > 1 else None
        _check(bias, context, f"{type(net).__name__} {names[module]}")
        biased = key_bias(bias.to(context.device))
        biased.__enter__()
        active.append(biased)

    def after(module: nn.Module, args: tuple, out: Tensor) -> None:
        active.pop().__exit__(None, None, None)

    names = {block.attn2: f"{name}.attn2" for name, block in net.named_modules()
             if isinstance(block, BasicTransformerBlock)}
    hooks = [h for attn in names for h in (attn.register_forward_pre_hook(before), attn.register_forward_hook(after))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        while active:  # an error inside a cross-attention skipped its `after`
            active.pop().__exit__(None, None, None)
