"""The autoencoder of Stable Video Diffusion: SD's KL encoder with a temporal decoder (Stability's `VideoDecoder`).

The file's `first_stage_model.*` holds `encoder.*` (the SD encoder, unchanged) and `decoder.*`, SD's decoder in
which every ResnetBlock carries `time_stack` (a ResBlock of 3x1x1 convs over the frames, no time embedding) and
`mix_factor` (out = a * temporal + (1 - a) * spatial, a = sigmoid(mix_factor)), and whose last conv carries
`time_mix_conv` (a 3x1x1 conv over the frames after it). It has no quant_conv / post_quant_conv. Decoding treats
the batch as the consecutive frames of one clip (as ComfyUI does); encoding is per image. Latent scale 0.18215.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tiling import tiled_apply
from .svd_blocks import TemporalResBlock, as_clips, from_clips
from .vae import AttnBlock, Upsample, VAEConfig, _check, _norm
from .vae import Encoder as ImageEncoder
from .vae import ResnetBlock as ImageResnetBlock

SVD_VAE_MARKER = "decoder.mid.block_1.mix_factor"


class VideoResnetBlock(ImageResnetBlock):
    """The VAE's ResnetBlock, then `time_stack` over the frames, blended towards it by sigmoid(`mix_factor`)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, kernel: tuple[int, int, int] = (3, 1, 1)):
        super().__init__(in_channels, out_channels, groups)
        self.time_stack = TemporalResBlock(out_channels, None, groups, kernel)  # no time embedding here
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, frames: int = 1) -> Tensor:
        h = super().forward(x)
        spatial = as_clips(h, frames)
        temporal = self.time_stack(spatial)
        a = self.mix_factor.float().sigmoid().to(h.dtype)
        return from_clips(a * temporal + (1.0 - a) * spatial)


class TimeMixConv2d(nn.Conv2d):
    """A 2-D conv followed by `time_mix_conv`, a 3-D conv over the frames (kernel 3x1x1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (3, 1, 1)):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel))

    def forward(self, x: Tensor, frames: int = 1) -> Tensor:
        return from_clips(self.time_mix_conv(as_clips(super().forward(x), frames)))


class VideoDecoder(nn.Module):
    """SD's decoder (vae.Decoder's layout and keys) with VideoResnetBlocks and a TimeMixConv2d `conv_out`."""

    def __init__(self, c: VAEConfig, kernel: tuple[int, int, int] = (3, 1, 1)):
        super().__init__()
        g = c.norm_groups
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = VideoResnetBlock(width, width, g, kernel)
        self.mid.attn_1 = AttnBlock(width, g)
        self.mid.block_2 = VideoResnetBlock(width, width, g, kernel)
        levels: list[nn.Module] = []
        for i in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(VideoResnetBlock(width, c.ch * c.ch_mult[i], g, kernel))
                width = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level, as vae.Decoder; run from the deepest
        self.norm_out = _norm(g, width)
        self.conv_out = TimeMixConv2d(width, c.out_ch, kernel)

    def forward(self, z: Tensor, frames: int | None = None) -> Tensor:
        """z [F, z_channels, h, w]: the frames of one clip (`frames` None), or of several clips of `frames` each."""
        frames = z.shape[0] if frames is None else frames
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, frames)), frames)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, frames)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)), frames)


class SVDAutoencoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> unscaled latents; the decoder's batch is one clip. The interface of
    vae.AutoencoderKL (encode, encode_moments, decode, *_tiled, config) so the VAE handle runs it unchanged; tiled
    decoding decodes frame by frame (each tile a one-frame clip), only as the out-of-memory fallback."""

    def __init__(self, config: VAEConfig, kernel: tuple[int, int, int] = (3, 1, 1)):
        super().__init__()
        if config.embed_dim != config.z_channels:
            raise ValueError(f"SVD autoencoder has no quant convs: embed_dim {config.embed_dim} must equal "
                             f"z_channels {config.z_channels}")
        self.config = config
        self.encoder = ImageEncoder(config)
        self.decoder = VideoDecoder(config, kernel)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check(x, self.config.in_channels, "image")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_moments(x)[0]

    def decode(self, z: Tensor, frames: int | None = None) -> Tensor:
        _check(z, self.config.embed_dim, "latent")
        return self.decoder(z, frames)

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        _check(z, self.config.embed_dim, "latent")
        return tiled_apply(lambda t: self.decode(t, 1), z, tile, overlap, up=self.config.downscale)

    def encode_tiled(self, x: Tensor, tile: int = 512, overlap: int = 64) -> Tensor:
        _check(x, self.config.in_channels, "image")
        return tiled_apply(self.encode, x, tile, overlap, down=self.config.downscale)


def svd_vae_config(sd: Mapping[str, Tensor], norm_groups: int | None = None) -> VAEConfig:
    """VAEConfig of an SVD autoencoder state dict (prefix stripped): as an SD VAE's, without the quant convs
    (the latent width is the encoder's z_channels)."""
    probe = dict(sd)
    if "quant_conv.weight" not in probe and "encoder.conv_out.weight" in probe:
        z2 = probe["encoder.conv_out.weight"].shape[0]
        probe["quant_conv.weight"] = probe["encoder.conv_out.weight"].new_empty((z2, z2, 1, 1), device="meta")
    return VAEConfig.from_state_dict(probe, norm_groups=norm_groups)
