"""AnimateDiff motion module files: reading, version detection, key maps, random files for tests.

What tells the releases apart (keys and shapes only, nothing is trusted from file names):
- the innermost level wider than the one before (three levels, 320/640/1280 at real size; SD1.x's last two are
  both 1280): the SDXL beta (`mm_sdxl_v10_beta`);
- a `mid_block.motion_modules.0` module: v2 (`mm_sd_v15_v2`);
- otherwise the position encoding's length: 24 frames is v1 (`mm_sd_v14`, `mm_sd_v15`), 32 is v3
  (`v3_sd15_mm`).
Files in diffusers' layout (`MotionAdapter`: `attn1`, `norm1`, no `temporal_transformer`, one `pos_embed` per
block) are mapped to the original names (`diffusers_to_original`). Reading goes through `files.py`'s safe
readers, so a `.ckpt` never runs pickled code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..models.motion_module import MotionConfig, MotionModuleSet, sinusoidal_positions
from .files import CheckpointError, read_state_dict, write_safetensors

_MODULE_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.(\d+)\.")
_PROJ_IN = re.compile(r"^down_blocks\.(\d+)\.motion_modules\.0\.temporal_transformer\.proj_in\.weight$")
_BLOCK = re.compile(r"\.transformer_blocks\.(\d+)\.")
# diffusers' names inside one module -> the original names
_DIFFUSERS_PARTS = ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                    (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."))


def _strip_wrappers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Some files keep the weights under `module.` (saved from a DataParallel wrapper)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def is_diffusers_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(".attn1." in k for k in sd) and not any(".temporal_transformer." in k for k in sd)


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A `MotionAdapter` state dict in the original AnimateDiff names. diffusers keeps one position encoding
    per transformer block (`pos_embed.pe`); the original has one per attention, both the same sinusoid."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^((?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+|mid_block\.motion_modules\.\d+)\.(.*)$",
                     key)
        if m is None:
            raise CheckpointError(f"not a motion module key: {key!r}")
        head, rest = m.group(1), "." + m.group(2)
        if rest.endswith(".pos_embed.pe"):
            block = rest[: -len(".pos_embed.pe")]
            for i in (0, 1):
                out[f"{head}.temporal_transformer{block}.attention_blocks.{i}.pos_encoder.pe"] = value
            continue
        for old, new in _DIFFUSERS_PARTS:
            rest = rest.replace(old, new)
        out[f"{head}.temporal_transformer{rest}"] = value
    return out


def original_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The original names in diffusers' `MotionAdapter` layout (the position encodings become one
    `pos_embed.pe` per transformer block)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = key.replace(".temporal_transformer", "")
        if ".pos_encoder.pe" in key:
            out[re.sub(r"\.attention_blocks\.\d+\.pos_encoder\.pe$", ".pos_embed.pe", key)] = value
            continue
        for new, old in _DIFFUSERS_PARTS:
            key = key.replace(old, new)
        out[key] = value
    return out


def detect_motion_config(sd: Mapping[str, Tensor], name: str = "motion module") -> MotionConfig:
    """The MotionConfig of an original-layout state dict; a file that is not a motion module (or a kind we
    do not support, such as HotShot-XL's) is a CheckpointError naming `name`."""
    levels = sorted({int(m.group(1)): sd[k] for k in sd if (m := _PROJ_IN.match(k))}.items())
    if not levels:
        sample = ", ".join(list(sd)[:3])
        raise CheckpointError(f"{name} is not an AnimateDiff motion module: no "
                              f"'down_blocks.N.motion_modules.0.temporal_transformer.proj_in.weight' key "
                              f"(first keys: {sample})")
    channels = tuple(int(w.shape[1]) for _, w in levels)
    counts: dict[str, dict[int, set[int]]] = {"down_blocks": {}, "up_blocks": {}}
    for key in sd:
        if m := _MODULE_KEY.match(key):
            counts[m.group(1)].setdefault(int(m.group(2)), set()).add(int(m.group(3)))
    down = {len(v) for v in counts["down_blocks"].values()}
    up = {len(v) for v in counts["up_blocks"].values()}
    if len(down) != 1 or len(up) != 1 or len(counts["up_blocks"]) != len(channels):
        raise CheckpointError(f"{name}: unsupported motion module layout (modules per level: down {sorted(down)}, "
                              f"up {sorted(up)}, {len(counts['up_blocks'])} up levels for {len(channels)} down)")
    pe = next((v for k, v in sd.items() if k.endswith(".pos_encoder.pe")), None)
    if pe is None:
        raise CheckpointError(f"{name}: motion modules without position encodings (HotShot-XL style) are not "
                              f"supported")
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.search(k))}
    mid = any(k.startswith("mid_block.motion_modules.0.") for k in sd)
    max_len = int(pe.shape[1])
    if len(channels) < 2 or channels[-1] != channels[-2]:  # SD1.x's two innermost levels are equally wide
        version = "sdxl_beta"
    elif mid:
        version = "v2"
    else:
        version = "v1" if max_len <= 24 else "v3"
    return MotionConfig(channels=channels, down_per_level=down.pop(), up_per_level=up.pop(), mid=mid,
                        max_len=max_len, blocks=max(blocks) + 1, version=version,
                        groups=min(32, channels[0]))


