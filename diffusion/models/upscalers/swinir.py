"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer") as people download it: `.pth`
files of the official release (classical SR "SwinIR-M", lightweight SR "SwinIR-S", real-world SR with the
"nearest+conv" tail, the large "3conv" real-world model, denoising and JPEG artefact models at scale 1) and models
trained with the same code.

Attribute names equal the official checkpoint keys, so a file loads with `load_state_dict(strict=True)` once its
stored buffers are dropped (`module_state_dict`). Every hyperparameter is read from key names and tensor shapes
(`detect`): nothing in a file says which task it was trained for, so where the official test script sets a value
that no tensor shows, the same rule is used here (see `SwinIRConfig.img_range`).

The tail, by upsampler:
- "pixelshuffle" (classical): conv_before_upsample.0 (+LeakyReLU 0.01) → upsample.{0,2,...} (conv + PixelShuffle
  per factor 2, or one factor 3) → conv_last;
- "pixelshuffledirect" (lightweight): upsample.0 (one conv to scale²·out channels) + PixelShuffle;
- "nearest+conv" (real-world, fewer checkerboard artefacts): conv_before_upsample.0 → (nearest ×2, conv_up1) →
  (nearest ×2, conv_up2, only at ×4) → conv_hr → conv_last, LeakyReLU 0.2 between;
- "" (scale 1: denoising, JPEG): the input plus conv_last of the features.

Inputs whose sides are not multiples of the window are padded by reflection at the bottom and right and the output
is cropped back, as the official network's `check_image_size` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .swinir_blocks import RSTB, relative_position_index, residual_conv

log = logging.getLogger(__name__)

ARCH_NAME = "SwinIR"

# The per-channel mean the official code subtracts from 3-channel input (DIV2K's RGB mean); other channel counts
# subtract nothing.
RGB_MEAN = (0.4488, 0.4371, 0.4040)

_MARKER = "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
# Buffers the official modules register (and so save) that this implementation computes itself.
_STORED_BUFFERS = (".attn.relative_position_index", ".attn_mask")


@dataclass(frozen=True)
class SwinIRConfig:
    scale: int
    in_channels: int
    out_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    upsampler: str  # "pixelshuffle", "pixelshuffledirect", "nearest+conv" or "" (scale 1)
    resi_connection: str  # "1conv" or "3conv"
    num_feat: int = 64  # channels of the reconstruction tail (pixelshuffle, nearest+conv)
    qkv_bias: bool = True
    patch_norm: bool = True
    # The official models scale input by 1, except the JPEG artefact models (window 7, scale 1), trained on 0..255.
    # No tensor records it: this follows the official test script's settings per task.
    img_range: float = 1.0

    @property
    def mean(self) -> tuple[float, ...]:
        return RGB_MEAN if self.in_channels == 3 else (0.0,) * self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)


class SwinIR(nn.Module):
    """The whole network: shallow conv, residual Swin groups, body conv with a long skip, reconstruction tail."""

    def __init__(self, config: SwinIRConfig):
        super().__init__()
        self.config = c = config
        self.conv_first = nn.Conv2d(c.in_channels, c.embed_dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(c.embed_dim) if c.patch_norm else nn.Identity()
        self.layers = nn.ModuleList(
            RSTB(c.embed_dim, depth, heads, c.window_size, c.mlp_hidden, c.qkv_bias, c.resi_connection)
            for depth, heads in zip(c.depths, c.num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(c.embed_dim)
        self.conv_after_body = residual_conv(c.embed_dim, c.resi_connection)
        if c.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(c.embed_dim, c.num_feat, 3, 1, 1), nn.LeakyReLU())
        if c.upsampler == "pixelshuffle":
            self.upsample = nn.Sequential(*_pixel_shuffle_stages(c.scale, c.num_feat))
            self.conv_last = nn.Conv2d(c.num_feat, c.out_channels, 3, 1, 1)
        elif c.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(c.embed_dim, c.scale**2 * c.out_channels, 3, 1, 1), nn.PixelShuffle(c.scale))
        elif c.upsampler == "nearest+conv":
            self.conv_up1 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
            if c.scale == 4:
                self.conv_up2 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(c.num_feat, c.out_channels, 3, 1, 1)
        elif c.upsampler == "":
            self.conv_last = nn.Conv2d(c.embed_dim, c.out_channels, 3, 1, 1)
        else:
            raise ValueError(f"unknown SwinIR upsampler {c.upsampler!r}")

    def forward_features(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, (h, w))
        return self.norm(tokens).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] in 0..1 -> [B, C, H*scale, W*scale] (not clamped)."""
        c = self.config
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, c.window_size)
        mean = torch.tensor(c.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) * c.img_range
        first = self.conv_first(x)
        features = self.conv_after_body(self.forward_features(first)) + first
        if c.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(features)))
        elif c.upsampler == "pixelshuffledirect":
            out = self.upsample(features)
        elif c.upsampler == "nearest+conv":
            y = self.conv_before_upsample(features)
            y = F.leaky_relu(self.conv_up1(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
            if c.scale == 4:
                y = F.leaky_relu(self.conv_up2(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        else:
            out = x + self.conv_last(features)
        out = out / c.img_range + mean
        return out[..., : h * c.scale, : w * c.scale]


def _pixel_shuffle_stages(scale: int, channels: int) -> list[nn.Module]:
    """conv + PixelShuffle(2) per factor of 2 (scale a power of two), or one conv + PixelShuffle(3)."""
    if scale == 3:
        return [nn.Conv2d(channels, 9 * channels, 3, 1, 1), nn.PixelShuffle(3)]
    if scale < 2 or scale & (scale - 1):
        raise ValueError(f"SwinIR pixelshuffle upsampling supports scales 2^n and 3, not {scale}")
    stages: list[nn.Module] = []
    for _ in range(int(math.log2(scale))):
        stages += [nn.Conv2d(channels, 4 * channels, 3, 1, 1), nn.PixelShuffle(2)]
    return stages


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom and right of [B, C, H, W] by reflection up to multiples of `multiple`.

    Reflection cannot add more than a side minus one at a time, so a side shorter than the padding it needs is
    reflected again until it is long enough (a single row or column is repeated); the official code fails there."""
    for dim in (-2, -1):
        while pad := -x.shape[dim] % multiple:
            size = x.shape[dim]
            mode, step = ("replicate", pad) if size == 1 else ("reflect", min(pad, size - 1))
            x = F.pad(x, (0, 0, 0, step) if dim == -2 else (0, step, 0, 0), mode=mode)
    return x


