"""Patches of the UNet's forward pass (FreeU, deep shrink, attention patches), carried by a MODEL clone.

A `UNetPatches` is a frozen bundle of hooks that `UNetModel.forward` calls at fixed points; the UNet's
weights are never copied or changed, so the same module runs with and without patches and a clone of a
MODEL carries its own bundle. The hook points, in forward order:

- `input_block(h, site)` after input block i, before its output is kept as a skip connection;
- `input_block_after_skip(h, site)` after the skip is kept (changes only what the next block sees);
- `output_block(h, skip, site)` before output block i concatenates the backbone `h` with its `skip`;
- `self_attention(x, kv, inner, site)` around every transformer block's self-attention: `x` is the normed
  [B, tokens, C] input the queries come from, `kv` what keys and values come from (None: x itself),
  `inner(x, kv)` runs the attention (or the next wrapper), so wrappers nest in order;
- `after_self_attention(x, site)` in every transformer block after the self-attention's residual is added,
  before the cross-attention (GLIGEN's gated self-attention runs there); `x` is the block's [B, tokens, C].
- `cross_attention(x, context, inner, site)` around every transformer block's cross-attention, as
  `self_attention` is around the self-attention: `x` the normed tokens, `context` the text context, `inner`
  the cross-attention (or the next wrapper); ComfyUI's attn2 patches run there (comfy_options.py).
- `cross_attention_out(out, x, site)` in every transformer block after its cross-attention: `out` is what the
  cross-attention returns (before its residual is added), `x` the normed [B, tokens, C] its queries come from,
  `site.attention` the cross-attention module; returns the new `out` (IP-Adapter adds its image attention).
- `attention_kv(k_in, v_in, site)` in every attention (self and cross; `site.attention` is the module) on
  what its keys and values are projected from: `k_in`, `v_in` [B, tokens, C] (both the normed x for
  self-attention, both the text context for cross-attention); hooks chain, each taking the last one's pair
  (hypernetworks).
- `block_features(h, site)` in every input, middle and output block holding a ResBlock, right after its last
  SpatialTransformer (or its ResBlock where it has none): before an output block's Upsample, before the
  middle block's second ResBlock (AnimateDiff's motion modules run there).

Every hook gets a `Site` saying where it runs (block kind and index, transformer index, the feature map's
size, the latent's shape and the timesteps), which is how a patch picks its blocks without knowing the
architecture. Two bundles merge by concatenating their hook lists: patches compose.

`uncond_rows()` says, during a UNet call made by a guider, which batch rows evaluate the negative
(unconditional) list: patches that treat the two halves apart (IP-Adapter's negative image tokens) read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Site:
    """Where a hook runs: `block` ("input" | "middle" | "output", index), `transformer` (index of the
    transformer block inside a SpatialTransformer, -1 outside attention), `size` (h, w) of the current
    feature map, `latent_shape` of the UNet's input, the (network) `timesteps` [B] and, when the caller
    knows them, the sampler's `sigmas` [B]."""

    block: tuple[str, int]
    latent_shape: tuple[int, ...]
    timesteps: Tensor
    size: tuple[int, int] = (0, 0)
    transformer: int = -1
    attention: torch.nn.Module | None = None
    sigmas: Tensor | None = None


BlockHook = Callable[[Tensor, Site], Tensor]
OutputHook = Callable[[Tensor, Tensor, Site], tuple[Tensor, Tensor]]
Attend = Callable[[Tensor, Tensor | None], Tensor]  # (queries' input, keys' and values' input or None) -> out
AttentionWrapper = Callable[[Tensor, Tensor | None, Attend, Site], Tensor]
KVHook = Callable[[Tensor, Tensor, Site], tuple[Tensor, Tensor]]  # (keys' input, values' input, site) -> both
CrossOutHook = Callable[[Tensor, Tensor, Site], Tensor]  # (cross-attention output, its queries' input, site) -> out

