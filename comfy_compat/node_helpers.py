"""ComfyUI's `node_helpers` for packs: conditioning options, Pillow calls, hashing, dtype names."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from PIL import ImageFile, UnidentifiedImageError


def conditioning_set_values(conditioning: list[Any], values: dict[str, Any] | None = None,
                            append: bool = False) -> list[Any]:
    """A copy of `conditioning` whose every entry's options have `values` set (or, with `append`, added to the
    lists already there)."""
    values = values or {}
    result = []
    for cond, options in conditioning:
        options = dict(options)
        for key, value in values.items():
            if append and key in options:
                options[key] = list(options[key]) + list(value)
            else:
                options[key] = value
        result.append([cond, options])
    return result


def pillow(fn: Callable[[Any], Any], arg: Any) -> Any:
    """`fn(arg)`, retried with truncated images allowed when Pillow refuses a damaged file."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def hasher() -> Callable[..., Any]:
    return hashlib.sha256


def string_to_torch_dtype(name: str) -> torch.dtype | None:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(name)


def image_alpha_fix(destination: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give both images the same channel count (an alpha channel of ones where one lacks it)."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., : destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        pad = torch.ones_like(source[..., :1])
        source = torch.cat([source, pad.expand(*source.shape[:-1], destination.shape[-1] - source.shape[-1])], -1)
    return destination, source


