"""Deterministic random weights for parity tests of the UNet and the VAE."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with seeded noise scaled to keep activations near unit size.

    Unlike default initialisation this also makes the zero-initialised output layers of a trained
    layout non-trivial, so a test that compares two implementations exercises every weight."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.2 * noise)
        elif p.ndim == 1:  # biases
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()