# One flag per batch row of the UNet call in progress: True where the row evaluates the negative list. Set by the
# guider around each call (`batch_roles`); None outside a guider (every row then counts as conditional).
_UNCOND_ROWS: ContextVar[tuple[bool, ...] | None] = ContextVar("latentloom_uncond_rows", default=None)
# How many consecutive rows one conditioning entry evaluates in that call (the latent's batch), or None.
_CHUNK: ContextVar[int | None] = ContextVar("latentloom_batch_chunk", default=None)


@contextlib.contextmanager
def batch_roles(uncond: tuple[bool, ...], chunk: int | None = None) -> Iterator[None]:
    """Within the block, `uncond_rows()` is `uncond` (one flag per batch row of the next UNet calls) and each
    `chunk` consecutive rows belong to one conditioning entry (`cond_or_uncond()`)."""
    token = _UNCOND_ROWS.set(tuple(uncond))
    chunk_token = _CHUNK.set(chunk)
    try:
        yield
    finally:
        _CHUNK.reset(chunk_token)
        _UNCOND_ROWS.reset(token)


def cond_or_uncond() -> list[int] | None:
    """ComfyUI's `cond_or_uncond` of the UNet call in progress: one entry per conditioning entry evaluated in
    the batch (0 positive, 1 negative), in batch order; None when no guider said (packs split the batch into
    this many equal chunks)."""
    flags, chunk = _UNCOND_ROWS.get(), _CHUNK.get()
    if flags is None or not chunk:
        return None
    return [int(flags[i]) for i in range(0, len(flags), chunk)]


def uncond_rows() -> tuple[bool, ...] | None:
    """The guider's flags of the UNet call in progress (True: a negative row), or None when no guider said."""
    return _UNCOND_ROWS.get()


