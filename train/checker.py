"""Judge whether an image shows the caption's shape in the caption's colour.

Colour: pixel statistics. The background is the median colour of the border pixels; pixels far from it are
the shape, and each votes for its nearest palette colour (the new colour included); the majority wins.

Shape: the shape's mask is cut out around its bounding box and resized to a fixed square, so the classifier
sees neither colour, size nor position; a small CNN trained on generator ground truth (with blur and noise,
as a small VAE leaves them) tells circle, square, triangle and star apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import shapes

log = logging.getLogger(__name__)

MASK_SIZE = 24
FOREGROUND_DISTANCE = 60.0  # RGB distance (0..255 scale) from the background that counts as "shape"
MIN_PIXELS = 6


def _as_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    """[H, W, 3] uint8 from uint8 or from a 0..1 float image (the IMAGE socket's convention)."""
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return image


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def foreground(image: np.ndarray) -> np.ndarray:
    """Soft mask [H, W] in 0..1: how far each pixel is from the background colour, saturating at 2x the
    threshold distance."""
    distance = np.linalg.norm(image.astype(np.float64) - background_colour(image), axis=-1)
    return np.clip(distance / (2 * FOREGROUND_DISTANCE), 0.0, 1.0)


def classify_colour(image: np.ndarray | Tensor) -> str | None:
    """The palette colour most of the shape's pixels are nearest to; None when no shape stands out."""
    image = _as_uint8(image)
    mask = foreground(image) >= 0.5
    if mask.sum() < MIN_PIXELS:
        return None
    names = list(shapes.all_colours())
    palette = np.array([shapes.all_colours()[n] for n in names], dtype=np.float64)
    pixels = image[mask].astype(np.float64)
    nearest = np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1).argmin(axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def normalised_mask(image: np.ndarray | Tensor) -> Tensor:
    """The shape's mask cropped to a square around its bounding box, [1, MASK_SIZE, MASK_SIZE]."""
    mask = foreground(_as_uint8(image))
    ys, xs = np.nonzero(mask >= 0.5)
    if len(ys) < MIN_PIXELS:
        return torch.zeros(1, MASK_SIZE, MASK_SIZE)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 + 2
    top, left = int(np.floor(cy - half)), int(np.floor(cx - half))
    side = int(np.ceil(2 * half)) + 1
    padded = np.pad(mask, side)
    crop = padded[top + side: top + 2 * side, left + side: left + 2 * side]
    t = torch.from_numpy(crop).float()[None, None]
    return F.interpolate(t, size=(MASK_SIZE, MASK_SIZE), mode="area")[0]


class ShapeNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * (MASK_SIZE // 8) ** 2, len(shapes.SHAPES))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise like a small autoencoder's output, so the classifier does not rely on crisp edges."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    k = int(rng.integers(0, 3)) * 2 + 1
    if k > 1:
        t = F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="replicate"), k, stride=1)
    noise = torch.from_numpy(rng.normal(0.0, rng.uniform(0, 12), size=t.shape)).float()
    return (t + noise).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


Reconstruct = Callable[[np.ndarray], np.ndarray]


def _training_masks(seed: int, count: int, reconstruct: Reconstruct | None) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng([seed, 99])
    masks, labels = [], []
    for start in range(0, count, 256):
        chunk = start // 256
        split = "train" if chunk % 2 == 0 else "test"
        images, samples = shapes.batch(seed + 1000, split, range(start, min(start + 256, count)))
        images = reconstruct(images) if reconstruct is not None and chunk % 4 in (1, 2) else degrade(images, rng)
        masks += [normalised_mask(im) for im in images]
        labels += [shapes.SHAPES.index(s.shape) for s in samples]
    return torch.stack(masks), torch.tensor(labels)


@dataclass
class Checker:
    """Colour by pixel statistics, shape by a trained `ShapeNet`."""

    net: ShapeNet

    @classmethod
    def train(cls, seed: int = 0, images: int = 6000, epochs: int = 6, width: int = 16,
              reconstruct: Reconstruct | None = None) -> Checker:
        """Deterministic given seed (and thread count): fixed data, fixed init, fixed batch order.

        `reconstruct` (uint8 images -> uint8 images, e.g. a model's VAE round trip) makes half of the
        training images pass through it, so the classifier learns that autoencoder's rendering of each shape
        (rounded corners, soft edges) from ground truth that is still exact."""
        torch.manual_seed(seed)
        net = ShapeNet(width)
        masks, labels = _training_masks(seed, images, reconstruct)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for batch in torch.randperm(len(masks), generator=gen).split(64):
                loss = F.cross_entropy(net(masks[batch]), labels[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(net.eval())

    @torch.no_grad()
    def shapes_of(self, images: list[np.ndarray] | np.ndarray | Tensor) -> list[str]:
        masks = torch.stack([normalised_mask(im) for im in images])
        return [shapes.SHAPES[i] for i in self.net(masks).argmax(1).tolist()]

    def judge(self, images, samples: list[shapes.Sample]) -> dict[str, float]:
        """Fractions of images whose colour / shape / both match their ground truth."""
        colours = [classify_colour(im) for im in images]
        found = self.shapes_of(images)
        colour_ok = [c == s.colour for c, s in zip(colours, samples, strict=True)]
        shape_ok = [f == s.shape for f, s in zip(found, samples, strict=True)]
        n = max(len(samples), 1)
        return {"colour": sum(colour_ok) / n, "shape": sum(shape_ok) / n,
                "both": sum(a and b for a, b in zip(colour_ok, shape_ok, strict=True)) / n}


def ground_truth_accuracy(checker: Checker, seed: int = 0, count: int = 400) -> dict[str, float]:
    """The checker on fresh generator images of the held-out combinations (never used to train it)."""
    images, samples = shapes.batch(seed + 2000, "test", range(count))
    return checker.judge(images, samples)
