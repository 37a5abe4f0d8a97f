"""Latent nodes that need no model: empty latents, upscale, composite, blend, batch operations,
interpolation, and the inpainting noise mask.

A LATENT is a dict `{"samples": [B, C, H/8, W/8], "noise_mask"?: [B, 1, H, W], "batch_index"?: [int]}`;
`batch_index` gives each image of a batch its own reproducible noise, so batch operations keep it right.
"""

from __future__ import annotations

from typing import Any

import torch

from graph.memory_estimate import MemoryEstimate, TensorSpec
from graph.node import Boolean, Combo, Float, Int, Node, Output, Socket
from graph.types import LATENT, MASK
from nodes.estimates import describe_latent, host_op, latent_shape, resized, samples_of, tensor_of
from nodes.tensor_ops import LATENT_UPSCALE_METHODS, MAX_RESOLUTION, as_mask_batch, composite, edge_ramp, resize

LATENT_CHANNELS = 4


def _size(name: str, default: int, minimum: int = 0, step: int = 8) -> Int:
    return Int(name, default=default, min=minimum, max=MAX_RESOLUTION, step=step)


def batch_indices(latent: dict[str, Any]) -> list[int]:
    return list(latent.get("batch_index", range(latent["samples"].shape[0])))


def _like(latent: Any, batch: int | None = None, height: int | None = None, width: int | None = None,
          copies: float = 0.0, keep_mask: bool = True) -> MemoryEstimate | None:
    """The estimate of a latent op whose output is a new `samples` tensor shaped like the input's, with the
    given dimensions changed; the noise mask, when kept, is the input's (not new memory)."""
    samples = samples_of(latent)
    if samples is None:
        return None
    b, _, h, w = samples.shape
    mask = latent.get("noise_mask") if keep_mask else None
    out = latent_shape(batch or b, height or h, width or w, mask)
    return host_op((out,), copies, describe_latent(out["samples"]), kept=out["samples"].nbytes)


