"""Reading, building and (for tests) writing T2I-Adapter files; layouts and detection are in t2i_adapter_keys.py.

`.safetensors` files are memory-mapped and `.pth`/`.bin` pickles go through the safe reader (files.py), which runs
no code. The family is the adapter's shape: a 16x unshuffle and SDXL's downsampling make an SDXL adapter, anything
else an SD1.x one (the released SD1.4/SD1.5 adapters; their widths equal SD2.x's UNet too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from .families import TITLES
from .files import CheckpointError, read_pickle, read_state_dict, write_safetensors
from .loader import _stored_dtype, fill_module
from .random_checkpoints import random_tensor
from .t2i_adapter_keys import LAYOUTS, adapter_config, adapter_state_dict, looks_like_t2i_adapter, original_to_diffusers

Tensor = torch.Tensor
WRAPPER = "adapter"  # training checkpoints keep the weights in a dict under this key


@dataclass(frozen=True)
class T2IAdapterInfo:
    """What an adapter file holds: its family ("sd1" or "sdxl"), the layout it was stored in and its shape."""

    family: str
    layout: str
    config: T2IAdapterConfig

    @property
    def title(self) -> str:
        return TITLES.get(self.family, self.family)


def _read(path: str | os.PathLike) -> dict[str, Tensor]:
    try:
        return read_state_dict(path)
    except CheckpointError:
        if Path(path).suffix.lower() == ".safetensors":
            raise
        loaded = read_pickle(path)  # weights-only: a dict {"adapter": {name: tensor}} from a training run
        inner = loaded.get(WRAPPER) if isinstance(loaded, dict) else None
        if not isinstance(inner, dict):
            raise
        return {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, Tensor)}


def is_t2i_adapter_file(path: str | os.PathLike) -> bool:
    """Whether a file's keys are a T2I-Adapter's (cheap for safetensors: only the header is read)."""
    return looks_like_t2i_adapter(_read(path))


def read_t2i_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], T2IAdapterInfo]:
    """An adapter file's weights (original names; lazy views for safetensors) and what it is."""
    ours, layout = adapter_state_dict(_read(path))
    config = adapter_config(ours)
    return ours, T2IAdapterInfo(config.family, layout, config)


def build_t2i_adapter(sd: Mapping[str, Tensor], info: T2IAdapterInfo, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> T2IAdapter:
    """The adapter of `read_t2i_adapter`'s weights, built on the meta device and filled by assignment."""
    with torch.device("meta"):
        net = T2IAdapter(info.config)
    fill_module(net, sd, f"{info.title} T2I-Adapter", dtype or _stored_dtype(sd), torch.device(device))
    return net


def load_t2i_adapter(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> tuple[T2IAdapter, T2IAdapterInfo]:
    """`read_t2i_adapter` then `build_t2i_adapter`."""
    sd, info = read_t2i_adapter(path)
    return build_t2i_adapter(sd, info, dtype=dtype, device=device), info


# --- writing (tests) ------------------------------------------------------------------------------------------


def random_t2i_adapter(config: T2IAdapterConfig, *, seed: int = 0) -> dict[str, Tensor]:
    """Random weights (original names) of an adapter of `config`, scaled as random checkpoints are."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T2IAdapter(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, shape, gen) for k, shape in sorted(shapes.items())}


def config_for_unet(model_channels: int, channel_mult: tuple[int, ...], *, xl: bool = False,
                    variant: str = "full", in_channels: int = 3, nums_rb: int | None = None) -> T2IAdapterConfig:
    """The adapter whose features fit a UNet of these widths: one per level (SD1.x), or SDXL's four (its three
    levels and the middle block)."""
    widths = tuple(model_channels * m for m in channel_mult)
    if xl:
        widths = (*widths, widths[-1])
    nums_rb = nums_rb or (4 if variant == "light" else 2)
    return T2IAdapterConfig(variant, in_channels, widths, nums_rb, 16 if xl else 8, xl)


def write_t2i_adapter_file(path: str | os.PathLike, sd: Mapping[str, Tensor], config: T2IAdapterConfig, *,
                           layout: str = "original", dtype: torch.dtype = torch.float32) -> None:
    """Write original-layout weights as a `.safetensors` adapter file in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    named = dict(sd) if layout == "original" else original_to_diffusers(sd, config)
    shapes = {k: (dtype, tuple(v.shape)) for k, v in named.items()}
    write_safetensors(path, shapes, lambda k: named[k].detach().to(dtype).contiguous(), {"format": "pt"})


def write_random_t2i_adapter(path: str | os.PathLike, config: T2IAdapterConfig, *, seed: int = 0,
                             layout: str = "original") -> dict[str, Tensor]:
    """A random adapter file of `config`; returns its weights (original names)."""
    sd = random_t2i_adapter(config, seed=seed)
    write_t2i_adapter_file(path, sd, config, layout=layout)
    return sd
