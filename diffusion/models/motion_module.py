"""AnimateDiff motion modules: temporal transformers that attend over the frame axis of a batch of latents.

A motion module file (v1, v2, v3 for SD1.x, the SDXL beta) holds one "VanillaTemporalModule" per UNet
stage: `down_blocks.L.motion_modules.J` after the J-th ResBlock (and its transformer) of input level L,
`up_blocks.L.motion_modules.J` after the J-th block of output level L (before its upsampler) and, in v2,
`mid_block.motion_modules.0` after the middle transformer. Attribute names here equal those keys, so a file
loads with `load_state_dict(strict=True)`.

Each module normalises the feature map per frame (GroupNorm over [C, H, W] of every frame, as the original
AnimateDiff code that trained the released files does), projects it, and runs transformer blocks whose
attentions mix only the frames at one pixel: tokens are the F frames, with a sinusoidal position encoding
(`pe`, stored in the files) added before each attention. The output is added to the input (residual), so a
module whose `proj_out` is zero changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet_blocks import FeedForward


@dataclass(frozen=True)
class MotionConfig:
    """Shape of a motion module set: `channels` per level (input side, level 0 first), modules per level on
    the input (`down_per_level`) and output (`up_per_level`) sides, whether the middle block has one, the
    position encoding's length (the longest clip the module can see at once), heads (8 in every release),
    transformer blocks per module, and the `version` detected from the file."""

    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_per_level: int = 2
    up_per_level: int = 3
    mid: bool = False
    max_len: int = 24
    heads: int = 8
    blocks: int = 1
    version: str = "v1"
    groups: int = 32


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """[1, length, dim]: even channels sin(p * w_k), odd channels cos(p * w_k), w_k = 10000^(-2k/dim), the
    encoding AnimateDiff adds before each temporal attention (and stores as `pe`)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * freqs)
    pe[0, :, 1::2] = torch.cos(position * freqs[: dim // 2])
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_len, dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"motion module sees {x.shape[1]} frames at once but its position encoding covers "
                             f"{self.pe.shape[1]}; use context options with context_length <= {self.pe.shape[1]}")
        return x + self.pe[:, : x.shape[1]].to(x)


class TemporalAttention(nn.Module):
    """Self-attention across frames at each pixel: x [B*F, N, C] is regrouped to [B*N, F, C]."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        bf, n, c = x.shape
        b = bf // frames
        x = x.reshape(b, frames, n, c).transpose(1, 2).reshape(b * n, frames, c)
        x = self.pos_encoder(x)
        q, k, v = (t.reshape(b * n, frames, self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(x),
                                                                                         self.to_v(x)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, frames, c)
        out = self.to_out(out)
        return out.reshape(b, n, frames, c).transpose(1, 2).reshape(bf, n, c)


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal attentions (two in every release), then a GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, max_len: int, attentions: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, max_len) for _ in range(attentions))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(attentions))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attention(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, blocks: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, max_len) for _ in range(blocks))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        """x [B*F, C, H, W] (B clips of F frames, frames of a clip consecutive) -> same shape."""
        bf, c, h, w = x.shape
        if bf % frames:
            raise ValueError(f"motion module: batch {bf} is not a whole number of {frames}-frame clips")
        residual = x
        x = F.group_norm(x.float(), self.norm.num_groups, self.norm.weight.float(), self.norm.bias.float(),
                         self.norm.eps).to(x.dtype)
        x = self.proj_in(x.permute(0, 2, 3, 1).reshape(bf, h * w, c))
        for block in self.transformer_blocks:
            x = block(x, frames)
        x = self.proj_out(x)
        return x.reshape(bf, h, w, c).permute(0, 3, 1, 2) + residual


class VanillaTemporalModule(nn.Module):
    def __init__(self, channels: int, config: MotionConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3DModel(channels, config.heads, config.max_len,
                                                               config.blocks, config.groups)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        return self.temporal_transformer(x, frames)


class _Stage(nn.Module):
    """One level's modules, under the key `motion_modules` as in the files."""

    def __init__(self, channels: int, count: int, config: MotionConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList(VanillaTemporalModule(channels, config) for _ in range(count))


class MotionModuleSet(nn.Module):
    """All motion modules of one file: `module_at(side, level, index)` is the one to run there."""

    def __init__(self, config: MotionConfig):
        super().__init__()
        self.config = config
        c = config
        self.down_blocks = nn.ModuleList(_Stage(ch, c.down_per_level, c) for ch in c.channels)
        self.up_blocks = nn.ModuleList(_Stage(ch, c.up_per_level, c) for ch in reversed(c.channels))
        if c.mid:
            self.mid_block = _Stage(c.channels[-1], 1, c)

    def module_at(self, side: str, level: int, index: int) -> VanillaTemporalModule | None:
        """side "down" | "up" | "mid"; `level` counts from the outermost level on the down side and from the
        innermost on the up side (the files' numbering); None where this set has no module."""
        if side == "mid":
            return self.mid_block.motion_modules[0] if self.config.mid else None
        stages = self.down_blocks if side == "down" else self.up_blocks
        if level >= len(stages) or index >= len(stages[level].motion_modules):
            return None
        return stages[level].motion_modules[index]