class EmptyLatentImage(Node):
    display_name = "Empty Latent Image"
    category = "latent"
    description = "A batch of empty latents to start text-to-image sampling from."
    inputs = [_size("width", 512, 16), _size("height", 512, 16),
              Int("batch_size", default=1, min=1, max=4096, step=None)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        out = latent_shape(inputs["batch_size"], inputs["height"] // 8, inputs["width"] // 8)
        return MemoryEstimate(outputs=(out,), what=describe_latent(out["samples"]))

    def execute(self, width, height, batch_size):
        return ({"samples": torch.zeros(batch_size, LATENT_CHANNELS, height // 8, width // 8)},)


class LatentUpscale(Node):
    display_name = "Upscale Latent"
    category = "latent"
    inputs = [Socket("samples", LATENT), Combo("upscale_method", LATENT_UPSCALE_METHODS), _size("width", 512),
              _size("height", 512), Combo("crop", ["disabled", "center"])]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = samples_of(shapes.get("samples"))
        if spec is None or (inputs["width"] == 0 and inputs["height"] == 0):
            return _like(shapes.get("samples"), keep_mask=False)
        h, w = resized(spec.shape[2], spec.shape[3], inputs["width"] // 8, inputs["height"] // 8)
        return _like(shapes.get("samples"), height=h, width=w, copies=1.0, keep_mask=False)

    def execute(self, samples, upscale_method, width, height, crop):
        out = dict(samples)
        out["samples"] = resize(samples["samples"], width // 8, height // 8, upscale_method, crop)
        out.pop("noise_mask", None)
        return (out,)


class LatentUpscaleBy(Node):
    display_name = "Upscale Latent By"
    category = "latent"
    inputs = [Socket("samples", LATENT), Combo("upscale_method", LATENT_UPSCALE_METHODS),
              Float("scale_by", default=1.5, min=0.01, max=8.0, step=0.01)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = samples_of(shapes.get("samples"))
        if spec is None:
            return None
        scale = inputs["scale_by"]
        h, w = max(1, round(spec.shape[2] * scale)), max(1, round(spec.shape[3] * scale))
        return _like(shapes.get("samples"), height=h, width=w, copies=1.0, keep_mask=False)

    def execute(self, samples, upscale_method, scale_by):
        h, w = samples["samples"].shape[-2:]
        out = dict(samples)
        out["samples"] = resize(samples["samples"], max(1, round(w * scale_by)), max(1, round(h * scale_by)),
                                upscale_method)
        out.pop("noise_mask", None)
        return (out,)


class LatentComposite(Node):
    display_name = "Latent Composite"
    category = "latent"
    inputs = [Socket("samples_to", LATENT), Socket("samples_from", LATENT), _size("x", 0), _size("y", 0),
              _size("feather", 0)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples_to"), copies=1.0)

    def execute(self, samples_to, samples_from, x, y, feather):
        source = samples_from["samples"]
        mask = None
        if feather > 0:  # ramp the pasted edges that lie inside the destination over feather/8 latent pixels
            f = feather // 8
            (h, w), (dh, dw) = source.shape[-2:], samples_to["samples"].shape[-2:]
            top, left = y // 8, x // 8
            mask = edge_ramp(h, w, f if left > 0 else 0, f if top > 0 else 0, f if left + w < dw else 0,
                             f if top + h < dh else 0)
        out = dict(samples_to)
        out["samples"] = composite(samples_to["samples"], source, x, y, mask, multiplier=8)
        return (out,)


class LatentCompositeMasked(Node):
    category = "latent"
    inputs = [Socket("destination", LATENT), Socket("source", LATENT), _size("x", 0), _size("y", 0),
              Boolean("resize_source", default=False), Socket("mask", MASK, optional=True)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("destination"), copies=2.0)

    def execute(self, destination, source, x, y, resize_source, mask=None):
        out = dict(destination)
        out["samples"] = composite(destination["samples"], source["samples"], x, y, mask, 8, resize_source)
        return (out,)


class LatentBlend(Node):
    display_name = "Latent Blend"
    category = "_for_testing"
    inputs = [Socket("samples1", LATENT), Socket("samples2", LATENT),
              Float("blend_factor", default=0.5, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples1"), copies=2.0)

    def execute(self, samples1, samples2, blend_factor):
        a, b = samples1["samples"], samples2["samples"]
        if b.shape != a.shape:
            b = resize(b, a.shape[-1], a.shape[-2], "bicubic", "center")
        out = dict(samples1)
        out["samples"] = a * blend_factor + b * (1 - blend_factor)  # blend_factor weights samples1, as ComfyUI
        return (out,)


class LatentFromBatch(Node):
    display_name = "Latent From Batch"
    category = "latent/batch"
    inputs = [Socket("samples", LATENT), Int("batch_index", default=0, min=0, max=63, step=None),
              Int("length", default=1, min=1, max=64, step=None)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = samples_of(shapes.get("samples"))
        if spec is None:
            return None
        start = min(inputs["batch_index"], spec.shape[0] - 1)
        return _like(shapes.get("samples"), batch=min(spec.shape[0], start + inputs["length"]) - start)

    def execute(self, samples, batch_index, length):
        x = samples["samples"]
        start = min(batch_index, x.shape[0] - 1)
        stop = min(x.shape[0], start + length)
        out = {"samples": x[start:stop].clone(), "batch_index": batch_indices(samples)[start:stop]}
        mask = samples.get("noise_mask")
        if mask is not None:
            out["noise_mask"] = mask[start:stop].clone() if mask.shape[0] > 1 else mask.clone()
        return (out,)


class RepeatLatentBatch(Node):
    display_name = "Repeat Latent Batch"
    category = "latent/batch"
    inputs = [Socket("samples", LATENT), Int("amount", default=1, min=1, max=64, step=None)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        spec = samples_of(shapes.get("samples"))
        return None if spec is None else _like(shapes.get("samples"), batch=spec.shape[0] * inputs["amount"])

    def execute(self, samples, amount):
        x = samples["samples"]
        indices = batch_indices(samples)
        step = max(indices) - min(indices) + 1
        out = {"samples": x.repeat(amount, 1, 1, 1),
               "batch_index": [i + k * step for k in range(amount) for i in indices]}
        mask = samples.get("noise_mask")
        if mask is not None:
            out["noise_mask"] = mask.repeat(amount if mask.shape[0] > 1 else 1, 1, 1, 1)
        return (out,)


class LatentBatch(Node):
    category = "latent/batch"
    inputs = [Socket("samples1", LATENT), Socket("samples2", LATENT)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        first, second = samples_of(shapes.get("samples1")), samples_of(shapes.get("samples2"))
        if first is None or second is None:
            return None
        return _like(shapes.get("samples1"), batch=first.shape[0] + second.shape[0], copies=0.5, keep_mask=False)

    def execute(self, samples1, samples2):
        a, b = samples1["samples"], samples2["samples"]
        if b.shape[-2:] != a.shape[-2:]:
            b = resize(b, a.shape[-1], a.shape[-2], "bilinear", "center")
        first = batch_indices(samples1)
        second = [i + max(first) + 1 for i in batch_indices(samples2)]
        return ({"samples": torch.cat([a, b]), "batch_index": first + second},)


class LatentInterpolate(Node):
    """Interpolates per pixel: directions across channels and their lengths separately, so a walk
    between two latents keeps the norm a sampler expects (a plain lerp would shrink it in between)."""

    category = "latent/advanced"
    inputs = [Socket("samples1", LATENT), Socket("samples2", LATENT),
              Float("ratio", default=1.0, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return _like(shapes.get("samples1"), copies=5.0)  # directions, their mix and the norms

    def execute(self, samples1, samples2, ratio):
        out = dict(samples1)
        out["samples"] = interpolate_latents(samples1["samples"], samples2["samples"], ratio)
        return (out,)


def interpolate_latents(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    """ratio 1 gives `a`, 0 gives `b`; `b` is first scaled to `a`'s size and cycled to its batch (as ComfyUI)."""
    if b.shape[1:] != a.shape[1:]:
        b = resize(b, a.shape[-1], a.shape[-2], "bilinear", "center")
    if b.shape[0] != a.shape[0]:
        b = b.repeat(-(-a.shape[0] // b.shape[0]), 1, 1, 1)[: a.shape[0]]
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    dir_a = torch.nan_to_num(a / norm_a)
    dir_b = torch.nan_to_num(b / norm_b)
    mixed = dir_a * ratio + dir_b * (1 - ratio)
    direction = torch.nan_to_num(mixed / mixed.norm(dim=1, keepdim=True))
    return direction * (norm_a * ratio + norm_b * (1 - ratio))


class SetLatentNoiseMask(Node):
    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    description = "Only the masked (1) region is repainted by the sampler; the rest stays as it is."
    inputs = [Socket("samples", LATENT), Socket("mask", MASK)]
    outputs = [Output(LATENT)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        samples, mask = samples_of(shapes.get("samples")), tensor_of(shapes.get("mask"), 3)
        if samples is None:
            return None
        if mask is None:
            return MemoryEstimate(outputs=({"samples": samples},), what=describe_latent(samples))
        noise_mask = TensorSpec((mask.shape[0], 1, *mask.shape[1:]), mask.itemsize)
        return MemoryEstimate(outputs=({"samples": samples, "noise_mask": noise_mask},), kept_bytes=noise_mask.nbytes,
                              what=describe_latent(samples))

    def execute(self, samples, mask):
        out = dict(samples)
        out["noise_mask"] = as_mask_batch(mask).reshape(-1, 1, *mask.shape[-2:]).float()
        return (out,)


NODE_CLASSES = [EmptyLatentImage, LatentUpscale, LatentUpscaleBy, LatentComposite, LatentCompositeMasked,
                LatentBlend, LatentFromBatch, RepeatLatentBatch, LatentBatch, LatentInterpolate, SetLatentNoiseMask]
