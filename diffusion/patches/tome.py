"""Token merging for Stable Diffusion (ToMe; Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"):
the TomePatchModel node's patch.

In the self-attentions at the latent's full resolution (the most tokens, the most attention work: 4096 tokens at
512x512 for SD1), similar query tokens are merged before the attention and the output is copied back to every
token they stood for, so the attention computes N - r rows instead of N. As in ComfyUI's node, only the queries
are merged: keys and values keep every token, which keeps each row's context whole. Which tokens merge is
bipartite soft matching over 2x2 cells: one token of each cell (picked at random, seeded by the step's timestep:
the same run gives the same image) is a destination, every other token is a source matched to its most similar
destination (cosine similarity), and the r best-matched sources are averaged into their destinations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .unet_patches import Attend, Site, UNetPatches, tokens_at_depth


def destinations(size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """[h*w] bool: one destination per full 2x2 cell of an h x w grid (a random one with `generator`, else the
    top-left); a last odd row or column has only sources."""
    h, w = size
    cells_h, cells_w = h // 2, w // 2
    grid = torch.zeros(h, w, dtype=torch.bool)
    if cells_h and cells_w:
        pick = (torch.randint(4, (cells_h, cells_w), generator=generator) if generator is not None
                else torch.zeros(cells_h, cells_w, dtype=torch.long))
        rows = torch.arange(cells_h)[:, None] * 2 + pick // 2
        cols = torch.arange(cells_w)[None, :] * 2 + pick % 2
        grid[rows, cols] = True
    return grid.flatten()


def bipartite_merge(metric: Tensor, size: tuple[int, int], r: int,
                    generator: torch.Generator | None = None) -> tuple[Callable[[Tensor], Tensor],
                                                                        Callable[[Tensor], Tensor]]:
    """(merge, unmerge) for tokens [B, h*w, C] on an h x w grid, matched on `metric` [B, h*w, C'].

    merge gives [B, N - r, C]: the kept sources, then the destinations (each the mean of itself and the sources
    merged into it); unmerge takes [B, N - r, C'] back to [B, N, C'], each merged source taking its destination's
    row. With r = 0 (or nothing to merge) both are the identity."""
    b, n, _ = metric.shape
    flat = destinations(size, generator).to(metric.device)
    dst_idx, src_idx = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
    r = min(r, src_idx.numel()) if dst_idx.numel() else 0
    if r <= 0:
        return (lambda t: t), (lambda t: t)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)  # [B, S, D]
    best, best_dst = scores.max(-1)
    order = best.argsort(-1, descending=True)
    merged_src, kept_src = order[:, :r], order[:, r:]
    target = best_dst.gather(1, merged_src)  # [B, r]

    def expand(idx: Tensor, c: int) -> Tensor:
        return idx[..., None].expand(*idx.shape, c)

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        kept = src.gather(1, expand(kept_src, c))
        moving = src.gather(1, expand(merged_src, c))
        dst = dst.scatter_reduce(1, expand(target, c), moving, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        c = y.shape[-1]
        keep = kept_src.shape[1]
        kept, dst = y[:, :keep], y[:, keep:]
        out = y.new_empty(b, n, c)
        out[:, dst_idx] = dst
        src_positions = src_idx[None].expand(b, -1)
        out.scatter_(1, expand(src_positions.gather(1, kept_src), c), kept)
        out.scatter_(1, expand(src_positions.gather(1, merged_src), c), dst.gather(1, expand(target, c)))
        return out

    return merge, unmerge


def tome_patches(ratio: float) -> UNetPatches:
    """ToMe on the full-resolution self-attentions: int(N * ratio) query tokens merged away, the output unmerged
    back to N tokens. The destination choice is seeded by the step's timestep (reproducible)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"TomePatchModel ratio must be within 0..1, got {ratio}")

    def wrapper(x: Tensor, kv: Tensor | None, inner: Attend, site: Site) -> Tensor:
        whole = x.shape[1] == site.size[0] * site.size[1]  # not when an outer wrapper tiled the tokens
        if kv is not None or not whole or tokens_at_depth(site.latent_shape, site.size, 0) != 0:
            return inner(x, kv)
        r = int(x.shape[1] * ratio)
        generator = torch.Generator().manual_seed(int(site.timesteps.reshape(-1)[0]))
        merge, unmerge = bipartite_merge(x, site.size, r, generator)
        return unmerge(inner(merge(x), x))

    return UNetPatches(self_attention=(wrapper,))
