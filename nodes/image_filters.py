"""Image filters: added noise, colour quantization with dithering, grey-scale morphology.

Names, inputs, defaults and ranges are ComfyUI's. ImageAddNoise draws its noise exactly as ComfyUI does (one
CPU generator seeded with `seed`, a standard normal the image's shape), so a seed gives ComfyUI's picture.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from graph.node import Combo, Float, Int, Node, Output, Socket
from graph.types import IMAGE
from nodes.image_ops import image_like
from nodes.tensor_ops import MORPHOLOGY_OPERATIONS, morphology, to_bchw, to_bhwc

DITHER_METHODS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


class ImageAddNoise(Node):
    category = "image"
    inputs = [Socket("image", IMAGE),
              Int("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, step=None, control_after_generate=True,
                  tooltip="The random seed used for creating the noise."),
              Float("strength", default=0.5, min=0.0, max=1.0, step=0.01)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return image_like(shapes.get("image"), copies=2.0)  # the noise and the sum before clipping

    def execute(self, image, seed, strength):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(image.shape, generator=generator, device="cpu").to(image)
        return ((image + strength * noise).clamp(0.0, 1.0),)


def bayer_matrix(order: int) -> np.ndarray:
    """The order×order Bayer index matrix (order a power of 2), by its recursion
    M(2n) = [[4·M(n), 4·M(n) + 2], [4·M(n) + 3, 4·M(n) + 1]] from M(1) = [[0]]: every index 0..order²−1 once, each
    next index as far as possible from the ones before, so thresholds in that order spread evenly."""
    matrix = np.zeros((1, 1), dtype=np.int64)
    while matrix.shape[0] < order:
        matrix = np.block([[4 * matrix, 4 * matrix + 2], [4 * matrix + 3, 4 * matrix + 1]])
    return matrix


def palette_step(palette: np.ndarray) -> float:
    """The typical step between neighbouring colours of a palette [N, 3] (0..255): the median, over its colours,
    of the largest channel difference to the nearest other colour (0 for a single colour)."""
    if len(palette) < 2:
        return 0.0
    distance = np.abs(palette[:, None, :].astype(np.float64) - palette[None, :, :]).max(axis=-1)
    np.fill_diagonal(distance, np.inf)
    return float(np.median(distance.min(axis=1)))


def ordered_dither_offsets(height: int, width: int, order: int, step: float) -> np.ndarray:
    """[H, W] offsets (0..255 scale) added to every channel before mapping to the nearest palette colour:
    ((M + ½)/order² − ½) × step, the Bayer matrix M tiled over the image. With `step` the distance between two
    neighbouring palette colours, a value a fraction f of the way from one to the next is pushed past their midpoint
    at a fraction f of the positions of each order×order tile, so the tile's average keeps the value."""
    thresholds = (bayer_matrix(order) + 0.5) / order**2 - 0.5
    tiles = (-(-height // order), -(-width // order))
    return np.tile(thresholds, tiles)[:height, :width] * step


def quantize(rgb: np.ndarray, colors: int, dither: str) -> np.ndarray:
    """uint8 [H, W, 3] reduced to a palette of at most `colors` colours chosen by median cut (Pillow's
    quantize), each pixel mapped to the nearest palette colour: directly ("none"), with the error of each pixel
    spread to its unvisited neighbours (Floyd & Steinberg 1976, Pillow's), or with a tiled Bayer threshold matrix of
    order 2..16 (ordered dithering; Bayer 1973) scaled to the palette's step (ordered_dither_offsets)."""
    image = Image.fromarray(rgb, mode="RGB")
    palette = image.quantize(colors=colors)
    if dither == "none":
        mapped = image.quantize(palette=palette, dither=Image.Dither.NONE)
    elif dither == "floyd-steinberg":
        mapped = image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    elif dither.startswith("bayer-") and dither in DITHER_METHODS:
        colours = np.asarray(palette.getpalette() or [0, 0, 0], dtype=np.int64).reshape(-1, 3)
        offsets = ordered_dither_offsets(rgb.shape[0], rgb.shape[1], int(dither.removeprefix("bayer-")),
                                         palette_step(colours))
        shifted = np.clip(rgb.astype(np.float32) + offsets[..., None], 0, 255).round().astype(np.uint8)
        mapped = Image.fromarray(shifted, mode="RGB").quantize(palette=palette, dither=Image.Dither.NONE)
    else:
        raise ValueError(f"ImageQuantize: dither {dither!r}: expected one of {DITHER_METHODS}")
    return np.asarray(mapped.convert("RGB"))


class ImageQuantize(Node):
    """Each image of the batch gets its own palette; an alpha channel passes through unchanged."""

    category = "image/postprocessing"
    inputs = [Socket("image", IMAGE), Int("colors", default=256, min=1, max=256, step=1),
              Combo("dither", DITHER_METHODS)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return image_like(shapes.get("image"))

    def execute(self, image, colors, dither):
        out = image.clone()
        for index, item in enumerate(image):
            rgb = (item[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            out[index, ..., :3] = torch.from_numpy(quantize(rgb, colors, dither).astype(np.float32) / 255).to(out)
        return (out,)


class Morphology(Node):
    display_name = "ImageMorphology"
    category = "image/postprocessing"
    inputs = [Socket("image", IMAGE), Combo("operation", MORPHOLOGY_OPERATIONS),
              Int("kernel_size", default=3, min=3, max=999, step=1)]
    outputs = [Output(IMAGE)]

    @classmethod
    def estimate_memory(cls, inputs, shapes, context):
        return image_like(shapes.get("image"), copies=4.0)  # channels-first copy, padding, two passes, a difference

    def execute(self, image, operation, kernel_size):
        return (to_bhwc(morphology(to_bchw(image), operation, kernel_size)).contiguous(),)


NODE_CLASSES = [ImageAddNoise, ImageQuantize, Morphology]
