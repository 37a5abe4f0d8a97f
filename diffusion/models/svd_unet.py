"""The spatio-temporal UNet of Stable Video Diffusion (SVD and SVD-XT: one architecture, trained for 14 and 25
frames), in Stability's single-file layout (`model.diffusion_model.*`, prefix stripped).

Its spatial skeleton is the SD2-style UNet (linear transformer projections, 64-wide heads, a 1024-wide context:
the CLIP ViT-H image embedding as a one-token context), 8 input channels (the noisy latent and the VAE latent of
the conditioning image, concatenated) and an ADM vector of 3 x 256 sinusoidal embeddings: (fps - 1,
motion_bucket_id, augmentation level), in that order (`svd_adm`). Every layer has a temporal twin (svd_blocks.py).
The network is an EDM v-predictor: c_noise = ln(sigma) / 4 (sampling/model_sampling.py, ContinuousModelSampling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .svd_blocks import SpatialVideoTransformer, VideoResBlock
from .unet import UNetConfig
from .unet_blocks import Downsample, GroupNorm32, Upsample, timestep_embedding

SVD_MARKER = "input_blocks.1.0.time_stack.in_layers.0.weight"  # in no image UNet
ADM_VALUES = 3  # fps - 1, motion bucket, augmentation level


@dataclass(frozen=True)
class SVDUNetConfig(UNetConfig):
    """UNetConfig with SVD's defaults (the real model's numbers) and the temporal conv kernel."""

    in_channels: int = 8
    context_dim: int = 1024
    num_heads: int = -1
    num_head_channels: int = 64
    use_linear_in_transformer: bool = True
    adm_in_channels: int | None = 768
    video_kernel: tuple[int, int, int] = (3, 1, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adm_in_channels is None or self.adm_in_channels % (2 * ADM_VALUES):
            raise ValueError(f"SVD UNet: the ADM input must be {ADM_VALUES} even-width embeddings, got "
                             f"adm_in_channels={self.adm_in_channels}")

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], *, num_heads: int | None = None,
                        num_head_channels: int | None = None, norm_groups: int | None = None) -> SVDUNetConfig:
        """The spatial skeleton is read as for any UNet (unet.py); the temporal kernel from `time_stack`'s conv.
        Heads default to 64 channels each (the real model's)."""
        if SVD_MARKER not in sd:
            raise ValueError(f"not an SVD UNet: missing key {SVD_MARKER!r}")
        if num_heads is None and num_head_channels is None:
            num_head_channels = 64
        base = UNetConfig.from_state_dict(sd, num_heads=num_heads, num_head_channels=num_head_channels,
                                          norm_groups=norm_groups)
        kernel = tuple(int(k) for k in sd[SVD_MARKER.replace(".0.weight", ".2.weight")].shape[2:])
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(UNetConfig)}
        return cls(**fields, video_kernel=kernel)


def svd_adm(fps: float | Tensor, motion_bucket_id: float | Tensor, augmentation: float | Tensor,
            width: int = 768) -> Tensor:
    """[1, width]: sinusoidal embeddings (cosines first) of fps - 1, the motion bucket and the augmentation level,
    each width / 3 wide — SVD's `added_time_ids` (diffusers subtracts 1 from fps in its pipeline, ComfyUI in its
    model; both feed fps - 1)."""
    values = torch.tensor([[float(fps) - 1.0, float(motion_bucket_id), float(augmentation)]])
    return timestep_embedding(values.flatten(), width // ADM_VALUES).reshape(1, width)


class SVDUNet(nn.Module):
    """`forward(x, timesteps, context, y, frames)`: x [B*F, in_channels, H, W] (clips of `frames` consecutive rows),
    timesteps [B*F] (EDM's ln(sigma)/4), context [B*F, T, context_dim], y [B*F, adm_in_channels]. Builds no
    buffers, so it can be made on the meta device."""

    def __init__(self, config: SVDUNetConfig):
        super().__init__()
        c = config
        self.config = c
        mc, ted, groups = c.model_channels, c.time_embed_dim, c.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skips = [mc]
        ch = mc
        last = len(c.channel_mult) - 1
        for level, (mult, depth) in enumerate(zip(c.channel_mult, c.transformer_depth, strict=True)):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [self._res(ch, mult * mc)]
                ch = mult * mc
                if depth > 0:
                    layers.append(self._transformer(ch, depth))
                self.input_blocks.append(nn.Sequential(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                skips.append(ch)

        self.middle_block = nn.Sequential(self._res(ch, ch), self._transformer(ch, c.transformer_depth_middle),
                                          self._res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            mult, depth = c.channel_mult[level], c.transformer_depth[level]
            for i in range(c.num_res_blocks + 1):
                layers = [self._res(ch + skips.pop(), mult * mc)]
                ch = mult * mc
                if depth > 0:
                    layers.append(self._transformer(ch, depth))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))

    def _res(self, channels: int, out_channels: int) -> VideoResBlock:
        c = self.config
        return VideoResBlock(channels, c.time_embed_dim, out_channels, c.norm_groups, c.video_kernel)

    def _transformer(self, channels: int, depth: int) -> SpatialVideoTransformer:
        c = self.config
        heads, dim_head = c.head_layout(channels)
        return SpatialVideoTransformer(channels, heads, dim_head, depth, c.context_dim, c.norm_groups,
                                       c.use_linear_in_transformer)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor, frames: int,
                image_only: Tensor | None = None) -> Tensor:
        """`image_only` [B, F] (1: that row is a still image, its temporal layers bypassed); None: all video."""
        self._check_inputs(x, context, y, frames)
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        emb = emb + self.label_emb(y.to(emb.dtype))
        context = context.to(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, frames, image_only)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, frames, image_only)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, h, emb, context, frames, image_only, size)
        return self.out(h)

    @staticmethod
    def _run(block: nn.Sequential, h: Tensor, emb: Tensor, context: Tensor, frames: int, image_only: Tensor | None,
             size: tuple[int, int] | None = None) -> Tensor:
        for layer in block:
            if isinstance(layer, VideoResBlock):
                h = layer(h, emb, frames, image_only)
            elif isinstance(layer, SpatialVideoTransformer):
                h = layer(h, context, frames, image_only)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h

    def _check_inputs(self, x: Tensor, context: Tensor, y: Tensor, frames: int) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"SVD UNet input must be [B*frames, {c.in_channels}, H, W] (latent and conditioning "
                             f"latent), got {list(x.shape)}")
        if frames < 1 or x.shape[0] % frames:
            raise ValueError(f"SVD UNet: batch {x.shape[0]} is not a whole number of {frames}-frame clips")
        if context.ndim != 3 or context.shape[-1] != c.context_dim or context.shape[0] != x.shape[0]:
            raise ValueError(f"SVD UNet context must be [{x.shape[0]}, T, {c.context_dim}] (CLIP image embeddings), "
                             f"got {list(context.shape)}")
        if y.ndim != 2 or y.shape != (x.shape[0], c.adm_in_channels):
            raise ValueError(f"SVD UNet needs y of shape [{x.shape[0]}, {c.adm_in_channels}] (fps, motion bucket, "
                             f"augmentation embeddings), got {list(y.shape)}")