def build(config: SwinIRConfig) -> SwinIR:
    return SwinIR(config)


def activation_elements(config: SwinIRConfig, height: int, width: int) -> int:
    """Peak activation elements of one forward over a [1, C, height, width] input under no_grad (the loader's
    memory estimate), per pixel of the window-padded input: the input twice and the shallow features and the
    running tokens, plus the larger of a Swin block (norm, roll, windows, q/k/v, attention output, the MLP's hidden
    maps and, when attention is not fused, the scores: heads × window² per pixel) and the tail at the output size
    (pixelshuffle: a conv's output and its shuffled copy beside the previous stage's; nearest+conv: the upsampled
    map, its conv and activation beside the previous one; direct: one conv and its shuffled copy)."""
    c = config
    pixels = -(-height // c.window_size) * c.window_size * -(-width // c.window_size) * c.window_size
    block = 6 * c.embed_dim + 2 * c.mlp_hidden + max(c.num_heads) * c.window_size**2
    tail = {"pixelshuffle": 3 * c.num_feat, "nearest+conv": 4 * c.num_feat,
            "pixelshuffledirect": 2 * c.out_channels}.get(c.upsampler, 0) * c.scale**2
    return pixels * (2 * c.in_channels + 2 * c.embed_dim + max(block, tail))


def module_state_dict(state_dict: dict[str, Tensor], config: SwinIRConfig) -> dict[str, Tensor]:
    """The file's parameters under the module's names (the same names), without the buffers the official
    modules save: the relative-position index is checked against ours, the training-size attention masks are
    dropped (recomputed for every input size)."""
    expected = relative_position_index(config.window_size)
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".attn.relative_position_index"):
            if tuple(tensor.shape) != tuple(expected.shape) or not torch.equal(tensor.long().cpu(), expected):
                raise ValueError(f"SwinIR file: {key} is not the window-{config.window_size} relative position "
                                 "index this implementation uses")
            continue
        if key.endswith(".attn_mask"):
            continue
        out[key] = tensor
    return out


