"""Context windows: clips longer than a motion module's length, denoised window by window and blended.

A motion module sees at most its position encoding's length of frames (24 or 32) and was trained on 16, so
a longer clip is split into overlapping windows of `length` frames; at every sampler evaluation each window
is denoised alone (the whole guided evaluation: positive, negative, every patch) and each frame's
prediction is the weighted mean of its windows' predictions. Memory is bounded by one window.

Schedules:
- `static`: windows start every `length - overlap` frames, the last one moved back to end at the last frame;
- `uniform` (AnimateDiff's "uniform", no looping): at step s all windows shift by round(F * h(s)) frames,
  h(s) the bit-reversed fraction of s (0, 1/2, 1/4, 3/4, ...), so window seams move from step to step;
  with `stride` > 1 further sets of windows take every 2nd, 4th, ... frame (up to what the clip's length
  allows), so distant frames meet in one window. A window that would run past the last frame is moved back
  to end there; duplicates are dropped, and any frame left out gets a window of its own.

Blending (`fuse`): `pyramid` weights frames by their distance from the window's edge (1, 2, ..., 2, 1),
so seams fade; `flat` weights all frames alike.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SCHEDULES = ("uniform", "static")
FUSE_METHODS = ("pyramid", "flat")


def ordered_halving(step: int) -> float:
    """The 64-bit bit reversal of `step` as a fraction of 2^64: 0, 0.5, 0.25, 0.75, 0.125, ..."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def _check(frames: int, length: int, overlap: int) -> None:
    if length < 1 or frames < 1:
        raise ValueError(f"context windows need length >= 1 and frames >= 1, got length {length}, {frames} frames")
    if not 0 <= overlap < length:
        raise ValueError(f"context_overlap {overlap} must be at least 0 and less than context_length {length}")


def _cover(windows: list[list[int]], frames: int, length: int) -> list[list[int]]:
    """Adds a window (ending at the last frame at the latest) for every frame no window holds."""
    covered = {f for w in windows for f in w}
    for f in range(frames):
        if f not in covered:
            start = min(f, frames - length)
            windows.append(list(range(start, start + length)))
            covered.update(windows[-1])
    return windows


def static_windows(frames: int, length: int, overlap: int) -> list[list[int]]:
    """Windows of `length` consecutive frames every `length - overlap` frames, the last ending at the last frame."""
    _check(frames, length, overlap)
    if frames <= length:
        return [list(range(frames))]
    windows = []
    for start in range(0, frames, length - overlap):
        start = min(start, frames - length)
        window = list(range(start, start + length))
        if window not in windows:
            windows.append(window)
        if start + length >= frames:
            break
    return windows


def uniform_windows(frames: int, length: int, overlap: int, stride: int = 1, step: int = 0) -> list[list[int]]:
    """The windows of sampler step `step` (see the module docstring)."""
    _check(frames, length, overlap)
    if stride < 1:
        raise ValueError(f"context_stride must be >= 1, got {stride}")
    if frames <= length:
        return [list(range(frames))]
    levels = min(stride, math.ceil(math.log2(frames / length)) + 1)
    shift = ordered_halving(step)
    pad = round(frames * shift)
    candidates = []
    for level in range(levels):
        spacing = 1 << level
        first = int(shift * spacing) + pad
        for start in range(first, frames + pad - overlap, length * spacing - overlap):
            candidates.append([f % frames for f in range(start, start + length * spacing, spacing)])
    windows: list[list[int]] = []
    for window in candidates:
        if any(b < a for a, b in itertools.pairwise(window)):  # wraps past the end: move it back
            spacing = (window[1] - window[0]) % frames if len(window) > 1 else 1
            window = [frames - 1 - spacing * (len(window) - 1 - i) for i in range(len(window))]
            if window[0] < 0:
                window = list(range(frames - length, frames))
        if window not in windows:
            windows.append(window)
    return _cover(windows, frames, length)


def fuse_weights(length: int, method: str) -> Tensor:
    """Per-frame weights [length] of a window's predictions."""
    if method == "flat":
        return torch.ones(length)
    if method == "pyramid":
        half = (length + 1) // 2
        ramp = list(range(1, half + 1))
        return torch.tensor(ramp + ramp[: length - half][::-1], dtype=torch.float32)
    raise ValueError(f"unknown fuse method {method!r}; supported: {', '.join(FUSE_METHODS)}")