@dataclass(frozen=True)
class UNetPatches:
    """Hooks of one UNet call; empty by default (a forward without patches is the plain UNet)."""

    input_block: tuple[BlockHook, ...] = ()
    input_block_after_skip: tuple[BlockHook, ...] = ()
    output_block: tuple[OutputHook, ...] = ()
    self_attention: tuple[AttentionWrapper, ...] = ()
    attention_kv: tuple[KVHook, ...] = ()
    after_self_attention: tuple[BlockHook, ...] = ()
    cross_attention_out: tuple[CrossOutHook, ...] = ()
    block_features: tuple[BlockHook, ...] = ()
    cross_attention: tuple[AttentionWrapper, ...] = ()

    def merged(self, other: UNetPatches | None) -> UNetPatches:
        """Both bundles' hooks, this one's first."""
        if other is None:
            return self
        return UNetPatches(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def run_input(self, h: Tensor, site: Site, after_skip: bool = False) -> Tensor:
        for hook in self.input_block_after_skip if after_skip else self.input_block:
            h = hook(h, site)
        return h

    def run_output(self, h: Tensor, skip: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        for hook in self.output_block:
            h, skip = hook(h, skip, site)
        return h, skip

    def run_after_self_attention(self, x: Tensor, site: Site) -> Tensor:
        for hook in self.after_self_attention:
            x = hook(x, site)
        return x

    def run_block_features(self, h: Tensor, site: Site) -> Tensor:
        for hook in self.block_features:
            h = hook(h, site)
        return h

    def run_cross_attention_out(self, out: Tensor, x: Tensor, site: Site) -> Tensor:
        for hook in self.cross_attention_out:
            out = hook(out, x, site)
        return out

    def run_kv(self, k_in: Tensor, v_in: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        for hook in self.attention_kv:
            k_in, v_in = hook(k_in, v_in, site)
        return k_in, v_in

    def kv_inputs(self, site: Site) -> Callable[[torch.nn.Module, Tensor], tuple[Tensor, Tensor]] | None:
        """`kv(attention, source)`: the (keys' input, values' input) pair of `attention` whose keys and values
        come from `source`, through every `attention_kv` hook; None when there are none."""
        if not self.attention_kv:
            return None
        return lambda attention, source: self.run_kv(source, source, dataclasses.replace(site, attention=attention))

    def cross_attention_runner(self, attention: torch.nn.Module, site: Site) -> Attend | None:
        """`run(x, context)`: the cross-attention `attention` wrapped by every `cross_attention` wrapper (the first
        outermost; the innermost projects keys and values through the `attention_kv` hooks), or None when there
        are none."""
        if not self.cross_attention:
            return None
        site = dataclasses.replace(site, attention=attention)

        def run(x: Tensor, context: Tensor | None = None) -> Tensor:
            source = x if context is None else context
            return attention(x, *self.run_kv(source, source, site)) if self.attention_kv else attention(x, source)

        def wrap(wrapper: AttentionWrapper, inner: Attend) -> Attend:
            return lambda x, context=None: wrapper(x, context, inner, site)

        for wrapper in reversed(self.cross_attention):
            run = wrap(wrapper, run)
        return run

    def attention_runner(self, attention: torch.nn.Module, site: Site) -> Attend | None:
        """`run(x)`: the self-attention `attention(x)` wrapped by every wrapper (the first outermost), or None
        when there are none (the block calls its attention directly)."""
        if not self.self_attention:
            return None
        site = dataclasses.replace(site, attention=attention)
        run: Attend = attention
        if self.attention_kv:  # the innermost call projects keys and values from the hooks' inputs
            def run(x: Tensor, kv: Tensor | None = None) -> Tensor:
                source = x if kv is None else kv
                return attention(x, *self.run_kv(source, source, site))

        def wrap(wrapper: AttentionWrapper, inner: Attend) -> Attend:
            return lambda x, kv=None: wrapper(x, kv, inner, site)

        for wrapper in reversed(self.self_attention):
            run = wrap(wrapper, run)
        return run


# --- FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net") ---------------------------------------


def fourier_low_pass_scale(x: Tensor, scale: float, threshold: int = 1) -> Tensor:
    """Scales the lowest spatial frequencies of x [B, C, H, W] by `scale`, leaving the others.

    With X = fftshift(FFT2(x)) (the zero frequency moved to (H//2, W//2)), the window
    rows H//2 - t .. H//2 + t - 1, columns W//2 - t .. W//2 + t - 1 is multiplied by `scale`, and the result
    is the real part of IFFT2(ifftshift(X)). FreeU applies it to skip features with t = 1: the skip path
    carries mostly high-frequency detail, and damping its low frequencies lets the backbone's denoising
    dominate there."""
    dtype = x.dtype
    freq = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    h, w = x.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    ch, cw = h // 2, w // 2
    mask[max(ch - threshold, 0):ch + threshold, max(cw - threshold, 0):cw + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifft2(freq).real.to(dtype)


def freeu_patches(model_channels: int, b1: float, b2: float, s1: float, s2: float, v2: bool = False) -> UNetPatches:
    """FreeU on the decoder stages whose backbone is 4x (b1, s1) and 2x (b2, s2) `model_channels` wide.

    The backbone's first half of channels is multiplied by b (V1) or, in V2 (the paper's structure-related
    form), by 1 + (b - 1) * m, where m is the channel-mean of the backbone min-max normalised to 0..1 per
    sample; the skip features get their lowest frequencies scaled by s (`fourier_low_pass_scale`)."""
    scales = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def hook(h: Tensor, skip: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        scale = scales.get(int(h.shape[1]))
        if scale is None:
            return h, skip
        b, s = scale
        half = h.shape[1] // 2
        if v2:
            mean = h.mean(1, keepdim=True)
            flat = mean.flatten(1)
            low = flat.min(1).values[:, None, None, None]
            high = flat.max(1).values[:, None, None, None]
            norm = (mean - low) / (high - low).clamp_min(torch.finfo(mean.dtype).tiny)
            factor = (b - 1) * norm + 1
        else:
            factor = b
        h = torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)
        return h, fourier_low_pass_scale(skip, s)

    return UNetPatches(output_block=(hook,))


# --- Kohya's deep shrink ("PatchModelAddDownscale") -------------------------------------------------------

RESIZE_METHODS = ("bicubic", "nearest-exact", "bilinear", "area", "bislerp")


def resize(x: Tensor, size: tuple[int, int], method: str) -> Tensor:
    """x [B, C, H, W] resized to `size` with one of RESIZE_METHODS. `bislerp` interpolates bilinearly, but
    spherically between the channel vectors of neighbouring pixels (their norm interpolated linearly), so
    feature directions are not shrunk by averaging."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if method == "bislerp":
        return _bislerp(x, size)
    kwargs = {"align_corners": False} if method in ("bicubic", "bilinear") else {}
    return F.interpolate(x, size=size, mode=method, **kwargs)


def _slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of channel vectors a, b [..., C] by t [..., 1]; magnitudes interpolate linearly."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so
    linear = ua * (1 - t) + ub * t  # nearly parallel vectors: slerp degenerates to lerp
    direction = torch.where(omega < 1e-4, linear, direction)
    return direction * (na * (1 - t) + nb * t)


def _bislerp_axis(x: Tensor, new: int, dim: int) -> Tensor:
    """Slerp resampling of x [B, C, H, W] along `dim` (2 or 3) to `new` samples, half-pixel centres."""
    old = x.shape[dim]
    pos = ((torch.arange(new, dtype=torch.float32, device=x.device) + 0.5) * old / new - 0.5).clamp(0, old - 1)
    low = pos.floor().long()
    high = (low + 1).clamp(max=old - 1)
    t = (pos - low).to(x.dtype)
    moved = x.movedim(1, -1)  # channels last
    a, b = moved.index_select(dim - 1, low), moved.index_select(dim - 1, high)
    shape = [1] * moved.ndim
    shape[dim - 1] = new
    return _slerp(a, b, t.reshape(shape)).movedim(-1, 1)


def _bislerp(x: Tensor, size: tuple[int, int]) -> Tensor:
    return _bislerp_axis(_bislerp_axis(x.float(), size[0], 2), size[1], 3).to(x.dtype)


def deep_shrink_patches(block_number: int, factor: float, sigma_start: float, sigma_end: float,
                        sigma_of: Callable[[Tensor], Tensor], after_skip: bool = True,
                        downscale_method: str = "bicubic", upscale_method: str = "bicubic") -> UNetPatches:
    """Kohya's deep shrink: while sigma_end <= sigma <= sigma_start, the hidden state after input block
    `block_number` is resized by 1 / `factor` (so the deep blocks see a small image, whose composition they
    learnt, and the outer blocks add the detail of the large one); an output block whose backbone then
    differs in size from its skip resizes the backbone to the skip's size. `sigma_of(timesteps)` is the
    model's timestep -> sigma map, used when the UNet is not told the sampler's sigma. With `after_skip` the
    full-size hidden state is kept as the skip."""
    for method in (downscale_method, upscale_method):
        if method not in RESIZE_METHODS:
            raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
    if factor <= 0:
        raise ValueError(f"deep shrink downscale_factor must be > 0, got {factor}")

    def down(h: Tensor, site: Site) -> Tensor:
        if site.block != ("input", block_number):
            return h
        if site.sigmas is not None:
            sigma = float(torch.as_tensor(site.sigmas).reshape(-1)[0])
        else:  # the sigma of the (quantized) timestep
            sigma = float(sigma_of(site.timesteps.reshape(-1)[:1].float().cpu()))
        if not sigma_end <= sigma <= sigma_start:
            return h
        size = (max(1, round(h.shape[-2] / factor)), max(1, round(h.shape[-1] / factor)))
        return resize(h, size, downscale_method)

    def up(h: Tensor, skip: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        if h.shape[-2:] != skip.shape[-2:]:
            h = resize(h, tuple(skip.shape[-2:]), upscale_method)
        return h, skip

    if after_skip:
        return UNetPatches(input_block_after_skip=(down,), output_block=(up,))
    return UNetPatches(input_block=(down,), output_block=(up,))


def tokens_at_depth(latent_shape: tuple[int, ...], size: tuple[int, int], max_depth: int) -> int | None:
    """The depth d <= max_depth (0 = full latent resolution) at which a feature map of `size` sits, from its
    token count h*w == (H / 2^d)(W / 2^d); None for deeper maps."""
    full = latent_shape[-2] * latent_shape[-1]
    for d in range(max_depth + 1):
        if math.isclose(size[0] * size[1], full / 4**d):
            return d
    return None
