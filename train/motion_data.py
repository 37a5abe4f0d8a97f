"""Clips for the demo motion module: one shape of the demo model's data moving in a straight line.

A clip is the shapes of `shapes.py` (same palette, backgrounds, sizes, anti-aliased drawing) at continuous
positions along one axis: left to right, right to left, up or down, at constant speed over `frames` frames, the
shape, colour, size and background fixed. Captions read "a red circle on a white background moving to the
right" (see DIRECTIONS for why this form). Every clip is a pure function of (seed, split, index, frames); the
"test" split uses only the (shape, colour, background) combinations `shapes.py` holds out of training, so a bench
over it measures captions the image model and the motion module never saw.

A clip reversed in time is a clip of the opposite direction (`reversed_direction`): the trainer uses that to
double its data without drawing anything new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shapes

# direction -> (caption words, unit motion (dx, dy) in image coordinates, y pointing down). The words name where
# the shape goes with the position words the image model knows ("left", "right", "top", "bottom"), at the end of
# the caption: the frozen UNet's prediction differs 3-5x more between these four captions than between "moving from
# left to right" / "from right to left" / "up" / "down" in the middle (0.10-0.21 vs 0.03-0.11 relative change of
# its eps at t = 600; "up" vs "down" 0.026), and the motion module can only read the caption through the UNet.
DIRECTIONS: dict[str, tuple[str, tuple[int, int]]] = {
    "right": ("moving to the right", (1, 0)),
    "left": ("moving to the left", (-1, 0)),
    "up": ("moving to the top", (0, -1)),
    "down": ("moving to the bottom", (0, 1)),
}
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}
TRAVEL = (0.6, 1.0)  # distance covered, as a fraction of the free range along the axis
DEFAULT_FRAMES = 16


@dataclass(frozen=True)
class Clip:
    """Ground truth of one clip: what its caption says and the shape's centre in the first and last frame."""

    shape: str
    colour: str
    background: str
    size: str
    direction: str
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]
    frames: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background {DIRECTIONS[self.direction][0]}"

    @property
    def sized_caption(self) -> str:
        """The caption with the size word ("a small red circle on a gray background moving to the top")."""
        return f"a {self.size} {self.caption[2:]}"

    def centre(self, frame: int) -> tuple[float, float]:
        """The shape's centre in `frame` (constant speed from `start` to `end`)."""
        u = frame / max(self.frames - 1, 1)
        return (self.start[0] + u * (self.end[0] - self.start[0]), self.start[1] + u * (self.end[1] - self.start[1]))

    def sample(self, frame: int) -> shapes.Sample:
        """The still of `frame`, as the image model's ground truth (position word: the nearest grid cell)."""
        cx, cy = self.centre(frame)
        return shapes.Sample(self.shape, self.colour, self.background, self.size, _grid_word(cx, cy, self.radius),
                             cx, cy, self.radius)


def _grid_word(cx: float, cy: float, radius: float) -> str:
    lo, hi = radius + 1.0, shapes.SIZE - 1.0 - radius
    col, row = (int(np.clip(round((v - lo) / max(hi - lo, 1e-6) * 2), 0, 2)) for v in (cx, cy))
    return next(word for word, cell in shapes.POSITIONS.items() if cell == (col, row))


def reversed_direction(clip: Clip) -> Clip:
    """The same clip played backwards: the opposite direction, start and end swapped."""
    return Clip(clip.shape, clip.colour, clip.background, clip.size, OPPOSITE[clip.direction], clip.radius,
                clip.end, clip.start, clip.frames)


def draw_clip(seed: int, split: str, index: int, frames: int = DEFAULT_FRAMES, direction: str | None = None) -> Clip:
    """Clip `index` of `split`: combination, size, direction (unless given), travel and the fixed coordinate
    drawn from their own generator; the shape stays whole inside the image in every frame."""
    combos = shapes.split_combinations(split)
    rng = np.random.default_rng([seed, shapes.SPLITS.index(split), index, 7])
    shape, colour, background = combos[int(rng.integers(len(combos)))]
    size = ("small", "large")[int(rng.integers(2))]
    radius = float(rng.uniform(*shapes.SIZES[size]))
    picked = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    direction = direction or picked
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    lo, hi = radius + 1.0, shapes.SIZE - 1.0 - radius
    travel = float(rng.uniform(*TRAVEL)) * (hi - lo)
    first = float(rng.uniform(lo, hi - travel))
    other = float(rng.uniform(lo, hi))
    dx, dy = DIRECTIONS[direction][1]
    a, b = (first, first + travel) if dx + dy > 0 else (first + travel, first)
    start, end = ((a, other), (b, other)) if dx else ((other, a), (other, b))
    return Clip(shape, colour, background, size, direction, radius, start, end, frames)


def render_clip(clip: Clip) -> np.ndarray:
    """The frames [F, 64, 64, 3] uint8, each drawn as `shapes.render` draws a still."""
    return np.stack([shapes.render(clip.sample(f)) for f in range(clip.frames)])


def clips(seed: int, split: str, indices, frames: int = DEFAULT_FRAMES) -> list[Clip]:
    return [draw_clip(seed, split, int(i), frames) for i in indices]


def training_caption(rng: np.random.Generator, clip: Clip, empty: float = 0.1, sized: float = 0.15) -> str:
    """The caption most of the time, with its size word some of the time, or "" (classifier-free guidance)."""
    u = rng.random()
    if u < empty:
        return ""
    return clip.sized_caption if u < empty + sized else clip.caption


# ---- judging a generated clip ----------------------------------------------------------------------------------
MIN_TRAVEL = 8.0  # pixels (one latent pixel) the centroid must cover along the named axis to count as moving


def centroids(frames: np.ndarray) -> np.ndarray:
    """[F, 2] (x, y) centre of mass of each frame's shape, by the checker's segmentation (distance from the
    border's median colour); NaN for a frame where no shape stands out."""
    from .checker import MIN_PIXELS, foreground

    out = np.full((len(frames), 2), np.nan)
    for i, frame in enumerate(np.asarray(frames)):
        if frame.dtype != np.uint8:  # 0..1 floats, the IMAGE socket's convention
            frame = np.clip(np.round(frame * 255.0), 0, 255).astype(np.uint8)
        mask = foreground(frame) >= 0.5
        if mask.sum() >= MIN_PIXELS:
            ys, xs = np.nonzero(mask)
            out[i] = xs.mean(), ys.mean()
    return out


def motion_of(frames: np.ndarray) -> tuple[str | None, float]:
    """The direction the shape moves in (None: no clear motion) and how far (pixels), from a least-squares line
    through the frames' centroids: the axis with the larger travel, if that travel is at least MIN_TRAVEL and at
    least twice the other axis's."""
    points = centroids(frames)
    seen = ~np.isnan(points[:, 0])
    if seen.sum() < max(2, len(frames) // 2):
        return None, 0.0
    t = np.arange(len(frames))[seen]
    travel = np.array([np.polyfit(t, points[seen, k], 1)[0] * (len(frames) - 1) for k in (0, 1)])
    axis = int(np.abs(travel).argmax())
    along, across = abs(travel[axis]), abs(travel[1 - axis])
    if along < MIN_TRAVEL or along < 2 * across:
        return None, float(along)
    if axis == 0:
        return ("right" if travel[0] > 0 else "left"), float(along)
    return ("down" if travel[1] > 0 else "up"), float(along)
