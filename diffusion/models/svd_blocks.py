"""Building blocks of the Stable Video Diffusion UNet (Stability's `VideoUNet`), in the original single-file layout.

SVD is the SD2-style UNet with a temporal twin beside each spatial layer: every ResBlock carries `time_stack`
(a ResBlock whose convs are 3x1x1 over the frame axis) and every SpatialTransformer carries `time_stack.K`
(transformer blocks whose tokens are the frames at one pixel) plus `time_pos_embed` (a frame-index embedding).
Each pair is blended by `time_mixer.mix_factor`: out = a * spatial + (1 - a) * temporal, a = sigmoid(mix_factor)
(1 for rows marked image-only). Attribute names equal the checkpoint keys of `model.diffusion_model.*`, so a
file loads with a plain name match. A batch here is `clips * frames` rows, the frames of a clip consecutive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .unet_blocks import CrossAttention, FeedForward, GroupNorm32, ResBlock, SpatialTransformer, timestep_embedding


def as_clips(x: Tensor, frames: int) -> Tensor:
    """[B*F, C, ...] -> [B, C, F, ...]: the frame axis next to the spatial ones, for the 3-D convs."""
    if x.shape[0] % frames:
        raise ValueError(f"batch {x.shape[0]} is not a whole number of {frames}-frame clips")
    return x.reshape(x.shape[0] // frames, frames, *x.shape[1:]).transpose(1, 2)


def from_clips(x: Tensor) -> Tensor:
    """[B, C, F, ...] -> [B*F, C, ...] (the inverse of `as_clips`)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


class AlphaBlender(nn.Module):
    """`mix_factor` m: spatial and temporal outputs blended with a = sigmoid(m) on the spatial side. Rows that
    `image_only` [B, F] marks (1) keep the spatial output alone (a = 1), as SVD's "learned_with_images" merge."""

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def alpha(self, image_only: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        """The per-row weight shaped to broadcast against `shape` ([B, C, F, H, W] or [B*F, N, C])."""
        a = torch.sigmoid(self.mix_factor.float())
        if image_only is None:
            return a
        a = torch.where(image_only.bool(), torch.ones_like(a), a)  # [B, F]
        if len(shape) == 5:
            return a[:, None, :, None, None]
        return a.reshape(-1, 1, 1)

    def forward(self, spatial: Tensor, temporal: Tensor, image_only: Tensor | None = None) -> Tensor:
        a = self.alpha(image_only, tuple(spatial.shape)).to(spatial.dtype)
        return a * spatial + (1.0 - a) * temporal


class TemporalResBlock(nn.Module):
    """A ResBlock over [B, C, F, H, W] whose convs see 3 frames and 1 pixel (`kernel` 3x1x1); the time embedding
    comes per frame ([B, F, emb]). Same key names as the spatial ResBlock (`in_layers`, `emb_layers`, ...);
    `emb_channels` None: no time embedding (the autoencoder's, which has no `emb_layers`)."""

    def __init__(self, channels: int, emb_channels: int | None, groups: int,
                 kernel: tuple[int, int, int] = (3, 1, 1)):
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv3d(channels, channels, kernel, padding=padding))
        if emb_channels is not None:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv3d(channels, channels, kernel, padding=padding))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.in_layers(x)
        if emb is not None:
            h = h + self.emb_layers(emb).to(h.dtype).transpose(1, 2)[..., None, None]  # [B, F, C] -> [B, C, F, 1, 1]
        return x + self.out_layers(h)


class VideoResBlock(ResBlock):
    """The spatial ResBlock, then its temporal twin `time_stack` on the result, blended by `time_mixer`."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int,
                 kernel: tuple[int, int, int] = (3, 1, 1)):
        super().__init__(channels, emb_channels, out_channels, groups)
        self.time_stack = TemporalResBlock(out_channels, emb_channels, groups, kernel)
        self.time_mixer = AlphaBlender()

    def forward(self, x: Tensor, emb: Tensor, frames: int = 1, image_only: Tensor | None = None) -> Tensor:
        h = super().forward(x, emb)
        spatial = as_clips(h, frames)
        temporal = self.time_stack(spatial, emb.reshape(spatial.shape[0], frames, -1))
        return from_clips(self.time_mixer(spatial, temporal, image_only))


class VideoTransformerBlock(nn.Module):
    """Attention over the frames at each pixel: a GEGLU feed-forward in (`ff_in`, residual), self-attention,
    cross-attention on the clip's first-frame context, a feed-forward out; each pre-normed."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, frames: int) -> Tensor:
        """x [B*F, N, C] (N pixels), context [B*N, T, D] -> [B*F, N, C]."""
        rows, n, c = x.shape
        clips = rows // frames
        x = x.reshape(clips, frames, n, c).transpose(1, 2).reshape(clips * n, frames, c)
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x.reshape(clips, n, frames, c).transpose(1, 2).reshape(rows, n, c)


class SpatialVideoTransformer(SpatialTransformer):
    """A SpatialTransformer whose every block K is followed by `time_stack.K` over the frames (inputs offset by
    `time_pos_embed` of the frame index), the two blended by `time_mixer`. The temporal blocks attend to each
    clip's first-frame context, as SVD was trained."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int,
                 use_linear: bool):
        super().__init__(channels, heads, dim_head, depth, context_dim, groups, use_linear)
        inner = heads * dim_head
        if inner != channels:
            raise ValueError(f"SVD transformer: heads x head width ({inner}) must equal the channels ({channels})")
        self.time_stack = nn.ModuleList(VideoTransformerBlock(inner, heads, dim_head, context_dim)
                                        for _ in range(depth))
        self.time_pos_embed = nn.Sequential(nn.Linear(channels, 4 * channels), nn.SiLU(),
                                            nn.Linear(4 * channels, channels))
        self.time_mixer = AlphaBlender()

    def forward(self, x: Tensor, context: Tensor, frames: int = 1, image_only: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        clips = b // frames
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B*F, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        first = context.reshape(clips, frames, *context.shape[1:])[:, 0]  # [clips, T, D]
        time_context = first.repeat_interleave(h * w, dim=0)  # [clips*H*W, T, D]
        index = torch.arange(frames, device=x.device).repeat(clips)
        pos = self.time_pos_embed(timestep_embedding(index, c).to(x.dtype))[:, None, :]
        for block, temporal in zip(self.transformer_blocks, self.time_stack, strict=True):
            x = block(x, context)
            mixed = temporal(x + pos, time_context, frames)
            x = self.time_mixer(x, mixed, image_only)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
