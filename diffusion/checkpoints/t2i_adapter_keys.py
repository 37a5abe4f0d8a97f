"""T2I-Adapter files: the two key layouts, telling an adapter from other files, and its shape from keys and shapes.

Layouts:
- the original TencentARC release (`t2iadapter_*_sd14v1.pth`, `*_sd15v2.pth`, ...; our attribute names): full
  adapter `conv_in.*`, `body.{level * nums_rb + j}.{in_conv,block1,block2,down_opt.op}.*`; light adapter
  `body.{i}.{in_conv,out_conv}.*`, `body.{i}.body.{j}.{block1,block2}.*`;
- diffusers' T2IAdapter (`diffusion_pytorch_model.safetensors` of TencentARC/t2i-adapter-*-sdxl-1.0 and the
  converted SD1 ones): everything under `adapter.`, blocks per level as `body.{i}.resnets.{j}`, the width change as
  `body.{i}.in_conv`.
Some pickles wrap the weights in a dict under `adapter` (training checkpoints); that wrapper is unwrapped too.

What the keys do not say is read from shapes: the unshuffle factor and hint channels from the first conv's input
(in_channels x factor²: 64 or 192 for SD1.x adapters, 256 or 768 for SDXL's, as ComfyUI reads them), the widths
from each level's convs, `nums_rb` from where the widths change, the kernel from `block2`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ..models.t2i_adapter import T2IAdapterConfig
from .files import CheckpointError

DIFFUSERS_PREFIX = "adapter."
LAYOUTS = ("original", "diffusers")
# First-conv input channels -> (unshuffle factor, hint channels, SDXL pattern)
CIN = {64: (8, 1, False), 192: (8, 3, False), 256: (16, 1, True), 768: (16, 3, True)}


def looks_like_t2i_adapter(sd: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a T2I-Adapter in either layout (cheap: keys only)."""
    keys = set(sd)
    bare = {k[len(DIFFUSERS_PREFIX):] for k in keys if k.startswith(DIFFUSERS_PREFIX)} or keys
    full = {"conv_in.weight", "body.0.block1.weight"} <= bare
    light = {"body.0.in_conv.weight", "body.0.body.0.block1.weight", "body.0.out_conv.weight"} <= bare
    diffusers = "body.0.resnets.0.block1.weight" in bare
    return full or light or diffusers


def _bare(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    prefixed = {k[len(DIFFUSERS_PREFIX):]: v for k, v in sd.items() if k.startswith(DIFFUSERS_PREFIX)}
    return prefixed or dict(sd)


_DIFFUSERS_BLOCK = re.compile(r"body\.(\d+)\.resnets\.(\d+)\.(.*)")
_DIFFUSERS_LEVEL = re.compile(r"body\.(\d+)\.(in_conv|out_conv)\.(.*)")


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers' T2IAdapter weights (with or without `adapter.`) under the original names."""
    bare = _bare(sd)
    light = "body.0.out_conv.weight" in bare
    nums_rb = len({m.group(2) for k in bare if (m := _DIFFUSERS_BLOCK.fullmatch(k)) and m.group(1) == "0"})
    out = {}
    for key, value in bare.items():
        if (m := _DIFFUSERS_BLOCK.fullmatch(key)) is not None:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            out[f"body.{i}.body.{j}.{rest}" if light else f"body.{i * nums_rb + j}.{rest}"] = value
        elif (m := _DIFFUSERS_LEVEL.fullmatch(key)) is not None and not light:
            out[f"body.{int(m.group(1)) * nums_rb}.{m.group(2)}.{m.group(3)}"] = value
        else:  # conv_in, the light adapter's in_conv/out_conv: same names
            out[key] = value
    return out


def original_to_diffusers(sd: Mapping[str, Tensor], config: T2IAdapterConfig) -> dict[str, Tensor]:
    """Original-layout weights of an adapter of `config` under diffusers' names (with `adapter.`). Strided-conv
    downsamples have no diffusers counterpart."""
    if config.conv_down:
        raise ValueError("diffusers' T2IAdapter has no strided-conv downsample (down_opt.op): no diffusers layout")
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "body" and config.variant == "light" and parts[2] == "body":
            name = f"body.{parts[1]}.resnets.{parts[3]}.{'.'.join(parts[4:])}"
        elif parts[0] == "body" and config.variant == "full":
            level, j = divmod(int(parts[1]), config.nums_rb)
            if parts[2] == "in_conv":
                name = f"body.{level}.in_conv.{'.'.join(parts[3:])}"
            else:
                name = f"body.{level}.resnets.{j}.{'.'.join(parts[2:])}"
        else:
            name = key
        out[DIFFUSERS_PREFIX + name] = value
    return out


def adapter_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """(the weights under the original names, the layout they were stored in); a CheckpointError when the keys
    are not a T2I-Adapter's."""
    if not looks_like_t2i_adapter(sd):
        raise CheckpointError(f"not a T2I-Adapter: found {len(sd)} keys such as {sorted(sd)[:4]}; a T2I-Adapter has "
                              f"conv_in.* and body.* (original layout) or adapter.body.*.resnets.* (diffusers)")
    if any(".resnets." in k for k in sd):
        return diffusers_to_original(sd), "diffusers"
    return _bare(sd), "original"


def _first_conv(sd: Mapping[str, Tensor], key: str) -> tuple[int, int, bool]:
    cin = int(sd[key].shape[1])
    if cin not in CIN:
        raise CheckpointError(f"T2I-Adapter {key} reads {cin} channels; expected one of {sorted(CIN)} (hint channels "
                              f"x the pixel-unshuffle factor squared: 1 or 3 channels, 8x for SD1.x, 16x for SDXL)")
    return CIN[cin]


def _width(sd: Mapping[str, Tensor], key: str) -> int:
    return int(sd[key].shape[0])


def adapter_config(sd: Mapping[str, Tensor]) -> T2IAdapterConfig:
    """The shape of an adapter from its original-layout weights."""
    body = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
    if not body or body != list(range(len(body))):
        raise CheckpointError(f"T2I-Adapter body blocks are not numbered 0..n: found body.{body}")
    if "conv_in.weight" not in sd:  # light adapter
        unshuffle, hint, xl = _first_conv(sd, "body.0.in_conv.weight")
        if xl:
            raise CheckpointError("light T2I-Adapter with an SDXL-sized input: only SD1.x light adapters exist")
        nums_rb = len({k.split(".")[3] for k in sd if k.startswith("body.0.body.")})
        channels = tuple(_width(sd, f"body.{i}.out_conv.weight") for i in body)
        return T2IAdapterConfig("light", hint, channels, nums_rb, unshuffle)
    unshuffle, hint, xl = _first_conv(sd, "conv_in.weight")
    changes = [i for i in body if f"body.{i}.in_conv.weight" in sd or f"body.{i}.down_opt.op.weight" in sd]
    nums_rb = changes[0] if changes else len(body) // 4
    if nums_rb <= 0 or len(body) % nums_rb:
        raise CheckpointError(f"T2I-Adapter with {len(body)} body blocks cannot be split into levels (first width "
                              f"change at body.{nums_rb})")
    channels = tuple(_width(sd, f"body.{i * nums_rb}.block1.weight") for i in range(len(body) // nums_rb))
    ksize = int(sd["body.0.block2.weight"].shape[-1])
    conv_down = any(k.endswith("down_opt.op.weight") for k in sd)
    try:
        return T2IAdapterConfig("full", hint, channels, nums_rb, unshuffle, xl, ksize, conv_down)
    except ValueError as e:
        raise CheckpointError(f"unsupported T2I-Adapter: {e}") from None
