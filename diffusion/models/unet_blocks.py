"""Building blocks of the Stable Diffusion UNet in the original LDM/SGM layout.

Attribute names equal the checkpoint keys of the original single-file releases, so loading is a plain
name match: a ResBlock has `in_layers`, `emb_layers`, `out_layers`, `skip_connection`; a SpatialTransformer
has `norm`, `proj_in`, `transformer_blocks.K`, `proj_out`. `nn.Sequential` indices are part of those keys
(`in_layers.2` is the first conv), which is why parameter-free layers (SiLU, Dropout) stay in the lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..patches.unet_patches import Site, UNetPatches
from .attention import attention, current_key_bias


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B], cosines first then sines.

    Frequency k is max_period^(-k/half) for k in 0..half-1, as in SD's `timestep_embedding`; an odd `dim`
    gets one trailing zero."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


NATIVE_NORM_DTYPES = (torch.bfloat16, torch.float16)


def native_group_norm(x: Tensor) -> bool:
    """Whether torch's own kernel may normalise `x` as it is: on the CPU its 16-bit GroupNorm keeps the mean and
    variance in float32 and rounds once at the end: the values of normalising a float32 copy within one rounding of
    the output (tests/diffusion/test_native_norms.py), without the two full-size dtype copies that made the norms 1.5x
    (a UNet's 64x64 features) to 5x (a VAE's 512x512 ones) slower. Other devices keep the float32 copy."""
    return x.device.type == "cpu" and x.dtype in NATIVE_NORM_DTYPES


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype: the variance of fp16 activations overflows in
    large UNets. On the CPU torch's 16-bit kernel does that itself (`native_group_norm`); elsewhere the input is
    normalised as a float32 copy."""

    def forward(self, x: Tensor) -> Tensor:
        if native_group_norm(x):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


# AnimateDiff v1 was trained on a UNet whose ResBlocks (and last norm) normalise a clip's frames together; while
# `clip_group_norm(frames)` is active those norms do so (`norm_first`), the transformers' norms stay per frame.
_CLIP_FRAMES: ContextVar[int | None] = ContextVar("latentloom_clip_group_norm", default=None)


@contextlib.contextmanager
def clip_group_norm(frames: int) -> Iterator[None]:
    """Within the block, ResBlock norms treat every `frames` consecutive batch rows as one clip."""
    token = _CLIP_FRAMES.set(int(frames))
    try:
        yield
    finally:
        _CLIP_FRAMES.reset(token)


def clip_group_norm_active() -> bool:
    """Whether a `clip_group_norm` block is active (a compiled forward must not run then)."""
    return _CLIP_FRAMES.get() is not None


