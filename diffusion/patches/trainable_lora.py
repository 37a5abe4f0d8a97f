"""A trainable LoRA on a frozen nn.Linear, for the trainers (the LoRA training node, the motion recipe's
adapter): the frozen layer keeps its weight and a forward hook adds up(down(x))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patcher import LoraDelta


class LowRankDelta(nn.Module):
    """y = W x + up @ down x for one frozen linear layer. down is drawn like a Linear's init and up starts at zero,
    so training starts from the base model. The delta is computed in the parameters' dtype (float32) and added in
    the layer's, so a bf16 UNet trains float32 parameters."""

    def __init__(self, linear: nn.Linear, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, linear.in_features, generator=gen) / math.sqrt(linear.in_features))
        self.up = nn.Parameter(torch.zeros(linear.out_features, rank))

    def hook(self, layer: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        """A forward hook for the frozen layer: register it with `layer.register_forward_hook(delta.hook)`."""
        delta = F.linear(F.linear(args[0].to(self.down.dtype), self.down), self.up)
        return out + delta.to(out.dtype)

    def as_lora(self, dtype: torch.dtype = torch.float32) -> LoraDelta:
        """The trained delta as a LoRA patch (alpha = rank: scale 1 at strength 1), on the CPU in `dtype`."""
        return LoraDelta(self.up.detach().cpu().to(dtype).contiguous(), self.down.detach().cpu().to(dtype).contiguous(),
                         float(self.down.shape[0]))
