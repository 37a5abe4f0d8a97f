"""Plain tensor operations shared by the image, mask and latent nodes.

Conventions (ComfyUI's): IMAGE is float32 [B, H, W, C] in 0..1, MASK is [B, H, W] in 0..1, latents are
[B, C, H, W]. The resize and composite helpers work on channels-first tensors [B, C, H, W].
"""

from __future__ import annotations

from collections.abc import Callable

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


# Morphology ----------------------------------------------------------------------------------------------------
def _window_max(x: torch.Tensor, size: int) -> torch.Tensor:
    """Max of [B, C, H, W] over a size×size window: output pixel i sees input pixels i - size//2 .. i + size - 1 -
    size//2 (the usual origin for even sizes too). Pixels outside the image are ignored ("geodesic" border), not
    counted as 0 or 1, so the border does not grow or eat into the image. Separable: max over rows of the max over
    columns equals the max over the square, at O(size) per pixel instead of O(size²)."""
    before, after = size // 2, size - 1 - size // 2
    padded = F.pad(x, (before, after, before, after), value=float("-inf"))
    return F.max_pool2d(F.max_pool2d(padded, (size, 1), stride=1), (1, size), stride=1)


def dilate(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey dilation by a flat square: each pixel becomes the max of its window."""
    return _window_max(x, size)


def erode(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey erosion by a flat square: each pixel becomes the min of its window (the max of the negation)."""
    return -_window_max(-x, size)


MORPHOLOGY_OPERATIONS = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"]


def morphology(x: torch.Tensor, operation: str, size: int) -> torch.Tensor:
    """The classical grey-scale operations of [B, C, H, W] with a flat size×size square (Serra, "Image Analysis
    and Mathematical Morphology"): open = dilate(erode(x)) removes bright specks smaller than the square, close =
    erode(dilate(x)) fills dark ones, gradient = dilate − erode outlines edges, top hat = x − open keeps the
    bright details that opening removed, bottom hat = close − x the dark ones."""
    if operation == "erode":
        return erode(x, size)
    if operation == "dilate":
        return dilate(x, size)
    if operation == "open":
        return dilate(erode(x, size), size)
    if operation == "close":
        return erode(dilate(x, size), size)
    if operation == "gradient":
        return dilate(x, size) - erode(x, size)
    if operation == "top_hat":
        return x - dilate(erode(x, size), size)
    if operation == "bottom_hat":
        return erode(dilate(x, size), size) - x
    raise ValueError(f"unknown morphology operation {operation!r}; expected one of {MORPHOLOGY_OPERATIONS}")


# Porter-Duff compositing ---------------------------------------------------------------------------------------
# Each mode gives (colour, alpha) of the result from the source's and the destination's colour (Cs, Cd) and alpha
# (As, Ad), colours taken as premultiplied by their alpha: the operators of Porter & Duff, "Compositing Digital
# Images" (SIGGRAPH 1984), plus the blend modes of the same family (darken, lighten, multiply, overlay, screen,
# add), with the formulas as Android's public PorterDuff.Mode documentation states them.
_T = torch.Tensor
PORTER_DUFF: dict[str, Callable[[_T, _T, _T, _T], tuple[_T, _T]]] = {
    "ADD": lambda cs, a_s, cd, ad: ((cs + cd).clamp(0, 1), (a_s + ad).clamp(0, 1)),
    "CLEAR": lambda cs, a_s, cd, ad: (torch.zeros_like(cd), torch.zeros_like(ad)),
    "DARKEN": lambda cs, a_s, cd, ad: ((1 - ad) * cs + (1 - a_s) * cd + torch.minimum(cs, cd), a_s + ad - a_s * ad),
    "DST": lambda cs, a_s, cd, ad: (cd, ad),
    "DST_ATOP": lambda cs, a_s, cd, ad: (a_s * cd + (1 - ad) * cs, a_s),
    "DST_IN": lambda cs, a_s, cd, ad: (cd * a_s, a_s * ad),
    "DST_OUT": lambda cs, a_s, cd, ad: ((1 - a_s) * cd, (1 - a_s) * ad),
    "DST_OVER": lambda cs, a_s, cd, ad: (cd + (1 - ad) * cs, ad + (1 - ad) * a_s),
    "LIGHTEN": lambda cs, a_s, cd, ad: ((1 - ad) * cs + (1 - a_s) * cd + torch.maximum(cs, cd), a_s + ad - a_s * ad),
    "MULTIPLY": lambda cs, a_s, cd, ad: (cs * cd, a_s * ad),
    "OVERLAY": lambda cs, a_s, cd, ad: (torch.where(2 * cd < ad, 2 * cs * cd, a_s * ad - 2 * (ad - cs) * (a_s - cd)),
                                        a_s + ad - a_s * ad),
    "SCREEN": lambda cs, a_s, cd, ad: (cs + cd - cs * cd, a_s + ad - a_s * ad),
    "SRC": lambda cs, a_s, cd, ad: (cs, a_s),
    "SRC_ATOP": lambda cs, a_s, cd, ad: (ad * cs + (1 - a_s) * cd, ad),
    "SRC_IN": lambda cs, a_s, cd, ad: (cs * ad, a_s * ad),
    "SRC_OUT": lambda cs, a_s, cd, ad: ((1 - ad) * cs, (1 - ad) * a_s),
    "SRC_OVER": lambda cs, a_s, cd, ad: (cs + (1 - a_s) * cd, a_s + (1 - a_s) * ad),
    "XOR": lambda cs, a_s, cd, ad: ((1 - ad) * cs + (1 - a_s) * cd, (1 - ad) * a_s + (1 - a_s) * ad),
}


def porter_duff(source: torch.Tensor, source_alpha: torch.Tensor, destination: torch.Tensor,
                destination_alpha: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite images [..., C] with alphas [...] (the same leading shape) by a Porter-Duff mode."""
    try:
        operator = PORTER_DUFF[mode]
    except KeyError:
        raise ValueError(f"unknown Porter-Duff mode {mode!r}; expected one of {sorted(PORTER_DUFF)}") from None
    colour, alpha = operator(source, source_alpha.unsqueeze(-1), destination, destination_alpha.unsqueeze(-1))
    return colour, alpha.squeeze(-1)