_WINDOW: ContextVar[tuple[list[int], int] | None] = ContextVar("latentloom_context_window", default=None)


@contextlib.contextmanager
def active_window(indices: list[int], frames: int) -> Iterator[None]:
    """Within the block the guider evaluates frames `indices` of a `frames`-frame clip (`window_rows`)."""
    token = _WINDOW.set((list(indices), int(frames)))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def window_rows(value: Any) -> Any:
    """A per-frame tensor (batch == the clip's frame count: prompt travel's contexts and pooled outputs, per-frame
    masks) cut to the frames of the window being evaluated; anything else unchanged."""
    window = _WINDOW.get()
    if window is None or not isinstance(value, Tensor) or value.ndim == 0:
        return value
    indices, frames = window
    if value.shape[0] != frames or frames == len(indices):
        return value
    return value[torch.tensor(indices, device=value.device)]


def blend_windows(x: Tensor, sigma: Tensor, inner: Callable[[Tensor, Tensor], Tensor],
                  windows: list[list[int]], fuse: str) -> Tensor:
    """inner(x[window], sigma[window]) for each window, blended per frame with `fuse` weights."""
    sigma = torch.as_tensor(sigma, device=x.device)
    per_frame = sigma.numel() == x.shape[0] and sigma.numel() > 1
    total = torch.zeros_like(x)
    weight_sum = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for window in windows:
        index = torch.tensor(window, device=x.device)
        with active_window(window, x.shape[0]):
            out = inner(x[index], sigma.reshape(-1)[index] if per_frame else sigma)
        weights = fuse_weights(len(window), fuse).to(x.device, x.dtype)
        total.index_add_(0, index, out * weights.reshape(-1, *[1] * (x.ndim - 1)))
        weight_sum.index_add_(0, index, weights)
    return total / weight_sum.reshape(-1, *[1] * (x.ndim - 1))


@dataclass(frozen=True)
class ContextOptions:
    """Context window settings; `start_sigma`: windows are used only at or below this sigma (the first steps
    before it denoise the whole clip at once); None: from the start."""

    length: int = 16
    overlap: int = 4
    stride: int = 1
    schedule: str = "uniform"
    fuse: str = "pyramid"
    start_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown context schedule {self.schedule!r}; supported: {', '.join(SCHEDULES)}")
        if self.fuse not in FUSE_METHODS:
            raise ValueError(f"fuse_method {self.fuse!r} is not supported; supported: {', '.join(FUSE_METHODS)}")
        _check(max(self.length, 1), self.length, self.overlap)

    def windows(self, frames: int, step: int) -> list[list[int]]:
        if self.schedule == "static":
            return static_windows(frames, self.length, self.overlap)
        return uniform_windows(frames, self.length, self.overlap, self.stride, step)


class ContextWindowWrapper:
    """A guidance wrapper (`GuidanceHooks.wrap`) running the guided evaluation window by window.

    The uniform schedule depends on the sampler step; the step is counted from the evaluations seen: a new
    sigma is a new step, and a sigma above the last one starts a new run at step 0 (so a cached MODEL
    samples the same way every time). Samplers that evaluate twice per step (heun, dpm_2) advance it twice."""

    def __init__(self, options: ContextOptions):
        self.options = options
        self._last_sigma: float | None = None
        self._step = -1

    def _advance(self, sigma: float) -> int:
        if self._last_sigma is None or sigma > self._last_sigma:
            self._step = 0
        elif sigma != self._last_sigma:
            self._step += 1
        self._last_sigma = sigma
        return self._step

    def __call__(self, x: Tensor, sigma: Tensor, inner: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        level = float(torch.as_tensor(sigma).max())
        step = self._advance(level)
        o = self.options
        if x.shape[0] <= o.length or (o.start_sigma is not None and level > o.start_sigma):
            return inner(x, sigma)
        return blend_windows(x, sigma, inner, o.windows(x.shape[0], step), o.fuse)
