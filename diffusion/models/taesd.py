"""TAESD-style tiny latent decoders (Ollin Boer Bohan's TAESD, MIT): cheap, readable sampler previews.

The decoder is a plain `nn.Sequential` so that its module indices are the keys of the files people already have
(`models/vae_approx/taesd_decoder.safetensors|.pth` for SD1/SD2, `taesdxl_decoder.*` for SDXL):

    0 Clamp (tanh(x/3)*3)     1 conv C->W     2 ReLU
    3-5 Blocks, 6 Upsample x2, 7 conv (no bias)      8-10 Blocks, 11 Upsample, 12 conv
    13-15 Blocks, 16 Upsample, 17 conv               18 Block, 19 conv W->3

A Block is `conv.0` (conv) ReLU `conv.2` ReLU `conv.4`, plus the input (a 1x1 `skip` conv only when the widths
differ, never in these files), then ReLU. Input: the latent as the UNet sees it (already multiplied by the
family's scaling factor); output: RGB around 0..1. The width W and latent channels C are read from the file's
shapes, so the project's own smaller decoder (W = 32, under 1 MB) loads through the same code.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..checkpoints.files import CheckpointError, read_state_dict

STAGES = 3  # upsampling stages: x8 in all
BLOCKS_PER_STAGE = 3


class Clamp(nn.Module):
    """Soft clamp to +-3: latents far out of range (early, noisy steps) cannot blow up the decoder."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus a skip, then ReLU."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, padding=1))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """TAESD's decoder: latent [B, C, h, w] -> RGB [B, 3, 8h, 8w] around 0..1 (see the module docstring)."""

    def __init__(self, latent_channels: int = 4, width: int = 64):
        layers: list[nn.Module] = [Clamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(STAGES):
            layers += [Block(width, width) for _ in range(BLOCKS_PER_STAGE)]
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1, bias=False)]
        layers += [Block(width, width), nn.Conv2d(width, 3, 3, padding=1)]
        super().__init__(*layers)
        self.latent_channels = latent_channels
        self.width = width


def decoder_shape(sd: dict[str, Tensor], name: str = "decoder") -> tuple[int, int]:
    """(latent channels, width) of a decoder state dict, from its first conv; a clear error for other files."""
    weight = sd.get("1.weight")
    if weight is None or weight.ndim != 4 or weight.shape[-2:] != (3, 3):
        first = sd.get("0.weight")
        encoder = first is not None and first.ndim == 4 and first.shape[1] == 3  # TAESD's encoder starts RGB->W
        what = "a TAESD encoder, " if encoder else ""
        raise CheckpointError(f"{name}: not a TAESD decoder ({what}no 3x3 conv '1.weight' from the latent; keys "
                              f"start {sorted(sd)[:3]})")
    return int(weight.shape[1]), int(weight.shape[0])


def tiny_decoder_from_state_dict(sd: dict[str, Tensor], name: str = "decoder") -> TinyDecoder:
    """A TinyDecoder holding `sd` (TAESD's key layout; a `decoder.` prefix, as some repacks have, is dropped)."""
    if sd and all(k.startswith("decoder.") for k in sd):
        sd = {k[len("decoder."):]: v for k, v in sd.items()}
    channels, width = decoder_shape(sd, name)
    model = TinyDecoder(channels, width)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{name}: not a TAESD decoder of width {width} ({first[:200]})") from None
    return model.eval().requires_grad_(False)


def load_tiny_decoder(path: str | os.PathLike) -> TinyDecoder:
    """A TAESD decoder file (.safetensors, or .pth through the safe pickle reader)."""
    return tiny_decoder_from_state_dict(read_state_dict(path), name=os.path.basename(path))


def write_tiny_decoder(path: str | os.PathLike, model: TinyDecoder, dtype: torch.dtype = torch.float16,
                       metadata: dict[str, str] | None = None) -> None:
    """Write `model` in TAESD's own key layout (what `load_tiny_decoder` and other TAESD readers expect)."""
    from ..checkpoints.files import write_safetensors

    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, sd.__getitem__, metadata)
