"""ESRGAN's RRDBNet (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks"),
the network of ESRGAN, Real-ESRGAN x4plus/x2plus and most community "4x-*.pth" upscalers.

A first conv, a trunk of Residual-in-Residual Dense Blocks (each three dense blocks of five 3×3 convs with
growing concatenated inputs, LeakyReLU 0.2, the residual scaled by 0.2 at both levels), a trunk conv added back
to the first conv's features, then per ×2 a nearest-neighbour upsample and a conv, then two convs at full size.
Real-ESRGAN's ×2 and ×1 models pixel-unshuffle the input first (by 2 or 4: 12 or 48 input channels for RGB) and
still upsample ×4, so the scale is 2^(upsample convs) / unshuffle.

Two key layouts exist for the same network. Attribute names here are the BasicSR/Real-ESRGAN ones (`conv_first`,
`body.{i}.rdb{1..3}.conv{1..5}`, `conv_body`, `conv_up{k}`, `conv_hr`, `conv_last`), so those files load by a
plain name match; the original ESRGAN repository's sequential layout (`model.0`, `model.1.sub.{i}.RDB{r}.conv{c}.0`,
`model.1.sub.{nb}`, `model.3`, `model.6`, ..., `model.{N}`) goes through `module_state_dict`'s key map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCH_NAME = "ESRGAN (RRDBNet)"
LEAKY_SLOPE = 0.2
RESIDUAL_SCALE = 0.2

_NEW_RDB = re.compile(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$")
_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_CONV = re.compile(r"model\.(\d+)\.(weight|bias)$")
_NEW_UP = re.compile(r"conv_up(\d+)\.weight$")


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int  # image channels (before any pixel-unshuffle)
    out_channels: int
    num_feat: int = 64
    num_block: int = 23
    num_grow: int = 32
    upsamples: int = 2  # ×2 nearest upsample + conv stages
    unshuffle: int = 1  # pixel-unshuffle factor of the input (Real-ESRGAN x2: 2, x1: 4)
    old_layout: bool = False  # the file uses the original ESRGAN `model.N` keys

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.unshuffle


class ResidualDenseBlock(nn.Module):
    """Five convs, each seeing the block input and every earlier conv's output; the sum is scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow: int) -> None:
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(num_feat + (i - 1) * num_grow, num_grow, 3, 1, 1))
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow, num_feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            features.append(F.leaky_relu(conv(torch.cat(features, dim=1)), LEAKY_SLOPE))
        return self.conv5(torch.cat(features, dim=1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three dense blocks in a row, their result scaled by 0.2 and added to the input (residual in residual)."""

    def __init__(self, num_feat: int, num_grow: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv_first = nn.Conv2d(c.in_channels * c.unshuffle**2, c.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(c.num_feat, c.num_grow) for _ in range(c.num_block)))
        self.conv_body = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        for k in range(1, c.upsamples + 1):
            setattr(self, f"conv_up{k}", nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(c.num_feat, c.out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] in 0..1 -> [B, C_out, H*scale, W*scale]. With an unshuffling model, H and W are
        padded (reflecting) to a multiple of the unshuffle factor and the result cropped back."""
        c = self.config
        h, w = x.shape[-2:]
        if c.unshuffle > 1:
            pad_h, pad_w = -h % c.unshuffle, -w % c.unshuffle
            if pad_h or pad_w:
                mode = "reflect" if pad_h < h and pad_w < w else "replicate"
                x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
            x = F.pixel_unshuffle(x, c.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(1, c.upsamples + 1):
            up = getattr(self, f"conv_up{k}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))
        return out[..., : h * c.scale, : w * c.scale]


def _unshuffle_of(file_in: int, out_channels: int) -> int:
    """Pixel-unshuffle factor from the first conv's input channels: in = image channels × factor²."""
    for factor in (1, 2, 4):
        if file_in == out_channels * factor**2:
            return factor
    raise ValueError(f"{ARCH_NAME}: the first conv takes {file_in} channels, which is not the output's "
                     f"{out_channels} channels times 1, 4 or 16 (pixel-unshuffle)")


def detect(state_dict: dict[str, Tensor]) -> RRDBConfig | None:
    """The config of an RRDBNet file in either layout, or None when the keys are not RRDBNet's."""
    if "conv_first.weight" in state_dict and "conv_body.weight" in state_dict:
        return _detect(state_dict, old=False)
    if "model.0.weight" in state_dict and any(_OLD_RDB.match(k) for k in state_dict):
        return _detect(state_dict, old=True)
    return None


def _detect(sd: dict[str, Tensor], old: bool) -> RRDBConfig:
    rdb = _OLD_RDB if old else _NEW_RDB
    blocks = {int(m.group(1)) for k in sd if (m := rdb.match(k))}
    num_block = max(blocks) + 1
    if blocks != set(range(num_block)):
        raise ValueError(f"{ARCH_NAME}: residual blocks {sorted(set(range(num_block)) - blocks)} are missing")
    if old:
        convs = sorted(int(m.group(1)) for k in sd if (m := _OLD_CONV.match(k)) and k.endswith("weight"))
        last = convs[-1]
        ups = [i for i in convs if i not in (0, last, last - 2)]
        upsamples = len(ups)
        if ups != [3 + 3 * j for j in range(upsamples)] or last - 2 != 2 + 3 * upsamples:
            raise ValueError(f"{ARCH_NAME}: unexpected layer indices model.{convs} for the ESRGAN layout "
                             "(a pixel-shuffle upsampler or another variant?)")
        first, last_w = sd["model.0.weight"], sd[f"model.{last}.weight"]
        conv1 = sd["model.1.sub.0.RDB1.conv1.0.weight"]
    else:
        ups = sorted(int(m.group(1)) for k in sd if (m := _NEW_UP.match(k)))
        upsamples = len(ups)
        if ups != list(range(1, upsamples + 1)):
            raise ValueError(f"{ARCH_NAME}: upsample convs conv_up{ups} are not numbered 1..{upsamples}")
        first, last_w = sd["conv_first.weight"], sd["conv_last.weight"]
        conv1 = sd["body.0.rdb1.conv1.weight"]
    if first.ndim != 4 or last_w.ndim != 4 or conv1.ndim != 4:
        raise ValueError(f"{ARCH_NAME}: the first, last and dense-block convs must be 4-D conv weights")
    num_feat, out_channels = int(first.shape[0]), int(last_w.shape[0])
    unshuffle = _unshuffle_of(int(first.shape[1]), out_channels)
    if 2**upsamples < unshuffle:
        raise ValueError(f"{ARCH_NAME}: {upsamples} upsample convs after a pixel-unshuffle by {unshuffle} "
                         "would shrink the image")
    return RRDBConfig(in_channels=int(first.shape[1]) // unshuffle**2, out_channels=out_channels,
                      num_feat=num_feat, num_block=num_block, num_grow=int(conv1.shape[0]),
                      upsamples=upsamples, unshuffle=unshuffle, old_layout=old)


def build(config: RRDBConfig) -> RRDBNet:
    return RRDBNet(config)


def esrgan_key(name: str, config: RRDBConfig) -> str:
    """The original ESRGAN layout's key for one of this module's parameter names."""
    if m := re.match(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$", name):
        block, rdb, conv, kind = m.groups()
        return f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0.{kind}"
    layer, _, kind = name.rpartition(".")
    u = config.upsamples
    indices = {"conv_first": "0", "conv_body": f"1.sub.{config.num_block}", "conv_hr": str(2 + 3 * u),
               "conv_last": str(4 + 3 * u), **{f"conv_up{k}": str(3 * k) for k in range(1, u + 1)}}
    if layer not in indices:
        raise KeyError(f"{ARCH_NAME}: no ESRGAN key for {name!r}")
    return f"model.{indices[layer]}.{kind}"


def module_state_dict(state_dict: dict[str, Tensor], config: RRDBConfig) -> dict[str, Tensor]:
    """File keys -> attribute names: the identity for BasicSR files, the inverse of `esrgan_key` otherwise
    (keys it does not know are kept, for the loader to report as unexpected)."""
    if not config.old_layout:
        return dict(state_dict)
    with torch.device("meta"):
        names = RRDBNet(config).state_dict().keys()
    attribute = {esrgan_key(name, config): name for name in names}
    return {attribute.get(key, key): value for key, value in state_dict.items()}


def activation_elements(config: RRDBConfig, height: int, width: int) -> int:
    """Peak activation elements of one forward over a [1, C, height, width] input, under no_grad: a dense
    block's growing concatenation with its inputs at the low resolution, or at the full output size the
    features, conv_hr's output and its activation plus a map's worth of convolution workspace (four num_feat
    maps; measured on the CPU: tests/nodes/test_upscale_nodes.py), whichever is larger."""
    c = config
    low_pixels = -(-height // c.unshuffle) * -(-width // c.unshuffle)
    low = low_pixels * (2 * (c.num_feat + 4 * c.num_grow) + 4 * c.num_feat)
    high = 4 * c.num_feat * height * width * c.scale**2
    return max(low, high)
