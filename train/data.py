"""Batches for the two training phases, each a pure function of (seed, step) so that a resumed run draws the
same data as an uninterrupted one.

Conditioning is computed by the project's own text path (`TextEncoders.encode`, the same call the
CLIPTextEncode node makes) on the frozen encoder, and cached per caption string: the caption space is small.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPTextModel

from diffusion.checkpoints.clip_keys import from_transformers, to_hf_checkpoint
from diffusion.models.text_encoders import TextEncoders

from . import shapes
from .recipe import TEXT_PREFIX

VAE_RANDOM_COLOUR_FRACTION = 0.5  # the VAE also sees arbitrary colours, so it is no judge of which are "known"
FOREGROUND_WEIGHT = 5.0
DECODER_RANDOM_COLOUR_FRACTION = 0.25
SHARPEN_PHASE = 5  # step_rng's phase of the decoder-sharpening batches (0-2: the other phases, 3-4: other recipes)
FULL_CAPTION_FRACTION = 0.6
EMPTY_CAPTION_FRACTION = 0.1  # classifier-free guidance needs the unconditional prediction too


def step_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _recoloured(rng: np.random.Generator, sample: shapes.Sample) -> tuple[np.ndarray, np.ndarray]:
    """The sample drawn in an arbitrary shape colour on an arbitrary background (VAE data only)."""
    fg, bg = rng.integers(0, 256, size=(2, 3))
    while np.abs(fg - bg).sum() < 90:
        fg = rng.integers(0, 256, size=3)
    image = shapes.render(sample).astype(np.int32)
    base = np.array(shapes.BACKGROUNDS[sample.background])
    alpha = np.abs(image - base).sum(-1, keepdims=True) / max(np.abs(np.array(sample.rgb) - base).sum(), 1)
    alpha = np.clip(alpha, 0.0, 1.0)
    out = alpha * fg + (1 - alpha) * bg
    return np.round(out).astype(np.uint8), alpha[..., 0]


def vae_batch(seed: int, step: int, size: int, phase: int = 0, random_colours: float = VAE_RANDOM_COLOUR_FRACTION
              ) -> tuple[Tensor, Tensor]:
    """Images [B, 3, 64, 64] in [-1, 1] and per-pixel loss weights [B, 1, 64, 64] (the shape counts more);
    a fraction `random_colours` of them recoloured at random."""
    rng = step_rng(seed, phase, step)
    images, weights = [], []
    for index in rng.integers(0, 2**31, size=size):
        sample = shapes.draw_sample(seed, "train", int(index))
        if rng.random() < random_colours:
            image, alpha = _recoloured(rng, sample)
        else:
            image = shapes.render(sample)
            base = np.array(shapes.BACKGROUNDS[sample.background])
            alpha = (np.abs(image.astype(np.int32) - base).sum(-1) > 0).astype(np.float64)
        images.append(image)
        weights.append(1.0 + (FOREGROUND_WEIGHT - 1.0) * (alpha > 0))
    w = torch.from_numpy(np.stack(weights)).float()[:, None]
    return to_tensor(np.stack(images)), w


def band_weights(weights: Tensor, band: int) -> Tensor:
    """Loss weights that count the shape *and* the background within `band` pixels of it as much as the shape.

    `vae_batch`'s weights (shape 5x, background 1x) make a blurred edge cheap when it spills outwards and dear
    when it eats inwards, so a decoder trained on them draws every shape too large and soft-edged (the checker's
    mask of a reconstruction was 1.39x the true area). Weighting a band on both sides of the edge equally puts
    the edge where it is."""
    shape = (weights > 1.0).float()
    near = F.max_pool2d(shape, 2 * band + 1, stride=1, padding=band) if band > 0 else shape
    return 1.0 + (FOREGROUND_WEIGHT - 1.0) * near


SMALL_SHAPE_AREA = 600.0  # pixels: shapes smaller than this get their weight raised (`small_shape_boost`)


def small_shape_boost(weights: Tensor, shape_weights: Tensor, most: float) -> Tensor:
    """`weights` [B, 1, H, W] with each image's extra weight (above 1) multiplied by SMALL_SHAPE_AREA / the area
    of its shape (from `shape_weights`, `vae_batch`'s weights), clamped to 1..`most`.

    A small star covers a fifth of a large one's pixels, so with per-pixel weights its points cost a fifth as
    much to lose: the VAE learnt large shapes and drew small ones as blobs. This gives every shape about the
    same say, up to `most` times the weight."""
    area = (shape_weights > 1.0).float().sum(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)
    factor = (SMALL_SHAPE_AREA / area).clamp(1.0, most)
    return 1.0 + (weights - 1.0) * factor


def edge_loss(recon: Tensor, images: Tensor, weights: Tensor) -> Tensor:
    """Weighted L1 of the difference between the horizontal and vertical pixel differences of `recon` and
    `images` [B, C, H, W] (weights [B, 1, H, W]; a difference counts with the larger weight of its two pixels).

    A pixel loss pays little for a soft edge: the few pixels it blurs are each a little off. The differences
    across an edge are large and few, so their error is what a soft or misplaced edge costs; it is what makes
    a small star's points and a square's corners worth keeping."""
    loss = recon.new_zeros(())
    for dim in (2, 3):
        n = images.shape[dim] - 1
        diff = recon.diff(dim=dim) - images.diff(dim=dim)
        w = torch.maximum(weights.narrow(dim, 0, n), weights.narrow(dim, 1, n))
        loss = loss + (w * diff.abs()).mean()
    return loss


class CaptionEncoder:
    """Caption -> context [77, width] through the project's text-encoding path, cached."""

    def __init__(self, text_model: CLIPTextModel, num_heads: int):
        sd = to_hf_checkpoint(from_transformers(text_model.state_dict()), TEXT_PREFIX)
        self.encoders = TextEncoders.from_state_dict(sd, "sd1", num_heads=num_heads)
        self.cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, caption: str) -> Tensor:
        if caption not in self.cache:
            self.cache[caption] = self.encoders.encode(caption)[0][0].float()
        return self.cache[caption]

    def batch(self, captions: list[str]) -> Tensor:
        return torch.stack([self(c) for c in captions])


def training_caption(rng: np.random.Generator, sample: shapes.Sample) -> str:
    """The full caption most of the time, else a partial one (never empty of both colour and shape), or ""."""
    u = rng.random()
    if u < EMPTY_CAPTION_FRACTION:
        return ""
    if u < EMPTY_CAPTION_FRACTION + FULL_CAPTION_FRACTION:
        return sample.caption
    keep = {part for part in ("size", "position", "background") if rng.random() < 0.5}
    core = [("colour",), ("shape",), ("colour", "shape")][int(rng.integers(3))]
    return sample.partial_caption(keep | set(core))


def unet_batch(seed: int, step: int, size: int, count: int) -> tuple[np.ndarray, np.random.Generator]:
    """Indices into the latent data set for one UNet step, and the step's generator (for the captions)."""
    rng = step_rng(seed, 1, step)
    return rng.integers(0, count, size=size), rng