def detect(state_dict: dict[str, Tensor]) -> SwinIRConfig | None:
    """The configuration of a SwinIR state dict, or None when the keys are not SwinIR's.

    A dict with SwinIR's keys and more (a relative such as HAT or a Swin2SR) is not SwinIR: None. One that has
    SwinIR's marker keys but is incomplete, inconsistent, or uses a feature not implemented here raises
    ValueError naming the key."""
    sd = state_dict
    if "conv_first.weight" not in sd or _MARKER not in sd:
        return None
    if "absolute_pos_embed" in sd:
        raise ValueError("SwinIR file with an absolute position embedding (ape=True): tied to its training "
                         "resolution, not supported")
    conv_first = _shape(sd, "conv_first.weight", 4)
    embed_dim, in_channels = conv_first[0], conv_first[1]

    depths, heads = [], []
    while f"layers.{len(depths)}.residual_group.blocks.0.norm1.weight" in sd:
        i = len(depths)
        depth = 0
        while f"layers.{i}.residual_group.blocks.{depth}.norm1.weight" in sd:
            depth += 1
        depths.append(depth)
        heads.append(_shape(sd, f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table", 2)[1])
    if not depths:
        raise ValueError("SwinIR file: missing key 'layers.0.residual_group.blocks.0.norm1.weight'")

    table = _shape(sd, _MARKER, 2)[0]
    window = (math.isqrt(table) + 1) // 2
    if (2 * window - 1) ** 2 != table:
        raise ValueError(f"SwinIR file: {_MARKER} has {table} rows, not (2·window-1)² for any window size")
    mlp_hidden = _shape(sd, "layers.0.residual_group.blocks.0.mlp.fc1.weight", 2)[0]

    if "layers.0.conv.weight" in sd:
        resi = "1conv"
    elif "layers.0.conv.0.weight" in sd:
        resi = "3conv"
    else:
        raise ValueError("SwinIR file: missing key 'layers.0.conv.weight' (or 'layers.0.conv.0.weight' for 3conv)")

    upsampler, scale, num_feat, out_channels = _tail(sd, in_channels)
    config = SwinIRConfig(
        scale=scale, in_channels=in_channels, out_channels=out_channels, embed_dim=embed_dim, depths=tuple(depths),
        num_heads=tuple(heads), window_size=window, mlp_ratio=mlp_hidden / embed_dim, upsampler=upsampler,
        resi_connection=resi, num_feat=num_feat, qkv_bias="layers.0.residual_group.blocks.0.attn.qkv.bias" in sd,
        patch_norm="patch_embed.norm.weight" in sd,
        img_range=255.0 if upsampler == "" and window == 7 else 1.0,
    )
    if not _keys_match(sd, config):
        return None
    log.debug("SwinIR detected: %s", config)
    return config


def _tail(sd: dict[str, Tensor], in_channels: int) -> tuple[str, int, int, int]:
    """(upsampler, scale, num_feat, out_channels) from which reconstruction keys exist and their shapes."""
    if "conv_before_upsample.0.weight" in sd:
        num_feat = _shape(sd, "conv_before_upsample.0.weight", 4)[0]
        out_channels = _shape(sd, "conv_last.weight", 4)[0]
        if "conv_up1.weight" in sd:
            return "nearest+conv", 4 if "conv_up2.weight" in sd else 2, num_feat, out_channels
        scale, index = 1, 0
        while f"upsample.{index}.weight" in sd:
            factor = math.isqrt(_shape(sd, f"upsample.{index}.weight", 4)[0] // num_feat)
            if factor * factor * num_feat != sd[f"upsample.{index}.weight"].shape[0] or factor not in (2, 3):
                raise ValueError(f"SwinIR file: upsample.{index}.weight has {sd[f'upsample.{index}.weight'].shape[0]}"
                                 f" output channels, not 4 or 9 × {num_feat}")
            scale *= factor
            index += 2
        if scale == 1:
            raise ValueError("SwinIR file: conv_before_upsample without upsample.0.weight or conv_up1.weight")
        return "pixelshuffle", scale, num_feat, out_channels
    if "upsample.0.weight" in sd:
        channels = _shape(sd, "upsample.0.weight", 4)[0]
        scale = math.isqrt(channels // in_channels)
        if scale * scale * in_channels != channels or scale < 2:
            raise ValueError(f"SwinIR file: upsample.0.weight has {channels} output channels, not scale² × "
                             f"{in_channels} input channels")
        return "pixelshuffledirect", scale, 64, in_channels
    out_channels = _shape(sd, "conv_last.weight", 4)[0]
    if out_channels != in_channels:
        raise ValueError(f"SwinIR file without an upsampler (scale 1) must map {in_channels} channels to as many, "
                         f"conv_last.weight has {out_channels}")
    return "", 1, 64, out_channels


def _shape(sd: dict[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"SwinIR file: missing key {key!r}")
    shape = tuple(int(s) for s in sd[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"SwinIR file: {key} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def _keys_match(sd: dict[str, Tensor], config: SwinIRConfig) -> bool:
    """Compare the file with the network the config builds (on the meta device: no memory).

    Extra keys mean another architecture (False); missing keys or other shapes raise, naming the first few."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SwinIR(config).state_dict().items()}
    present = {k for k in sd if not k.endswith(_STORED_BUFFERS)}
    extra = sorted(present - expected.keys())
    if extra:
        log.debug("keys look like SwinIR but %d are not SwinIR's, e.g. %s", len(extra), extra[:3])
        return False
    missing = sorted(expected.keys() - present)
    if missing:
        raise ValueError(f"SwinIR file: {len(missing)} keys missing, e.g. {', '.join(missing[:3])}")
    wrong = [f"{k} {list(sd[k].shape)} (expected {list(expected[k])})"
             for k in sorted(present) if tuple(sd[k].shape) != expected[k]]
    if wrong:
        raise ValueError(f"SwinIR file: {len(wrong)} tensors of unexpected shape, e.g. {'; '.join(wrong[:3])}")
    return True
