"""The KL autoencoder of Stable Diffusion (the "VAE"), in the original LDM layout.

Attribute names equal the `first_stage_model.*` checkpoint keys (prefix stripped), so a real SD1/SD2/SDXL
VAE loads with `load_state_dict(sd, strict=True)`. The family's latent scaling factor (0.18215 for SD1/2,
0.13025 for SDXL) is not applied here: callers multiply after `encode` and divide before `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..tiling import tiled_apply
from .attention import attention
from .unet_blocks import GroupNorm32


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], norm_groups: int | None = None) -> VAEConfig:
        """Infers the config from tensor shapes of a VAE state dict without the `first_stage_model.`
        prefix. The group count of the norms is not visible in shapes: 32 unless given."""
        conv_in = _require(sd, "encoder.conv_in.weight")
        ch = int(conv_in.shape[0])
        mults = []
        while (key := f"encoder.down.{len(mults)}.block.0.conv1.weight") in sd:
            mults.append(int(sd[key].shape[0]) // ch)
        if not mults:
            _require(sd, "encoder.down.0.block.0.conv1.weight")
        blocks = 0
        while f"encoder.down.0.block.{blocks}.conv1.weight" in sd:
            blocks += 1
        return cls(
            ch=ch,
            ch_mult=tuple(mults),
            num_res_blocks=blocks,
            in_channels=int(conv_in.shape[1]),
            out_ch=int(_require(sd, "decoder.conv_out.weight").shape[0]),
            z_channels=int(_require(sd, "encoder.conv_out.weight").shape[0]) // 2,
            embed_dim=int(_require(sd, "quant_conv.weight").shape[0]) // 2,
            norm_groups=32 if norm_groups is None else norm_groups,
        )


def _require(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        hint = ""
        if any(k.startswith("first_stage_model.") for k in sd):
            hint = " (strip the 'first_stage_model.' prefix first)"
        raise ValueError(f"not a VAE state dict: missing key {key!r}{hint}")
    return sd[key]


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions. q/k/v/proj_out are 1x1 convs as in the original
    checkpoints; files converted from diffusers store them as [C, C] linear weights, accepted too."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("q", "k", "v", "proj_out"):
            key = f"{prefix}{name}.weight"
            if key in state_dict and state_dict[key].ndim == 2:
                state_dict[key] = state_dict[key][:, :, None, None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, 1, H*W, C] with each position's C values contiguous: SDPA's fused kernels take that layout and never
        # hold the (HW)^2 scores (51 GB for a 2048x2048 image's decode); a transposed view would take the math path.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()
                   for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = attention(q, k, v)  # [B, 1, H*W, C]; split along the queries where it still takes the math path
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (the original's asymmetry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = c.ch
        for i, mult in enumerate(c.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(width, c.ch * mult, g))
                width = c.ch * mult
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = _mid(width, g)
        self.norm_out = _norm(g, width)
        self.conv_out = nn.Conv2d(width, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        g = c.norm_groups
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _mid(width, g)
        levels: list[nn.Module] = []
        for i in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(width, c.ch * c.ch_mult[i], g))
                width = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level; run from the deepest (last) one
        self.norm_out = _norm(g, width)
        self.conv_out = nn.Conv2d(width, c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> unscaled latents [B, embed_dim, H/f, W/f] (f = config.downscale;
    sides that are not multiples of f are floored on encode). Creates no buffers (meta-constructible)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of the latent posterior (log-variance clamped to [-30, 20] as in LDM)."""
        _check(x, self.config.in_channels, "image")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean: deterministic latents for img2img and inpainting."""
        return self.encode_moments(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        _check(z, self.config.embed_dim, "latent")
        return self.decoder(self.post_quant_conv(z))

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`decode` of overlapping latent tiles (`tile`, `overlap` in latent units), blended. Bounds memory
        at the cost of per-tile normalisation statistics: close to, not equal to, `decode`."""
        _check(z, self.config.embed_dim, "latent")
        return tiled_apply(self.decode, z, tile, overlap, up=self.config.downscale)

    def encode_tiled(self, x: Tensor, tile: int = 512, overlap: int = 64) -> Tensor:
        """`encode` of overlapping image tiles (`tile`, `overlap` in pixels), blended."""
        _check(x, self.config.in_channels, "image")
        return tiled_apply(self.encode, x, tile, overlap, down=self.config.downscale)


def _check(t: Tensor, channels: int, what: str) -> None:
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"VAE {what} must be [B, {channels}, H, W], got {list(t.shape)}")
