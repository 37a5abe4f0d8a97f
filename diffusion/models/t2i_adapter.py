"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models").

A small convolutional network that turns a hint image (edges, depth, pose, colour palette...) into one feature map
per UNet encoder level. Unlike ControlNet it sees neither the latent nor the timestep, so its features are computed
once per hint and reused at every sampling step; the UNet adds them (times a strength) to its hidden state after
the last block of each level (diffusers' `down_intrablock_additional_residuals`; see
diffusion/patches/t2i_adapter_control.py).

The hint is first pixel-unshuffled (8x for SD1.x adapters, 16x for SDXL ones: each s x s patch of pixels becomes
s² channels), which brings it to the latent's resolution (SD1) or half of it (SDXL, whose first UNet level has no
attention and gets no feature before its downsample).

Two networks, attribute names equal to the original TencentARC release's keys (diffusers' layout is renamed by
diffusion/checkpoints/t2i_adapter_keys.py):
- the full adapter: `conv_in`, then `nums_rb` residual blocks per level, flat as `body.{level * nums_rb + j}`, the
  first of a level with a 2x downsample (`down_opt`, an average pool, or a strided conv `down_opt.op` in files
  trained with `use_conv`) and a 1x1 `in_conv` when the width changes; SDXL's variant downsamples only before its
  third level, so its four features are at 1/16, 1/16, 1/32 and 1/32 of the hint;
- the light adapter (the colour adapter): per level `body.{i}.in_conv` into a quarter of the width,
  `body.{i}.body.{j}` residual blocks, `body.{i}.out_conv` back out, a downsample before every level but the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

VARIANTS = ("full", "light")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """Shape of an adapter: `variant` ("full" or "light"), the hint's `in_channels` (3, or 1 for the canny and
    sketch adapters), the width of each level's feature, residual blocks per level, the pixel-unshuffle factor,
    `xl` (SDXL's downsampling pattern), and for the full adapter the kernel of `in_conv`/`block2` and whether its
    downsamples are strided convs (`conv_down`) rather than average pools."""

    variant: str = "full"
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    nums_rb: int = 2
    unshuffle: int = 8
    xl: bool = False
    ksize: int = 1
    conv_down: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"T2I-Adapter variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.xl and (self.variant != "full" or len(self.channels) != 4):
            raise ValueError("the SDXL T2I-Adapter is a full adapter with 4 levels")
        if self.ksize not in (1, 3):
            raise ValueError(f"T2I-Adapter kernel size must be 1 or 3, got {self.ksize}")

    @property
    def cin(self) -> int:
        """Channels after the pixel unshuffle: what `conv_in` (full) or the first `in_conv` (light) reads."""
        return self.in_channels * self.unshuffle**2

    @property
    def hint_channels(self) -> int:
        """Channels of the IMAGE the hint is taken from (the name ControlNet configs use, which the apply path
        reads): RGB, even for one-channel adapters, which get the mean of the three (as ComfyUI feeds them)."""
        return 3

    @property
    def family(self) -> str:
        return "sdxl" if self.xl else "sd1"

    def downsamples(self, level: int) -> bool:
        """Whether `level` starts by halving the feature map."""
        return level == 2 if self.xl else level > 0

    @property
    def total_downscale(self) -> int:
        """Hint pixels per pixel of the last feature."""
        return self.unshuffle * 2 ** sum(self.downsamples(i) for i in range(len(self.channels)))


class Downsample(nn.Module):
    """2x downsample: a 2x2 average pool (rounding odd sizes up, as the UNet's strided convs do) or, with
    `conv`, a 3x3 stride-2 conv `op`."""

    def __init__(self, channels: int, conv: bool):
        super().__init__()
        self.op = (nn.Conv2d(channels, channels, 3, stride=2, padding=1) if conv
                   else nn.AvgPool2d(2, stride=2, ceil_mode=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """The full adapter's block: optional downsample, optional width change (`in_conv`), then
    x + block2(relu(block1(x)))."""

    def __init__(self, in_c: int, out_c: int, down: bool, ksize: int, conv_down: bool):
        super().__init__()
        if down:
            self.down_opt = Downsample(in_c, conv_down)
        if in_c != out_c:
            self.in_conv = nn.Conv2d(in_c, out_c, ksize, padding=ksize // 2)
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, ksize, padding=ksize // 2)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "down_opt"):
            x = self.down_opt(x)
        if hasattr(self, "in_conv"):
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class LightResBlock(nn.Module):
    """The light adapter's block: x + block2(relu(block1(x))), both 3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(self.act(self.block1(x)))


class LightLevel(nn.Module):
    """One level of the light adapter: downsample, 1x1 into a quarter of the width, residual blocks, 1x1 out."""

    def __init__(self, in_c: int, out_c: int, nums_rb: int, down: bool):
        super().__init__()
        if down:
            self.down_opt = Downsample(in_c, False)
        inner = out_c // 4
        self.in_conv = nn.Conv2d(in_c, inner, 1)
        self.body = nn.Sequential(*(LightResBlock(inner) for _ in range(nums_rb)))
        self.out_conv = nn.Conv2d(inner, out_c, 1)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "down_opt"):
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    """`forward(hint) -> features`: hint [B, in_channels, H, W] (0..1 images, H and W multiples of the unshuffle
    factor) to one feature map per level, [B, channels[i], ...]. Creates no buffers (meta-buildable)."""

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        c = config
        self.unshuffle = nn.PixelUnshuffle(c.unshuffle)
        if c.variant == "light":
            widths = (c.cin, *c.channels)
            self.body = nn.ModuleList(LightLevel(widths[i], widths[i + 1], c.nums_rb, c.downsamples(i))
                                      for i in range(len(c.channels)))
            return
        self.conv_in = nn.Conv2d(c.cin, c.channels[0], 3, padding=1)
        blocks = []
        for i, width in enumerate(c.channels):
            previous = c.channels[max(i - 1, 0)]
            for j in range(c.nums_rb):
                first = j == 0
                blocks.append(ResBlock(previous if first else width, width, first and c.downsamples(i), c.ksize,
                                       c.conv_down))
        self.body = nn.ModuleList(blocks)

    def forward(self, hint: Tensor) -> list[Tensor]:
        c = self.config
        if hint.ndim != 4 or hint.shape[1] != c.in_channels or hint.shape[-1] % c.unshuffle \
                or hint.shape[-2] % c.unshuffle:
            raise ValueError(f"T2I-Adapter hint must be [B, {c.in_channels}, H, W] with H and W multiples of "
                             f"{c.unshuffle}, got {list(hint.shape)}")
        x = self.unshuffle(hint.to(next(self.parameters()).dtype))
        features = []
        if c.variant == "light":
            for level in self.body:
                x = level(x)
                features.append(x)
            return features
        x = self.conv_in(x)
        for i in range(len(c.channels)):
            for j in range(c.nums_rb):
                x = self.body[i * c.nums_rb + j](x)
            features.append(x)
        return features
