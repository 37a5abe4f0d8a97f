"""Hint-image preprocessors for ControlNets that need no model of their own: Canny edge detection.

Canny (1986), in torch: luma, a 5x5 Gaussian blur (sigma 1), Sobel gradients (not normalised, as in kornia's
canny that ComfyUI's node uses, so its thresholds mean the same: a sharp 0→1 step reaches a magnitude of about
2.6), non-maximum suppression along the gradient direction quantised to 0/45/90/135 degrees (a pixel stays
when it is larger than its neighbour behind and not smaller than the one ahead, so a symmetric ridge keeps one
pixel, not two), then hysteresis: pixels above `high` are edges, and
pixels above `low` become edges while they touch an edge (8-connected), until nothing changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)


def _gaussian_kernel(size: int = 5, sigma: float = 1.0) -> Tensor:
    half = (size - 1) / 2
    taps = torch.exp(-0.5 * ((torch.arange(size, dtype=torch.float32) - half) / sigma) ** 2)
    taps = taps / taps.sum()
    return taps[:, None] * taps[None, :]


def _conv(x: Tensor, kernel: Tensor) -> Tensor:
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), kernel[None, None].to(x))


def gradients(gray: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel gradients (d/dx, d/dy) of [B, 1, H, W] images after a 5x5 Gaussian blur (sigma 1)."""
    blurred = _conv(gray, _gaussian_kernel())
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return _conv(blurred, sobel_x), _conv(blurred, sobel_x.T.contiguous())


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """x[y + dy, x + dx] at every pixel (edges replicated)."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def non_maximum_suppression(magnitude: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """The magnitude where it is a local maximum across the edge, zero elsewhere."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # the gradient's direction, up to sign
    sector = (torch.round(angle / 45) % 4).long()  # 0: horizontal, 1: 45°, 2: vertical, 3: 135°
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead, behind = _shifted(magnitude, dy, dx), _shifted(magnitude, -dy, -dx)
        local = (magnitude > behind) & (magnitude >= ahead)
        keep |= (sector == k) & local
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def hysteresis(strong: Tensor, weak: Tensor) -> Tensor:
    """The weak pixels 8-connected (through weak pixels) to a strong one, by connected-component labelling: every
    weak pixel starts with its own index as label, takes the smallest label around it and then the label its label
    points to (pointer jumping), until nothing changes (a few dozen rounds even for edges thousands of pixels
    long, where growing the strong pixels one ring at a time would take one round per pixel of length)."""
    b, c, h, w = weak.shape
    n = h * w
    index = torch.arange(n, dtype=torch.float64, device=weak.device).reshape(1, 1, h, w).expand(b, c, h, w)
    label = torch.where(weak, index, float(n))
    for _ in range(n):
        around = -F.max_pool2d(-label, 3, stride=1, padding=1)
        flat = torch.where(weak, torch.minimum(label, around), float(n)).reshape(b * c, n)
        pointed = torch.cat([flat, torch.full_like(flat[:, :1], float(n))], 1).gather(1, flat.long())
        new = torch.minimum(flat, pointed).reshape(b, c, h, w)
        if torch.equal(new, label):
            break
        label = new
    keys = label.reshape(b * c, n).long()
    seeds = torch.zeros(b * c, n + 1, dtype=torch.bool, device=weak.device)
    seeds.scatter_(1, torch.where((strong & weak).reshape(b * c, n), keys, n), True)
    seeds[:, n] = False
    return seeds.gather(1, keys).reshape(b, c, h, w) & weak


def canny(image: Tensor, low: float, high: float) -> Tensor:
    """Edges (1) of IMAGE [B, H, W, C] (0..1) as an IMAGE [B, H, W, 3] of 0 and 1; `low` <= `high` are thresholds
    on the gradient magnitude (a sharp black-to-white step reaches about 2.6)."""
    if image.ndim != 4 or image.shape[-1] < 1:
        raise ValueError(f"Canny: image must be [B, H, W, C], got {list(image.shape)}")
    if not 0 <= low <= high or math.isnan(high):
        raise ValueError(f"Canny: need 0 <= low_threshold <= high_threshold, got {low} and {high}")
    x = image.float().movedim(-1, 1)
    gray = sum(w * x[:, i:i + 1] for i, w in enumerate(_LUMA)) if x.shape[1] >= 3 else x[:, :1]
    gx, gy = gradients(gray)
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-12)
    thin = non_maximum_suppression(magnitude, gx, gy)
    edges = hysteresis(thin > high, thin > low)
    return edges.float().movedim(1, -1).expand(-1, -1, -1, 3).contiguous()
