"""LowRankDelta, the trainers' LoRA: it starts as the frozen layer, trains float32 parameters under a bf16 layer,
and what it exports as a LoRA patch is the delta it added."""

from __future__ import annotations

import torch
from torch import nn

from diffusion.patches.trainable_lora import LowRankDelta


def test_starts_as_the_frozen_layer_and_exports_the_delta_it_adds():
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    delta = LowRankDelta(linear, rank=4, gen=torch.Generator().manual_seed(1))
    x = torch.randn(3, 16)
    handle = linear.register_forward_hook(delta.hook)
    torch.testing.assert_close(linear(x), nn.functional.linear(x, linear.weight, linear.bias))
    with torch.no_grad():
        delta.up.normal_()
    patched = linear(x)
    handle.remove()
    weight = linear.weight + delta.as_lora().delta(torch.device("cpu"))
    torch.testing.assert_close(patched, nn.functional.linear(x, weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert (patched - linear(x)).abs().max() > 1e-2  # the hook is gone, and it did change the output


def test_a_bf16_layer_trains_float32_parameters():
    linear = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    delta = LowRankDelta(linear, rank=2, gen=torch.Generator().manual_seed(0))
    linear.register_forward_hook(delta.hook)
    out = linear(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert delta.up.dtype == torch.float32 and delta.up.grad is not None and delta.up.grad.abs().max() > 0
    assert delta.as_lora(torch.float16).up.dtype == torch.float16