def norm_first(layers: nn.Sequential, x: Tensor) -> Tensor:
    """`layers(x)` for a Sequential starting with a GroupNorm; under `clip_group_norm` that norm's statistics
    span each clip's frames (x [B*F, C, H, W] seen as [B, C, F, H, W])."""
    # torch.compile cannot trace ContextVar.get: compiled calls never run under clip_group_norm (compile.py's
    # CompiledForward sends those to the eager forward, see clip_group_norm_active)
    frames = None if torch.compiler.is_compiling() else _CLIP_FRAMES.get()
    if not frames:
        return layers(x)
    norm = layers[0]
    if x.shape[0] % frames:
        raise ValueError(f"batch {x.shape[0]} is not a whole number of {frames}-frame clips")
    clip = x.reshape(x.shape[0] // frames, frames, *x.shape[1:]).transpose(1, 2)
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    out = F.group_norm(clip.float(), norm.num_groups, weight, bias, norm.eps).to(x.dtype)
    return layers[1:](out.transpose(1, 2).reshape(x.shape))


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between; 1x1 skip conv when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = norm_first(self.in_layers, x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + norm_first(self.out_layers, h)


class Downsample(nn.Module):
    """Halves the resolution with a strided 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    `size` lets the UNet upsample to the exact size of the matching skip connection, so latents whose sides
    are not multiples of 2^levels still work (a plain x2 would be one pixel too large after an odd side)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (over x itself when context is None); `value`, when given, is
    what the values are projected from instead of `context` (hypernetworks transform the two apart)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        value = context if value is None else value
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(value)
        # [B, N, heads*d] -> [B, heads, N, d]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = None if torch.compiler.is_compiling() else current_key_bias()  # a conditioning's attention_bias
        if bias is not None:
            bias = bias.to(q.dtype)[:, None, None, :]
        out = attention(q, k, v, bias=bias)  # SDPA; split along the queries where its scores would not fit
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Linear projection to twice the width; one half gates the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, self_attention: Callable[[Tensor], Tensor] | None = None,
                after_self_attention: Callable[[Tensor], Tensor] | None = None,
                kv: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]] | None = None,
                after_cross_attention: Callable[[Tensor, Tensor], Tensor] | None = None,
                cross_attention: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """`self_attention` (model patches) replaces the call of attn1 on the normed input when given;
        `after_self_attention` (GLIGEN's fusers) transforms x between the self- and the cross-attention;
        `kv(attention, source)` (hypernetworks) gives each attention its keys' and values' inputs;
        `after_cross_attention(out, normed x)` (IP-Adapter) changes the cross-attention's output;
        `cross_attention(n, context)` (model patches) replaces the call of attn2 when given."""
        n = self.norm1(x)
        if self_attention is not None:
            x = x + self_attention(n)
        else:
            x = x + (self.attn1(n) if kv is None else self.attn1(n, *kv(self.attn1, n)))
        if after_self_attention is not None:
            x = after_self_attention(x)
        n = self.norm2(x)
        if cross_attention is not None:
            out = cross_attention(n, context)
        else:
            out = self.attn2(n, context) if kv is None else self.attn2(n, *kv(self.attn2, context))
        if after_cross_attention is not None:
            out = after_cross_attention(out, n)
        x = x + out
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the H*W positions of a feature map.

    SD1 projects in/out with 1x1 convs before flattening; SD2 and SDXL (`use_linear`) flatten first and use
    linear layers. The weights hold the same numbers either way, only their shapes differ."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        groups: int,
        use_linear: bool,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor, patches: UNetPatches | None = None,
                site: Site | None = None) -> Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        for k, block in enumerate(self.transformer_blocks):
            run = after = kv = cross = cross_run = None
            if patches and site is not None:
                run = patches.attention_runner(block.attn1, dataclasses.replace(site, size=(h, w), transformer=k))
                if patches.after_self_attention:
                    block_site = dataclasses.replace(site, size=(h, w), transformer=k, attention=block.attn1)
                    after = functools.partial(patches.run_after_self_attention, site=block_site)
                kv = patches.kv_inputs(dataclasses.replace(site, size=(h, w), transformer=k))
                if patches.cross_attention_out:
                    cross_site = dataclasses.replace(site, size=(h, w), transformer=k, attention=block.attn2)
                    cross = functools.partial(patches.run_cross_attention_out, site=cross_site)
                cross_run = patches.cross_attention_runner(
                    block.attn2, dataclasses.replace(site, size=(h, w), transformer=k))
            x = block(x, context, run, after, kv, cross, cross_run)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: layers run in order, each given what it needs (time embedding, context, target size)."""

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None,
        patches: UNetPatches | None = None, site: Site | None = None,
    ) -> Tensor:
        features = self._features_index() if patches and patches.block_features and site is not None else -1
        for i, layer in enumerate(self):
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, patches, site)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
            if i == features:  # the `block_features` hook point (see unet_patches.py)
                x = patches.run_block_features(x, site)
        return x

    def _features_index(self) -> int:
        """The layer after which `block_features` hooks run: the last SpatialTransformer of the first
        ResBlock's group, else that ResBlock; -1 in blocks without a ResBlock (the stem conv, a Downsample)."""
        layers = list(self)
        first = next((i for i, layer in enumerate(layers) if isinstance(layer, ResBlock)), -1)
        if first < 0:
            return -1
        i = first
        while i + 1 < len(layers) and isinstance(layers[i + 1], SpatialTransformer):
            i += 1
        return i
