"""Run an image-to-image function tile by tile and blend the overlaps with linear ramps.

Used for VAE encode/decode of images too large to process at once. Within an overlap of n samples the
outgoing tile's weights fall (n, n-1, ..., 1)/(n+1) while the incoming tile's rise (1, ..., n)/(n+1), so
the weights sum to one and one tile fades into the next instead of meeting it at a visible seam.

With `trim`, each tile's outermost `trim` samples on a shared edge get no weight at all and the ramp runs over
the middle of the overlap: those samples saw the tile's zero padding instead of the neighbouring pixels, so a
network with a receptive field reaching over the edge (an upscaler) is most wrong there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def tile_spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, end) of tiles covering 0..size, `tile` long, consecutive ones overlapping by at least
    `overlap`. Starts are multiples of `align`; the last tile ends exactly at `size` (it may be up to
    align - 1 longer than `tile` for that)."""
    if tile <= overlap or overlap < 0:
        raise ValueError(f"tile size ({tile}) must be larger than the overlap ({overlap}), which must be >= 0")
    if size <= tile:
        return [(0, size)]
    stride = (tile - overlap) // align * align
    if stride <= 0:
        raise ValueError(f"tile ({tile}) minus overlap ({overlap}) must be at least the alignment {align}")
    last = (size - tile) // align * align
    return [(s, s + tile) for s in range(0, last, stride)] + [(last, size)]


def _ramp(length: int, overlap: int, fade_in: bool, fade_out: bool, device: torch.device, trim: int = 0) -> Tensor:
    w = torch.ones(length, device=device)
    n = min(overlap, length // 2)
    t = max(0, min(trim, (n - 1) // 2))  # zero weight for the first t; the ramp over the n - 2t after them
    rise = (torch.arange(1, n + 1, dtype=torch.float32, device=device) - t).clamp(0, n - 2 * t + 1) / (n - 2 * t + 1)
    if fade_in and n:
        w[:n] = rise
    if fade_out and n:
        w[length - n :] = rise.flip(0)
    return w


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, *, up: int = 1, down: int = 1, trim: int = 0
) -> Tensor:
    """fn applied to overlapping tiles of x [..., H, W], blended into one output of size
    (H * up // down, W * up // down). `fn` must map a tile of side L to side L * up // down (a decoder:
    up=8; an encoder: down=8, and then tiles start on multiples of `down` so outputs stay aligned).
    `trim` (input samples, less than overlap / 2) drops each tile's outermost samples where tiles meet."""
    h, w = x.shape[-2:]
    out_h, out_w = h * up // down, w * up // down
    out: Tensor | None = None
    total = torch.zeros(out_h, out_w, device=x.device)
    ramp_len, trim_len = overlap * up // down, trim * up // down
    for y0, y1 in tile_spans(h, tile, overlap, down):
        for x0, x1 in tile_spans(w, tile, overlap, down):
            piece = fn(x[..., y0:y1, x0:x1])
            oy, ox = y0 * up // down, x0 * up // down
            ph, pw = piece.shape[-2:]
            if oy + ph > out_h or ox + pw > out_w:
                raise ValueError(f"tile function returned {ph}x{pw} at ({oy}, {ox}), beyond {out_h}x{out_w}")
            if out is None:
                out = torch.zeros((*piece.shape[:-2], out_h, out_w), dtype=torch.float32, device=x.device)
            weight = _ramp(ph, ramp_len, y0 > 0, y1 < h, x.device, trim_len)[:, None] * _ramp(
                pw, ramp_len, x0 > 0, x1 < w, x.device, trim_len
            )[None, :]
            out[..., oy : oy + ph, ox : ox + pw] += piece.float() * weight
            total[oy : oy + ph, ox : ox + pw] += weight
    assert out is not None
    return (out / total).to(x.dtype)
