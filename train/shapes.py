"""The procedural training data of the demo model: one anti-aliased shape on a plain background, with a caption.

Every sample is a pure function of (seed, split, index), so the data set needs no storage, any batch can be
redrawn after a resume, and the checker knows the ground truth of every image. Captions read like
"a small red circle at the top left on a blue background".

The palette keeps clear gaps in RGB (no orange between red and yellow, which a tiny VAE blurs together);
orange is kept out of the base model's training altogether, as the "new colour" the five-image LoRA teaches.
A fixed set of (shape, colour, background) combinations is held out of training ("test" split) to measure
whether prompts compose rather than recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (40, 75, 230),
    "yellow": (245, 225, 40),
    "purple": (150, 50, 205),
    "cyan": (40, 215, 225),
}
NEW_COLOUR = "orange"  # never in the base model's training data
NEW_COLOUR_RGB = (250, 135, 20)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (125, 125, 125),
    "blue": (40, 75, 230),
    "green": (35, 185, 55),
}
SIZES = {"small": (7.0, 11.0), "large": (15.0, 20.0)}
# position word -> (column, row) of a 3x3 grid
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
SPLITS = ("train", "test")
CAPTION_PARTS = frozenset({"size", "colour", "shape", "position", "background"})


def all_colours() -> dict[str, tuple[int, int, int]]:
    """Every shape colour a caption may name, the new colour included (what the checker tells apart)."""
    return {**COLOURS, NEW_COLOUR: NEW_COLOUR_RGB}


@dataclass(frozen=True)
class Sample:
    """Ground truth of one image: what its caption says, and where the shape really is."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float

    @property
    def caption(self) -> str:
        return self.partial_caption(CAPTION_PARTS)

    def partial_caption(self, keep: frozenset[str] | set[str]) -> str:
        """The caption naming only the attributes in `keep` (of CAPTION_PARTS): "a red shape", "a small
        star on a gray background", ... Training on these lets short prompts and negatives mean something."""
        words = ["a"]
        words += [self.size] if "size" in keep else []
        words += [self.colour] if "colour" in keep else []
        words += [self.shape if "shape" in keep else "shape"]
        if "position" in keep:
            words += ["in the center"] if self.position == "center" else ["at the", self.position]
        if "background" in keep:
            words += ["on a", self.background, "background"]
        return " ".join(words)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return all_colours()[self.colour]


def combinations() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) of the base palette whose shape stands out (colour != background)."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if COLOURS[c] != BACKGROUNDS[b]]


def held_out_combinations() -> list[tuple[str, str, str]]:
    """Twelve combinations never shown in training: each shape with three colour/background pairs, picked by
    a fixed rule so that every colour, shape and background stays well represented in training."""
    combos = combinations()
    return [combo for i, combo in enumerate(combos) if i % 9 == 4][:12]


def split_combinations(split: str) -> list[tuple[str, str, str]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = set(held_out_combinations())
    return sorted(held) if split == "test" else [c for c in combinations() if c not in held]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _place(rng: np.random.Generator, position: str, radius: float) -> tuple[float, float]:
    """Centre of a shape in the grid cell of `position`, jittered, kept inside the image."""
    col, row = POSITIONS[position]
    lo, hi = radius + 1.0, SIZE - 1.0 - radius
    centres = np.linspace(lo, hi, 3)
    jitter = rng.uniform(-2.5, 2.5, size=2)
    cx = float(np.clip(centres[col] + jitter[0], lo, hi))
    cy = float(np.clip(centres[row] + jitter[1], lo, hi))
    return cx, cy


def draw_sample(seed: int, split: str, index: int, colour: str | None = None) -> Sample:
    """The ground truth of sample `index` of `split`; `colour` forces the shape colour (the LoRA data)."""
    combos = split_combinations(split)
    rng = _rng(seed, split, index)
    shape, picked, background = combos[int(rng.integers(len(combos)))]
    size = ("small", "large")[int(rng.integers(2))]
    radius = float(rng.uniform(*SIZES[size]))
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    cx, cy = _place(rng, position, radius)
    return Sample(shape, colour or picked, background, size, position, cx, cy, radius)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape (square, triangle, star) of circumradius about r, pointing up."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = [-90.0, 30.0, 150.0]
        radii = [r] * 3
        cy = cy + 0.2 * r  # centre the triangle's bounding box on the cell
    elif shape == "star":
        angles = [-90.0 + 36.0 * k for k in range(10)]
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    points = zip(angles, radii, strict=True)
    return [(cx + q * math.cos(math.radians(a)), cy + q * math.sin(math.radians(a))) for a, q in points]


def render(sample: Sample, size: int = SIZE) -> np.ndarray:
    """The image [size, size, 3] uint8: drawn at 4x then box-filtered down, so edges are anti-aliased. Other sizes
    than 64 scale the whole picture (position, radius), as the 128x128 model's data does."""
    s = SUPERSAMPLE * size / SIZE
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUNDS[sample.background])
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = sample.cx * s, sample.cy * s, sample.radius * s
    if sample.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=sample.rgb)
    else:
        draw.polygon(shape_polygon(sample.shape, cx, cy, r), fill=sample.rgb)
    return np.array(canvas.reduce(SUPERSAMPLE), dtype=np.uint8)


def batch(seed: int, split: str, indices: list[int] | np.ndarray, colour: str | None = None, size: int = SIZE
          ) -> tuple[np.ndarray, list[Sample]]:
    """Images [B, size, size, 3] uint8 and their ground truth for the given sample indices."""
    samples = [draw_sample(seed, split, int(i), colour) for i in indices]
    return np.stack([render(s, size) for s in samples]), samples


def captions_of(samples: list[Sample]) -> list[str]:
    return [s.caption for s in samples]