def build_motion_modules(sd: Mapping[str, Tensor], name: str = "motion module") -> MotionModuleSet:
    """The MotionModuleSet of a state dict (either layout), weights loaded strictly: a missing or extra key
    is an error naming the file."""
    sd = _strip_wrappers(sd)
    if is_diffusers_layout(sd):
        sd = diffusers_to_original(sd)
    config = detect_motion_config(sd, name)
    module = MotionModuleSet(config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{name} ({config.version}): {len(missing)} missing keys (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    for key, value in sd.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{name}: {key} has shape {list(value.shape)}, expected "
                                  f"{list(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in sd.items()})
    return module.eval().requires_grad_(False)


def load_motion_file(path: str | os.PathLike) -> MotionModuleSet:
    """Reads a `.safetensors` or `.ckpt` motion module through the safe readers and builds it."""
    return build_motion_modules(read_state_dict(path), Path(path).name)


def random_motion_state_dict(config: MotionConfig, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random weights of `config` in the original layout, every layer non-zero (the releases'
    zero-initialised `proj_out` would hide bugs), position encodings the true sinusoids."""
    module = MotionModuleSet(config)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in module.state_dict().items():
        if key.endswith(".pe"):
            sd[key] = sinusoidal_positions(value.shape[1], value.shape[2])
        elif value.ndim == 1 and key.endswith("weight"):
            sd[key] = 1.0 + 0.2 * torch.randn(value.shape, generator=gen)
        elif value.ndim == 1:
            sd[key] = 0.1 * torch.randn(value.shape, generator=gen)
        else:
            sd[key] = torch.randn(value.shape, generator=gen) / value.shape[1] ** 0.5
    return sd


def tiny_motion_config(version: str, channels: tuple[int, ...] = (32, 64)) -> MotionConfig:
    """A small config of a release's layout (for tests: pair it with a UNet of the same widths)."""
    layouts = {"v1": (False, 24), "v2": (True, 32), "v3": (False, 32), "sdxl_beta": (False, 32)}
    if version not in layouts:
        raise ValueError(f"unknown motion module version {version!r}; expected one of {sorted(layouts)}")
    mid, max_len = layouts[version]
    return MotionConfig(channels=channels, mid=mid, max_len=max_len, version=version, groups=min(32, channels[0]))


def write_motion_file(path: str | os.PathLike, sd: Mapping[str, Tensor], layout: str = "original") -> None:
    """Writes original-layout weights as a `.safetensors` file in `layout` ("original" or "diffusers")."""
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    named = dict(sd) if layout == "original" else original_to_diffusers(sd)
    named = {k: v.contiguous() for k, v in named.items()}
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in named.items()}, named.__getitem__)


_LORA_MODULE = r"(?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+|mid_block\.motion_modules\.\d+"
_LORA_KEY = re.compile(rf"^(?P<module>{_LORA_MODULE})"
                       r"\.(?P<inner>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.down\.weight$")


def motion_lora_deltas(sd: Mapping[str, Tensor], config: MotionConfig, name: str = "motion LoRA",
                       strength: float = 1.0) -> dict[str, Tensor]:
    """The weight changes (`strength` * up @ down) a motion LoRA makes, by motion module key.

    Motion LoRAs (AnimateDiff v2's camera moves and the like) hold low-rank pairs on the temporal attentions'
    projections, named `<module>.<attention>.processor.to_q_lora.down.weight` / `...up.weight` (diffusers' LoRA
    attention processors); `to_out_lora` is the module's `to_out.0`. Pairs on the middle block are skipped for a
    module set without one (a v2 LoRA on a v3 module)."""
    deltas: dict[str, Tensor] = {}
    for key, down in sd.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        if m.group("module").startswith("mid_block") and not config.mid:
            continue
        up = sd.get(key.replace(".down.weight", ".up.weight"))
        if up is None:
            raise CheckpointError(f"{name}: {key} has no matching up weight")
        proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
        target = f"{m.group('module')}.{m.group('inner')}.{proj}.weight"
        deltas[target] = strength * (up.float() @ down.float())
    if not deltas:
        raise CheckpointError(f"{name} is not a motion LoRA: no '...processor.to_q_lora.down.weight' keys on motion "
                              f"modules")
    return deltas


def read_motion_lora(path: str | os.PathLike) -> dict[str, Tensor]:
    """A motion LoRA's tensors, through the safe readers (a `.ckpt` runs no pickled code)."""
    return _strip_wrappers(read_state_dict(path))


def random_motion_lora(config: MotionConfig, rank: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """A seeded random motion LoRA on every temporal attention projection of `config` (for tests)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for key, value in MotionModuleSet(config).state_dict().items():
        m = re.match(r"^(.+)\.(to_q|to_k|to_v|to_out\.0)\.weight$", key)
        if m is None or ".attention_blocks." not in key:
            continue
        proj = "to_out" if m.group(2) == "to_out.0" else m.group(2)
        base = f"{m.group(1)}.processor.{proj}_lora"
        sd[f"{base}.down.weight"] = torch.randn(rank, value.shape[1], generator=gen) / value.shape[1] ** 0.5
        sd[f"{base}.up.weight"] = torch.randn(value.shape[0], rank, generator=gen) / rank**0.5
    return sd
