"""Latent transforms and arithmetic: crop, flip, rotate, add, subtract, multiply, rebatch.

Names, inputs, defaults and ranges are ComfyUI's. Positions and sizes are in pixels (8 per latent unit). Where
ComfyUI leaves a latent's `noise_mask` as it was while transforming its samples, these nodes crop, flip or turn
the mask with the samples, so the inpainted region stays where the picture is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from graph.node import Combo, Float, Int, Node, Output, Socket
from graph.types import LATENT
from nodes.image_ops import FLIP_METHODS, ROTATIONS, flip_dims, quarter_turns, rotate_clockwise
from nodes.latent import _like, batch_indices
from nodes.tensor_ops import MAX_RESOLUTION, resize


def _with_mask(latent: dict[str, Any], samples: torch.Tensor, transform: Any = None) -> dict[str, Any]:
    """A copy of the latent with new samples; its noise mask ([B, 1, h, w], any resolution) goes through
    `transform(mask, scale)` where scale is the mask's size over the samples' (how many mask pixels a latent unit
    is), or is kept when transform is None."""
    out = dict(latent)
    out["samples"] = samples
    mask = latent.get("noise_mask")
    if mask is not None and transform is not None:
        scale = mask.shape[-1] / latent["samples"].shape[-1], mask.shape[-2] / latent["samples"].shape[-2]
        out["noise_mask"] = transform(mask, scale)
    return out


class LatentCrop(Node):
    display_name = "Crop Latent"
    category = "latent/transform"
    inputs = [Socket("samples", LATENT), Int("width", default=512, min=64, max=MAX_RESOLUTION, step=8),
              Int("height", default=512, min=64, max=MAX_RESOLUTION, step=8),
              Int("x", default=0, min=0, max=MAX_RESOLUTION, step=8),
              Int("y", default=0, min=0, max=MAX_RESOLUTION, step=8)]
    outputs = [Output(LATENT)]

    @staticmethod
    def box(latent_height: int, latent_width: int, width: int, height: int, x: int, y: int) -> tuple[int, ...]:
        """(top, bottom, left, right) in latent units: a corner is moved in so that at least 8 units (64 pixels)
        remain after it, as ComfyUI does; the far edges stop at the latent's."""
        left = max(0, min(x // 8, latent_width - 8))
        top = max(0, min(y // 8, latent_height - 8))
        return top, min(latent_height, top + height // 8), left, min(latent_width, left + width // 8)

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        from nodes.estimates import samples_of

        spec = samples_of(shapes.get("samples"))
        if spec is None:
            return None
        top, bottom, left, right = cls.box(spec.shape[2], spec.shape[3], inputs["width"], inputs["height"],
                                           inputs["x"], inputs["y"])
        return _like(shapes.get("samples"), height=bottom - top, width=right - left, keep_mask=False)

    def execute(self, samples, width, height, x, y):
        x0 = samples["samples"]
        top, bottom, left, right = self.box(x0.shape[2], x0.shape[3], width, height, x, y)

        def crop(mask: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
            sx, sy = scale
            return mask[..., round(top * sy):round(bottom * sy), round(left * sx):round(right * sx)].clone()

        return (_with_mask(samples, x0[..., top:bottom, left:right].clone(), crop),)


class LatentFlip(Node):
    display_name = "Flip Latent"
    category = "latent/transform"
    inputs = [Socket("samples", LATENT), Combo("flip_method", FLIP_METHODS)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples"))

    def execute(self, samples, flip_method):
        dims = flip_dims(flip_method, 2)
        return (_with_mask(samples, torch.flip(samples["samples"], dims=dims), lambda m, _: torch.flip(m, dims=dims)),)


class LatentRotate(Node):
    display_name = "Rotate Latent"
    category = "latent/transform"
    inputs = [Socket("samples", LATENT), Combo("rotation", ROTATIONS)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        from nodes.estimates import samples_of

        spec = samples_of(shapes.get("samples"))
        if spec is None or quarter_turns(inputs["rotation"]) % 2 == 0:
            return _like(shapes.get("samples"))
        return _like(shapes.get("samples"), height=spec.shape[3], width=spec.shape[2])

    def execute(self, samples, rotation):
        turns = quarter_turns(rotation)
        return (_with_mask(samples, rotate_clockwise(samples["samples"], turns, 2),
                           lambda m, _: rotate_clockwise(m, turns, 2)),)


def fit_latent(target: torch.Tensor, latent: torch.Tensor, node: str) -> torch.Tensor:
    """`latent` made the shape of `target` for element-wise arithmetic: scaled (bilinear, centre crop to the aspect
    ratio) to its height and width, then its batch cut or cycled to the target's batch size."""
    if latent.shape[1:] != target.shape[1:]:
        if latent.shape[1] != target.shape[1]:
            raise ValueError(f"{node}: samples1 has {target.shape[1]} channels and samples2 {latent.shape[1]}; latents "
                             f"of different models cannot be combined")
        latent = resize(latent, target.shape[3], target.shape[2], "bilinear", "center")
    batch = target.shape[0]
    if latent.shape[0] < batch:
        latent = latent.repeat(-(-batch // latent.shape[0]), 1, 1, 1)
    return latent[:batch]


class LatentAdd(Node):
    category = "latent/advanced"
    inputs = [Socket("samples1", LATENT), Socket("samples2", LATENT)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples1"), copies=1.0)

    def execute(self, samples1, samples2):
        a = samples1["samples"]
        return (_with_mask(samples1, a + fit_latent(a, samples2["samples"], "LatentAdd")),)


class LatentSubtract(Node):
    category = "latent/advanced"
    inputs = [Socket("samples1", LATENT), Socket("samples2", LATENT)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples1"), copies=1.0)

    def execute(self, samples1, samples2):
        a = samples1["samples"]
        return (_with_mask(samples1, a - fit_latent(a, samples2["samples"], "LatentSubtract")),)


class LatentMultiply(Node):
    category = "latent/advanced"
    inputs = [Socket("samples", LATENT), Float("multiplier", default=1.0, min=-10.0, max=10.0, step=0.01)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples"))

    def execute(self, samples, multiplier):
        return (_with_mask(samples, samples["samples"] * multiplier),)


def _items(latent: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """(samples [1, C, h, w], noise mask [1, 1, H, W] or None, batch index) of each entry of a latent batch; a mask
    with fewer entries than the batch is cycled, as the sampler does."""
    x, mask = latent["samples"], latent.get("noise_mask")
    indices = batch_indices(latent)
    return [(x[i:i + 1], None if mask is None else mask[i % mask.shape[0]:i % mask.shape[0] + 1], indices[i])
            for i in range(x.shape[0])]


def _batch(items: list[tuple[torch.Tensor, torch.Tensor | None, int]]) -> dict[str, Any]:
    """One LATENT of items of equal shape. When some have a noise mask, those without get an all-ones mask (the
    whole entry is repainted, what no mask means), all at the first mask's size."""
    out: dict[str, Any] = {"samples": torch.cat([s for s, _, _ in items]), "batch_index": [i for _, _, i in items]}
    masks = [m for _, m, _ in items]
    first = next((m for m in masks if m is not None), None)
    if first is not None:
        size = first.shape[-2:]
        out["noise_mask"] = torch.cat([
            first.new_ones(1, 1, *size) if m is None
            else m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in masks])
    return out


class RebatchLatents(Node):
    """Takes every entry of every incoming latent batch, in order, and regroups them into batches of batch_size:
    a list output, so the nodes after it run once per batch. Entries of another size than the ones before start a
    new batch; noise masks and batch indices (each entry's noise seed offset) travel with their entries."""

    display_name = "Rebatch Latents"
    category = "latent/batch"
    input_is_list = True
    inputs = [Socket("latents", LATENT), Int("batch_size", default=1, min=1, max=4096, step=None)]
    outputs = [Output(LATENT, is_list=True)]

    def execute(self, latents, batch_size):
        size = batch_size[0]
        batches: list[dict[str, Any]] = []
        current: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        for latent in latents:
            for item in _items(latent):
                if current and (len(current) == size or current[0][0].shape != item[0].shape):
                    batches.append(_batch(current))
                    current = []
                current.append(item)
        if current:
            batches.append(_batch(current))
        return (batches,)


NODE_CLASSES = [LatentCrop, LatentFlip, LatentRotate, LatentAdd, LatentSubtract, LatentMultiply, RebatchLatents]
