"""Plain tensor operations shared by the image, mask and latent nodes.

Conventions (ComfyUI's): IMAGE is float32 [B, H, W, C] in 0..1, MASK is [B, H, W] in 0..1, latents are
[B, C, H, W]. The resize and composite helpers work on channels-first tensors [B, C, H, W].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
MAX_RESOLUTION = 16384


def to_bchw(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(-1, 1)


def to_bhwc(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1)


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as [B, H, W] (single masks may come as [H, W])."""
    return mask.unsqueeze(0) if mask.ndim == 2 else mask


def center_crop_to_aspect(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop [B, C, H, W] in its centre to the aspect ratio width:height."""
    h, w = x.shape[-2:]
    if w * height > h * width:  # too wide
        new_w = max(1, round(h * width / height))
        left = (w - new_w) // 2
        return x[..., :, left:left + new_w]
    new_h = max(1, round(w * height / width))
    top = (h - new_h) // 2
    return x[..., top:top + new_h, :]


def _bislerp(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear interpolation of directions (slerp) with linear interpolation of norms: keeps latent
    noise statistics better than plain bilinear when upscaling latents."""

    def resample_axis(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        pos = torch.linspace(0, n - 1, size, dtype=torch.float64)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo).to(t.dtype)
        a, b = t.index_select(dim, lo), t.index_select(dim, hi)
        shape = [1] * t.ndim
        shape[dim] = size
        frac = frac.view(shape)
        na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        ua, ub = a / na.clamp_min(1e-8), b / nb.clamp_min(1e-8)
        dot = (ua * ub).sum(1, keepdim=True).clamp(-1.0, 1.0)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        use_lerp = so.abs() < 1e-4
        slerp = (torch.sin((1 - frac) * omega) * ua + torch.sin(frac * omega) * ub) / so.where(~use_lerp, 1.0)
        direction = torch.where(use_lerp, ua * (1 - frac) + ub * frac, slerp)
        return direction * (na * (1 - frac) + nb * frac)

    out = resample_axis(x.float(), height, 2)
    return resample_axis(out, width, 3).to(x.dtype)


def _lanczos(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    images = []
    for item in x.clamp(0, 1):
        channels = [Image.fromarray((c.cpu().numpy() * 255).round().astype(np.uint8)).resize(
            (width, height), Image.Resampling.LANCZOS) for c in item]
        images.append(torch.from_numpy(np.stack([np.asarray(c) for c in channels])).float() / 255)
    return torch.stack(images).to(x.dtype)


def resize(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize [B, C, H, W]. A width or height of 0 keeps the aspect ratio from the other one."""
    h, w = x.shape[-2:]
    if width == 0 and height == 0:
        return x
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    if crop == "center":
        x = center_crop_to_aspect(x, width, height)
    if method == "bislerp":
        return _bislerp(x, height, width)
    if method == "lanczos":
        return _lanczos(x, height, width)
    if method in ("bilinear", "bicubic"):
        return F.interpolate(x, size=(height, width), mode=method, align_corners=False, antialias=True)
    if method in ("nearest-exact", "area"):
        return F.interpolate(x, size=(height, width), mode=method)
    raise ValueError(f"unknown upscale method {method!r}")


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
              mask: torch.Tensor | None = None, multiplier: int = 1, resize_source: bool = False) -> torch.Tensor:
    """Paste `source` onto `destination` (both [B, C, H, W]) at (x, y), given in pixels of scale
    `multiplier` (8 for latents addressed in pixels). `mask` [B, H, W] or [H, W] weights the paste."""
    destination = destination.clone()
    source = source.to(destination.device, destination.dtype)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear", align_corners=False)
    if source.shape[0] != destination.shape[0]:
        source = source.repeat((destination.shape[0] + source.shape[0] - 1) // source.shape[0], 1, 1, 1)
        source = source[: destination.shape[0]]
    x, y = x // multiplier, y // multiplier
    dh, dw = destination.shape[-2:]
    visible_h, visible_w = max(0, min(source.shape[-2], dh - y)), max(0, min(source.shape[-1], dw - x))
    if visible_h == 0 or visible_w == 0:
        return destination
    if mask is None:
        weight = torch.ones_like(source[:, :1])
    else:
        weight = as_mask_batch(mask).to(source.device, source.dtype).unsqueeze(1)
        weight = F.interpolate(weight, size=source.shape[-2:], mode="bilinear", align_corners=False)
        if weight.shape[0] != source.shape[0]:
            weight = weight[:1].expand(source.shape[0], -1, -1, -1) if weight.shape[0] < source.shape[0] \
                else weight[: source.shape[0]]
    region = (slice(None), slice(None), slice(y, y + visible_h), slice(x, x + visible_w))
    part = source[..., :visible_h, :visible_w]
    w = weight[..., :visible_h, :visible_w]
    destination[region] = part * w + destination[region] * (1 - w)
    return destination


def gaussian_kernel(radius: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel_1d[:, None] * kernel_1d[None, :]
    return kernel / kernel.sum()


def blur(x: torch.Tensor, radius: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] with reflect padding."""
    if radius <= 0:
        return x
    kernel = gaussian_kernel(radius, sigma, x.device).to(x.dtype)
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, -1, -1)
    padded = F.pad(x, (radius,) * 4, mode="reflect" if min(x.shape[-2:]) > radius else "replicate")
    return F.conv2d(padded, weight, groups=channels)


def edge_ramp(height: int, width: int, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """[H, W] factors that rise linearly from 1/n to 1 over the first n pixels from each edge given a width n
    (0 = no ramp at that edge); corners multiply."""

    def ramp(size: int, n: int) -> torch.Tensor:
        distance = torch.arange(size, dtype=torch.float32)
        return ((distance + 1) / n).clamp(max=1.0) if n > 0 else torch.ones(size)

    rows = ramp(height, top) * ramp(height, bottom).flip(0)
    cols = ramp(width, left) * ramp(width, right).flip(0)
    return rows[:, None] * cols[None, :]
