"""Patches of the UNet's self-attention: HyperTile, and the perturbed and captured attention behind
Perturbed-Attention Guidance and Self-Attention Guidance (token merging, ToMe, is in tome.py).

Each is an `AttentionWrapper` (unet_patches.py): `wrapper(x, kv, inner, site)` with `x` the normed tokens
[B, N, C] that queries come from, `kv` those of keys and values (None: x), `inner(x, kv)` the attention
it wraps. The guidance patches (PAG, SAG) add a post hook that evaluates the model again with a wrapper.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampling.guidance import GuidanceHooks, GuidanceStep
from .guidance_patches import positive_only
from .tome import bipartite_merge, tome_patches  # noqa: F401 (re-exported: they lived here)
from .unet_patches import Attend, Site, UNetPatches, tokens_at_depth


def with_patches(cond: dict, patches: UNetPatches) -> dict:
    """The model call's keyword arguments with `patches` added to the UNet patches it already carries (GLIGEN's
    grounding, for one), so a guidance patch's extra evaluation keeps them."""
    return {**cond, "unet_patches": patches.merged(cond.get("unet_patches"))}

def _attention_probabilities(attention: torch.nn.Module, x: Tensor, kv: Tensor | None) -> tuple[Tensor, Tensor]:
    """(output, softmax(q k^T / sqrt(d)) [B, heads, N, M]) of a CrossAttention computed explicitly."""
    kv = x if kv is None else kv
    b, n, _ = x.shape
    heads = attention.heads
    q, k, v = attention.to_q(x), attention.to_k(kv), attention.to_v(kv)
    q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    probs = (q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
    return attention.to_out(out), probs


def _in_middle(site: Site) -> bool:
    return site.block[0] == "middle"


# --- Perturbed-Attention Guidance (Ahn et al. 2024) -------------------------------------------------------


def identity_attention(x: Tensor, kv: Tensor | None, inner: Attend, site: Site) -> Tensor:
    """Self-attention with the attention map replaced by the identity: each token gets its own value,
    to_out(to_v(x)). Applied to the middle block only."""
    if not _in_middle(site) or site.attention is None:
        return inner(x, kv)
    return site.attention.to_out(site.attention.to_v(x))


PERTURBED_MIDDLE = UNetPatches(self_attention=(identity_attention,))


def perturbed_attention_hooks(scale: float) -> GuidanceHooks:
    """PAG: D = D_guided + scale (D_c - D_perturbed), where D_perturbed is the positive prediction of the
    model whose middle-block self-attention is the identity. One extra UNet evaluation per step."""

    def post(step: GuidanceStep) -> Tensor:
        if scale == 0:
            return step.denoised
        guider = step.guider

        def perturbed(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
            return guider.denoiser(x, sigma, **with_patches(cond, PERTURBED_MIDDLE))

        worse = positive_only(guider, guider.positive, perturbed)(step.x, step.sigma)
        return step.denoised + (step.cond - worse) * scale

    return GuidanceHooks(post=[post])


# --- Self-Attention Guidance (Hong et al. 2023) -----------------------------------------------------------


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 9) -> Tensor:
    """Separable Gaussian blur of x [B, C, H, W] (reflect padding; the kernel shrinks to fit small maps);
    sigma 0 returns x."""
    if sigma <= 0:
        return x
    size = min(kernel_size, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
    if size < 3:
        return x
    half = (size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, size, device=x.device) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.dtype)
    c = x.shape[1]
    pad = size // 2
    out = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, taps.reshape(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(out, taps.reshape(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def attention_mask(probs: Tensor, size: tuple[int, int], latent_size: tuple[int, int],
                   threshold: float = 1.0) -> Tensor:
    """SAG's mask [B, 1, H, W]: the attention each token receives, summed over queries and averaged over
    heads (1 on average), above `threshold` marks the salient tokens; upsampled (nearest) to the latent."""
    received = probs.mean(1).sum(1)  # [B, N]
    mask = (received > threshold).to(probs.dtype).reshape(-1, 1, *size)
    return F.interpolate(mask, size=latent_size, mode="nearest")


def self_attention_guidance_hooks(scale: float, blur_sigma: float) -> GuidanceHooks:
    """SAG: with D_u the unconditional estimate (the positive one when there is no negative) and M the mask
    of its middle block's most attended tokens, the blurred estimate B = blur(D_u) M + D_u (1 - M) is
    re-noised with the step's own noise (B + x - D_u) and denoised again unconditionally to D_sag;
    D = D_guided + scale (D_u - D_sag). Two extra UNet evaluations per step: one to capture the map, one
    on the degraded input."""

    def post(step: GuidanceStep) -> Tensor:
        if scale == 0:
            return step.denoised
        guider = step.guider
        uncond = guider.negative if guider.negative and guider.cfg != 1.0 else guider.positive
        maps: list[tuple[Tensor, tuple[int, int]]] = []

        def capture(x: Tensor, kv: Tensor | None, inner: Attend, site: Site) -> Tensor:
            if not _in_middle(site) or site.transformer != 0 or site.attention is None:
                return inner(x, kv)
            out, probs = _attention_probabilities(site.attention, x, kv)
            maps.append((probs, site.size))
            return out

        patches = UNetPatches(self_attention=(capture,))

        def capturing(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
            return guider.denoiser(x, sigma, **with_patches(cond, patches))

        d_u = positive_only(guider, uncond, capturing)(step.x, step.sigma)
        if not maps:
            raise RuntimeError("SelfAttentionGuidance: the middle block's self-attention did not run")
        batch, size = step.x.shape[0], max((m[1] for m in maps), key=lambda hw: hw[0] * hw[1])
        # entries of the list (several when it was combined) are averaged; smaller areas' maps are left out
        probs = torch.cat([p.reshape(-1, batch, *p.shape[1:]) for p, hw in maps if hw == size]).mean(0)
        mask = attention_mask(probs, size, tuple(step.x.shape[-2:])).to(d_u)
        degraded = gaussian_blur(d_u, blur_sigma) * mask + d_u * (1 - mask)
        d_sag = positive_only(guider, uncond)(degraded + step.x - d_u, step.sigma)
        return step.denoised + (d_u - d_sag) * scale

    return GuidanceHooks(post=[post])


# --- HyperTile ---------------------------------------------------------------------------------------------


def tile_count(side: int, min_tile: int, choices: int, rng: random.Random) -> int:
    """A number of tiles along a side of `side` tokens: side // t for a tile side t that divides `side`,
    among the `choices` smallest such t >= min(min_tile, side), picked with `rng`."""
    low = min(min_tile, side)
    sides = [t for t in range(low, side + 1) if side % t == 0][:max(1, choices)]
    return side // sides[rng.randrange(len(sides))]


def hypertile_patches(tile_size: int, swap_size: int, max_depth: int, scale_depth: bool,
                      seed: int = 0) -> UNetPatches:
    """HyperTile: self-attention at depths 0..max_depth (full latent resolution, then halvings) runs inside
    tiles: the h x w token grid is cut into nh x nw equal tiles, each attending only to itself, which cuts the
    quadratic cost on large images. Tiles are at least tile_size / 8 latent pixels (tile_size >= 32; times
    2^depth with `scale_depth`), and which of the `swap_size` admissible tilings is used changes at random
    with each step and block (seeded from `seed`, the timestep and the block, so runs are reproducible)."""
    latent_tile = max(32, tile_size) // 8

    def wrapper(x: Tensor, kv: Tensor | None, inner: Attend, site: Site) -> Tensor:
        depth = tokens_at_depth(site.latent_shape, site.size, max_depth)
        if kv is not None or depth is None or x.shape[1] != site.size[0] * site.size[1]:  # e.g. merged by ToMe
            return inner(x, kv)
        h, w = site.size
        step = int(site.timesteps.reshape(-1)[0])
        rng = random.Random(f"{seed}:{step}:{site.block[0]}:{site.block[1]}:{site.transformer}")  # stable seed
        factor = 2**depth if scale_depth else 1
        nh = tile_count(h, latent_tile * factor, swap_size, rng)
        nw = tile_count(w, latent_tile * factor, swap_size, rng)
        if nh * nw == 1:
            return inner(x, None)
        b, _, c = x.shape
        th, tw = h // nh, w // nw
        tiles = x.reshape(b, nh, th, nw, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, th * tw, c)
        out = inner(tiles, None)
        return out.reshape(b, nh, nw, th, tw, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, -1)

    return UNetPatches(self_attention=(wrapper,))
