"""Upscale model files (UPSCALE_MODEL): read safely, recognise the architecture, build it, run it tile by tile.

A file is read with `files.read_state_dict` (safetensors memory-mapped; pickles with `weights_only=True`, and
BasicSR's `params_ema`/`params` wrappers unwrapped there); a `module.` prefix left by DataParallel training is
stripped here. Each architecture of `diffusion.models.upscalers.ARCHITECTURES` is then asked, in order, whether
the keys and shapes are its own; the first that answers builds the network on the meta device and the file's
tensors are assigned into it (`loader.fill_module`: every key required, shapes checked).

`UpscaleModel` is the handle nodes pass around. It runs the network through the model manager (so it moves to
the compute device like any other model and leaves when memory is short) in overlapping tiles, 512 input
pixels with 32 of overlap as ComfyUI does, halving the tile on out-of-memory down to 128. Tiles are blended
with `diffusion.tiling`'s linear ramps over the middle half of each overlap, each tile's outer quarter of it
dropped (those pixels saw zero padding instead of their neighbours), so there are no seams.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory import ModelManager
from ..models import upscalers
from ..patches.patcher import ModelPatcher
from ..tiling import tile_spans, tiled_apply
from .files import CheckpointError, key_prefixes, read_state_dict, write_safetensors
from .loader import fill_module

log = logging.getLogger(__name__)

TILE, OVERLAP, MIN_TILE = 512, 32, 128  # input pixels; ComfyUI's ImageUpscaleWithModel values
DEFAULT_WIDTH = 64  # feature channels assumed by estimates for an architecture that does not declare its own
SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def clean_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without a `module.` prefix on every key (DataParallel-trained files)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def detect_architecture(state_dict: dict[str, Tensor], path: str | os.PathLike = "") -> tuple[ModuleType, Any]:
    """(architecture module, config) for a cleaned state dict; a CheckpointError naming the file otherwise."""
    for arch in upscalers.ARCHITECTURES:
        try:
            config = arch.detect(state_dict)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: looks like {arch.ARCH_NAME} but cannot be read as one: {e}") from None
        if config is not None:
            return arch, config
    raise CheckpointError(f"{path}: {_not_an_upscaler(state_dict)}")


def _not_an_upscaler(state_dict: dict[str, Tensor]) -> str:
    known = ", ".join(a.ARCH_NAME for a in upscalers.ARCHITECTURES)
    if any(k.startswith(SD_PREFIXES) for k in state_dict):
        return (f"this is a Stable Diffusion checkpoint, not an upscale model (load it with Load Checkpoint); "
                f"upscale models known here: {known}")
    keys = sorted(state_dict)[:5]
    prefixes = dict(sorted(key_prefixes(state_dict).items(), key=lambda kv: -kv[1])[:6])
    return (f"not an upscale model of a known architecture ({known}): {len(state_dict)} keys such as {keys}, "
            f"prefixes {prefixes}")


def load_upscaler(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, ModuleType]:
    """(network on the CPU in `dtype` (None: as stored, half precision → fp32), config, architecture module)."""
    sd = clean_keys(read_state_dict(path))
    arch, config = detect_architecture(sd, path)
    if dtype is None:
        stored = next(iter(sd.values())).dtype
        dtype = torch.float32 if stored in (torch.float16, torch.bfloat16) or not stored.is_floating_point else stored
    try:
        with torch.device("meta"):
            module = arch.build(config)
        module = fill_module(module, arch.module_state_dict(sd, config), arch.ARCH_NAME, dtype, torch.device("cpu"))
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    log.info("%s: %s, ×%d, %s", Path(path).name, arch.ARCH_NAME, config.scale, config)
    return module, config, arch


def peek_config(path: str | os.PathLike) -> tuple[ModuleType, Any] | None:
    """(architecture, config) from a safetensors file's header alone (its tensors stay unread in the memory map);
    None for pickles, which would have to be read whole, and for files that are not upscale models."""
    try:
        sd = read_state_dict(path) if Path(path).suffix.lower() in (".safetensors", ".sft") else None
        return detect_architecture(clean_keys(sd), path) if sd else None
    except (CheckpointError, OSError):
        return None


def activation_bytes(arch: ModuleType | None, config: Any, height: int, width: int, itemsize: int) -> int:
    """Peak activation bytes of one forward over a `height`×`width` tile: the architecture's own count when it
    declares `activation_elements`, else three maps of its width at the output size."""
    if arch is not None and hasattr(arch, "activation_elements"):
        return arch.activation_elements(config, height, width) * itemsize
    width_channels = getattr(config, "num_feat", getattr(config, "embed_dim", DEFAULT_WIDTH))
    return 3 * width_channels * height * width * getattr(config, "scale", 4) ** 2 * itemsize


@dataclasses.dataclass
class UpscaleModel:
    """UPSCALE_MODEL: a network that maps an image to one `scale` times larger, and how to run it."""

    patcher: ModelPatcher
    config: Any
    arch: ModuleType
    manager: ModelManager
    dtype: torch.dtype

    @property
    def scale(self) -> int:
        return int(self.config.scale)

    @property
    def arch_name(self) -> str:
        return self.arch.ARCH_NAME

    def upscale(self, images: Tensor, *, tile: int = TILE, overlap: int = OVERLAP, min_tile: int = MIN_TILE,
                progress: Callable[[int, int], None] | None = None) -> Tensor:
        """images [B, H, W, C] in 0..1 -> [B, H*scale, W*scale, C] in 0..1, float32 on the CPU.

        Colour channels go through the network; a 4th (alpha) channel is resized bicubically beside them, a
        grey image is run as grey-on-all-channels and averaged back. Other channel counts are refused."""
        channels = images.shape[-1]
        colour = self._colour_input(images)
        while True:
            try:
                out = self._run(colour, tile, overlap, progress)
                break
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not _out_of_memory(exc) or tile // 2 < min_tile:
                    raise
                tile //= 2
                log.warning("%s ran out of memory; retrying with %d-pixel tiles", self.arch_name, tile)
                if self.manager.device.type == "cuda":
                    torch.cuda.empty_cache()
        out = out.clamp_(0, 1)
        if channels == 1 and self.config.in_channels != 1:
            out = out.mean(dim=1, keepdim=True)
        if channels == self.config.in_channels + 1:  # alpha
            alpha = F.interpolate(images[..., -1:].movedim(-1, 1).float(), scale_factor=self.scale, mode="bicubic")
            out = torch.cat([out, alpha.clamp(0, 1)], dim=1)
        return out.movedim(1, -1).contiguous()

    def _colour_input(self, images: Tensor) -> Tensor:
        expected, channels = self.config.in_channels, images.shape[-1]
        if images.ndim != 4:
            raise ValueError(f"expected an IMAGE [batch, height, width, channels], got shape {list(images.shape)}")
        if channels in (expected, expected + 1):
            return images[..., :expected].movedim(-1, 1)
        if channels == 1:
            return images.movedim(-1, 1).expand(-1, expected, -1, -1)
        raise ValueError(f"the image has {channels} channels; this {self.arch_name} model takes {expected} "
                         f"(or {expected + 1} with alpha, or 1 for grey)")

    def _run(self, x: Tensor, tile: int, overlap: int, progress: Callable[[int, int], None] | None) -> Tensor:
        h, w = x.shape[-2:]
        tiles = len(tile_spans(h, tile, overlap)) * len(tile_spans(w, tile, overlap))
        total, done = tiles * x.shape[0], 0
        extra = activation_bytes(self.arch, self.config, min(h, tile), min(w, tile), self.dtype.itemsize)
        outputs = []
        with self.manager.use([self.patcher], extra_memory=extra) as (module,), torch.no_grad():
            device = self.manager.device

            def run_tile(piece: Tensor) -> Tensor:
                nonlocal done
                result = module(piece.to(device, self.dtype)).float().cpu()
                done += 1
                if progress is not None:
                    progress(done, total)
                return result

            for image in x:
                outputs.append(tiled_apply(run_tile, image[None].float(), tile, overlap, up=self.scale,
                                           trim=overlap // 4))
        return torch.cat(outputs)


OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def _out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or any(words in message for words in OUT_OF_MEMORY_WORDS)


def load_upscale_model(path: str | os.PathLike, manager: ModelManager, *, dtype: torch.dtype | None = None,
                       name: str | None = None) -> UpscaleModel:
    """The UPSCALE_MODEL handle of a file, its module resting on the CPU and managed by `manager`."""
    module, config, arch = load_upscaler(path, dtype=dtype)
    patcher = ModelPatcher(module, manager.device, "cpu", name=name or Path(path).stem)
    return UpscaleModel(patcher, config, arch, manager, next(module.parameters()).dtype)


# --- random-weight files for tests and benchmarks -----------------------------------------------------------


def random_upscaler_state(arch: str, scale: int = 4, *, channels: int = 3, num_feat: int = 8, num_block: int = 1,
                          num_grow: int = 4, num_conv: int = 2, old_layout: bool = False,
                          seed: int = 0) -> dict[str, Tensor]:
    """A random state dict in a real file layout: arch "rrdbnet" (BasicSR keys, or the original ESRGAN
    `model.N` keys with `old_layout`; scale 1 and 2 pixel-unshuffle as Real-ESRGAN's x1/x2 do) or "srvgg".
    Convs get He-scaled weights, the last conv's shrunk so that outputs vary by about ±0.15 (around a bias of
    0.5 for RRDBNet, around the enlarged input for the compact model): they depend on the input's content and
    stay mostly inside 0..1, so clamping does not hide differences in tests."""
    from ..models.upscalers import rrdbnet, srvgg

    if arch == "rrdbnet":
        unshuffle = {1: 4, 2: 2}.get(scale, 1)
        upsamples = (scale * unshuffle).bit_length() - 1
        if 2**upsamples != scale * unshuffle:
            raise ValueError(f"RRDBNet scales are 1, 2 and powers of two; got {scale}")
        config: Any = rrdbnet.RRDBConfig(channels, channels, num_feat, num_block, num_grow, upsamples, unshuffle,
                                         old_layout)
        module: nn.Module = rrdbnet.build(config)
    elif arch == "srvgg":
        config = srvgg.SRVGGConfig(channels, channels, num_feat, num_conv, scale)
        module = srvgg.build(config)
    else:
        raise ValueError(f"unknown upscaler architecture {arch!r}: expected 'rrdbnet' or 'srvgg'")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if value.ndim == 4:  # He-scaled convs; dense blocks shrunk by 0.1 as BasicSR initialises them
            fan_in = value.shape[1] * value.shape[2] * value.shape[3]
            shrink = 0.1 if key.startswith("body.") and arch == "rrdbnet" else 1.0
            state[key] = torch.randn(value.shape, generator=gen) * (2 / fan_in) ** 0.5 * shrink
        elif key.endswith("bias"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.01
        else:  # PReLU slopes
            state[key] = torch.full(value.shape, 0.25) + torch.randn(value.shape, generator=gen) * 0.05
    last = "conv_last" if arch == "rrdbnet" else f"body.{2 * num_conv + 2}"
    state[f"{last}.weight"] = state[f"{last}.weight"] * 0.15  # outputs vary by about ±0.15
    if arch == "rrdbnet":
        state["conv_last.bias"] = torch.full_like(state["conv_last.bias"], 0.5)
        if old_layout:
            state = {rrdbnet.esrgan_key(k, config): v for k, v in state.items()}
    return state


def write_random_upscale_model(path: str | os.PathLike, arch: str = "rrdbnet", scale: int = 4, *,
                               dtype: torch.dtype = torch.float32, wrapper: str | None = None,
                               **options: Any) -> dict[str, Tensor]:
    """Write `random_upscaler_state(arch, scale, **options)` to `path`: safetensors for .safetensors/.sft, else a
    torch pickle, under `wrapper` ("params_ema", "params") when given, as BasicSR saves. Returns the tensors."""
    state = {k: v.to(dtype) for k, v in random_upscaler_state(arch, scale, **options).items()}
    if Path(path).suffix.lower() in (".safetensors", ".sft"):
        if wrapper is not None:
            raise ValueError("safetensors files are flat: no wrapper key")
        write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}, state.__getitem__)
    else:
        torch.save({wrapper: state} if wrapper else state, path)
    return state
