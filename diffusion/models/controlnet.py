"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder half (time embedding, input blocks, middle block) that also sees a
hint image: `input_hint_block` turns the hint (8x the latent's size) into a feature map added after the
first input block, and a 1x1 "zero convolution" after every input block (`zero_convs.i.0`) and after the
middle block (`middle_block_out.0`) gives one residual per UNet skip connection plus one for the middle
block's output. The UNet adds them (times a strength) to its skips and middle output; see
diffusion/patches/control.py.

Attribute names equal the original release's checkpoint keys (`control_model.` prefix stripped), so a file
loads by name; the blocks are the UNet's own (unet_blocks.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import Tensor, nn

from .unet import UNetConfig, encoder_blocks, label_embedding, middle_block, time_embedding
from .unet_blocks import timestep_embedding

# The released ControlNets' hint encoder widths (diffusers' conditioning_embedding_out_channels).
HINT_WIDTHS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """The UNet shape the ControlNet copies (its `out_channels` is unused), the hint's channels and the widths of
    the hint encoder: one 3x3 conv into `hint_widths[0]`, then per further width a 3x3 conv and a stride-2 conv
    into it, so the hint is 2^(len(hint_widths) - 1) times the latent's size."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = HINT_WIDTHS

    @property
    def hint_downscale(self) -> int:
        return 2 ** (len(self.hint_widths) - 1)


def _hint_encoder(config: ControlNetConfig) -> nn.Sequential:
    """Convs with a SiLU after each but the last (a zero conv into the UNet's width): indices 0, 2, 4, ... are
    the convs, as in the checkpoints."""
    widths = config.hint_widths
    convs: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1)]
    for narrow, wide in itertools.pairwise(widths):
        convs += [nn.Conv2d(narrow, narrow, 3, padding=1), nn.Conv2d(narrow, wide, 3, padding=1, stride=2)]
    convs.append(nn.Conv2d(widths[-1], config.unet.model_channels, 3, padding=1))
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [conv, nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class ControlNet(nn.Module):
    """`forward(x, hint, timesteps, context, y) -> residuals`: one per UNet input block (in block order) and the
    middle block's last. Creates no buffers, so it can be built on the meta device."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config.unet
        self.time_embed = time_embedding(c)
        if c.adm_in_channels is not None:
            self.label_emb = label_embedding(c)
        self.input_hint_block = _hint_encoder(config)  # built here, between them, to keep the seeded init order
        self.input_blocks, widths = encoder_blocks(c)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(w, w, 1)) for w in widths)
        self.middle_block = middle_block(c, widths[-1])
        self.middle_block_out = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 1))

    @property
    def residual_widths(self) -> list[int]:
        """Channels of each residual, in the order `forward` returns them."""
        return [int(z[0].out_channels) for z in self.zero_convs] + [int(self.middle_block_out[0].out_channels)]

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None, **options: object) -> list[Tensor]:
        """x [B, C, h, w] (the UNet's scaled input), hint [B, hint_channels, h·s, w·s] with s = hint_downscale
        (0..1 images as the released models were trained), timesteps [B] or one, context [B, T, dim], y [B, adm]
        for SDXL. `options` are what a variant takes per use (a union ControlNet's `control_type`)."""
        self._check_inputs(x, hint, context, y)
        self.check_options(options)
        c = self.config.unet
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, c.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        emb = self.extra_embedding(emb, **options)
        context = context.to(x.dtype)
        residuals = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = h + self.guided_hint(hint.to(x.dtype), h, **options)
            residuals.append(zero(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals

    def check_options(self, options: dict) -> None:
        """A plain ControlNet takes no per-use options (variants override this and the two hooks below)."""
        if options:
            raise ValueError(f"this ControlNet takes no options, got {sorted(options)}")

    def extra_embedding(self, emb: Tensor, **options: object) -> Tensor:
        """The time (+ ADM) embedding, with what a variant adds to it."""
        return emb

    def guided_hint(self, hint: Tensor, h: Tensor, **options: object) -> Tensor:
        """What is added to the first input block's output `h`: the encoded hint."""
        return self.input_hint_block(hint)

    def _check_inputs(self, x: Tensor, hint: Tensor, context: Tensor, y: Tensor | None) -> None:
        c, s = self.config.unet, self.config.hint_downscale
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"ControlNet input must be [B, {c.in_channels}, H, W], got {list(x.shape)}")
        want = [x.shape[0], self.config.hint_channels, x.shape[2] * s, x.shape[3] * s]
        if list(hint.shape) != want:
            raise ValueError(f"ControlNet hint must be {want} for a latent of {list(x.shape)}, got {list(hint.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"ControlNet context must be [B, T, {c.context_dim}], got {list(context.shape)}")
        if (c.adm_in_channels is None) != (y is None):
            raise ValueError(f"ControlNet ADM vector: expected {c.adm_in_channels} channels, got "
                             f"{None if y is None else list(y.shape)}")
