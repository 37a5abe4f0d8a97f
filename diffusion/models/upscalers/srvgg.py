"""Real-ESRGAN's compact model, SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3, many "compact"
community upscalers): a plain stack of 3×3 convs with per-channel PReLUs between them, the last conv producing
out_channels × scale² maps that a pixel shuffle rearranges to the full size, plus the input itself upsampled
by nearest neighbour, so the network only learns the residual over a blocky enlargement.

Keys are `body.{i}.weight/bias`: even i are convs, odd i the PReLUs' 1-D `weight` of num_feat slopes. The
attribute names here are those keys (`body` is a ModuleList of the same indices).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

ARCH_NAME = "Real-ESRGAN compact (SRVGGNetCompact)"

_BODY = re.compile(r"body\.(\d+)\.weight$")


@dataclass(frozen=True)
class SRVGGConfig:
    in_channels: int
    out_channels: int
    num_feat: int = 64
    num_conv: int = 16  # hidden num_feat → num_feat convs (between the first and the last)
    scale: int = 4


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: SRVGGConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.num_feat, 3, 1, 1), nn.PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1), nn.PReLU(c.num_feat)]
        layers.append(nn.Conv2d(c.num_feat, c.out_channels * c.scale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.config.scale)
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")


def detect(state_dict: dict[str, Tensor]) -> SRVGGConfig | None:
    """The config of a compact model, or None when the keys are not `body.N` convs with PReLUs between."""
    indices = sorted(int(m.group(1)) for k in state_dict if (m := _BODY.match(k)))
    if not indices or indices[0] != 0 or any(k.split(".")[0] != "body" for k in state_dict):
        return None
    first = state_dict["body.0.weight"]
    prelu = state_dict.get("body.1.weight")
    if first.ndim != 4 or prelu is None or prelu.ndim != 1:
        return None
    last_index = indices[-1]
    if indices != list(range(last_index + 1)) or last_index % 2:
        raise ValueError(f"{ARCH_NAME}: body layers {indices} are not conv, PReLU, ..., conv")
    in_channels, num_feat = int(first.shape[1]), int(first.shape[0])
    last = state_dict[f"body.{last_index}.weight"]
    maps = int(last.shape[0])
    out_channels = in_channels  # the nearest-upsampled input is added to the output
    scale = math.isqrt(maps // out_channels)
    if scale < 1 or out_channels * scale**2 != maps:
        raise ValueError(f"{ARCH_NAME}: the last conv makes {maps} maps, which is not {in_channels} channels "
                         "times a square scale")
    return SRVGGConfig(in_channels=in_channels, out_channels=out_channels, num_feat=num_feat,
                       num_conv=last_index // 2 - 1, scale=scale)


def build(config: SRVGGConfig) -> SRVGGNetCompact:
    return SRVGGNetCompact(config)


def module_state_dict(state_dict: dict[str, Tensor], config: SRVGGConfig) -> dict[str, Tensor]:
    """The file's keys are the attribute names."""
    return dict(state_dict)


def activation_elements(config: SRVGGConfig, height: int, width: int) -> int:
    """Peak activation elements of one forward over a [1, C, height, width] input, under no_grad: a conv's
    output and its PReLU's at the input size, then the last conv's maps, their shuffled copy and the
    upsampled input at the output size."""
    c = config
    return height * width * max(2 * c.num_feat, 2 * c.out_channels * c.scale**2 + c.out_channels * c.scale**2)
