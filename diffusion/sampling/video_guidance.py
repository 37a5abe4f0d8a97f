"""Per-frame guidance scales for video models (ComfyUI's VideoLinearCFGGuidance and VideoTriangleCFGGuidance).

Image-to-video models copy the conditioning image into the first frame; full guidance there over-saturates it
while later frames need it to move. So the scale varies over the batch (the frames of the clip): linearly from
`min_cfg` on the first frame to `cfg` on the last, or as a triangle wave, `min_cfg` at both ends and `cfg` in the
middle. Guidance stays uncond + scale * (cond - uncond), with one scale per frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .guidance import GuidanceHooks, GuidanceStep

KINDS = ("linear", "triangle")


def frame_cfg_scales(kind: str, frames: int, min_cfg: float, cfg: float) -> Tensor:
    """[frames] guidance scales: "linear" from min_cfg to cfg; "triangle" |2(p - round(p))| of the frame's place
    p in [0, 1] (0 at both ends, 1 in the middle) mapped onto min_cfg..cfg."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame guidance {kind!r}; expected one of {KINDS}")
    if kind == "linear":
        return torch.linspace(min_cfg, cfg, frames)
    place = torch.linspace(0.0, 1.0, frames)
    wave = 2.0 * (place - torch.floor(place + 0.5)).abs()
    return min_cfg + wave * (cfg - min_cfg)


def frame_cfg_hooks(kind: str, min_cfg: float) -> GuidanceHooks:
    """Guidance hooks whose combine scales each frame (batch row) by `frame_cfg_scales` up to the sampler's cfg."""
    frame_cfg_scales(kind, 2, min_cfg, min_cfg)  # validates `kind` now, not at the first step

    def combine(step: GuidanceStep) -> Tensor:
        scales = frame_cfg_scales(kind, step.cond.shape[0], min_cfg, step.cond_scale)
        scales = scales.to(step.cond.device, step.cond.dtype).reshape(-1, *([1] * (step.cond.ndim - 1)))
        return step.uncond + scales * (step.cond - step.uncond)

    return GuidanceHooks(combine=combine)
