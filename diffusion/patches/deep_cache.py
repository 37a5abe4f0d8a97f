"""DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858).

Between adjacent sampling steps the UNet's deep, low-resolution features change little, while the shallow
high-resolution blocks carry the detail that changes fast. So: on one step in `interval` run the whole UNet and
keep the feature map that enters output block `len(output_blocks) - 1 - depth` (the deep branch's result); on
the steps between, run only input blocks 0..depth, reuse the kept feature instead of the deeper input blocks,
the middle block and the deeper output blocks, and run output blocks from that one on with the fresh skips of
the shallow input blocks. `depth` 0 keeps only the first input and the last output block; `interval` 1 is the
plain model.

The interface is that of the DeepCache node popular with ComfyUI users (the laksjdjf gist packaged as
ComfyUI-deepcache): `start_step` and `end_step` are on the 0..1000 scale of steps *done*, i.e. caching applies
while the network timestep t satisfies 1000 - end_step <= t <= 1000 - start_step. Steps are told apart by their
timestep: a call with the same timestep as the last one belongs to the same step (guidance that evaluates the
conditional and unconditional halves apart), a larger one starts a new sampling run (the cache is dropped).
The state is per thread, so two samplings on one MODEL in two worker threads do not mix their caches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .unet_patches import Site, UNetPatches


@dataclass
class DeepCacheStats:
    """What the wrapper did, for tests and benchmarks: UNet calls run whole, and calls that reused the cache."""

    full: int = 0
    cached: int = 0


@dataclass
class _RunState:
    last_t: float | None = None
    step: int = -1
    call: int = 0  # index of the UNet call within the current step
    features: dict[tuple, Tensor] = field(default_factory=dict)


class DeepCache:
    """A UNet call wrapper: `wrapper(unet, x, timesteps, context, y, patches=None, sigmas=None)` returns what
    `unet(x, timesteps, context, y, ...)` returns on full steps and the DeepCache approximation on the others."""

    def __init__(self, interval: int, depth: int, start_step: int = 0, end_step: int = 1000):
        if interval < 1:
            raise ValueError(f"DeepCache cache_interval must be >= 1, got {interval}")
        if depth < 0:
            raise ValueError(f"DeepCache cache_depth must be >= 0, got {depth}")
        self.interval, self.depth = interval, depth
        self.start_step, self.end_step = start_step, end_step
        self.stats = DeepCacheStats()
        self._local = threading.local()

    def _state(self) -> _RunState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _RunState()
        return state

    def _plan(self, t: float, key: tuple) -> tuple[bool, tuple]:
        """(reuse the cache on this call?, the cache key of this call), advancing the step counter."""
        state = self._state()
        applies = 1000 - self.end_step <= t <= 1000 - self.start_step
        if state.last_t is None or t > state.last_t:  # a new sampling run
            state.features.clear()
            state.step, state.call = -1, 0
        if state.last_t is None or t != state.last_t:  # a new step
            state.step = state.step + 1 if applies else -1
            state.call = 0
        else:
            state.call += 1
        state.last_t = t
        cache_key = (state.call, *key)
        reuse = applies and state.step % self.interval != 0 and cache_key in state.features
        return reuse, cache_key

    def __call__(self, unet: nn.Module, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 patches: UNetPatches | None = None, sigmas: Tensor | None = None) -> Tensor:
        blocks = getattr(unet, "output_blocks", None)
        if blocks is None or not hasattr(unet, "embed"):
            raise TypeError(f"DeepCache needs a Stable Diffusion UNet, got {type(unet).__name__}")
        depth = min(self.depth, len(blocks) - 1)
        t = float(timesteps.reshape(-1)[0])
        reuse, key = self._plan(t, (tuple(x.shape), x.dtype, x.device))
        state = self._state()
        out, deep = _forward(unet, x, timesteps, context, y, depth, state.features.get(key) if reuse else None,
                             patches, sigmas)
        if reuse:
            self.stats.cached += 1
        else:
            self.stats.full += 1
            state.features[key] = deep
        return out


def _forward(unet: nn.Module, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None, depth: int,
             deep: Tensor | None, patches: UNetPatches | None, sigmas: Tensor | None) -> tuple[Tensor, Tensor]:
    """The UNet's forward (the same operations in the same order as UNetModel.forward), returning also the
    feature entering output block `n - 1 - depth`; given `deep`, the blocks that make that feature are skipped
    and `deep` is used instead."""
    unet._check_inputs(x, context, y)
    timesteps, emb, context = unet.embed(x, timesteps, context, y)
    shape = tuple(x.shape)
    split = len(unet.output_blocks) - 1 - depth

    def site(kind: str, index: int) -> Site:
        return Site((kind, index), shape, timesteps, sigmas=sigmas)

    def run(block: nn.Module, h: Tensor, kind: str, index: int, size: tuple[int, int] | None = None) -> Tensor:
        if not patches:
            return block(h, emb, context, size)
        return block(h, emb, context, size, patches=patches, site=site(kind, index))

    skips: list[Tensor] = []
    h = x
    for i, block in enumerate(unet.input_blocks):
        if deep is not None and i > depth:
            break
        h = run(block, h, "input", i)
        if patches:
            h = patches.run_input(h, site("input", i))
        skips.append(h)
        if patches:
            h = patches.run_input(h, site("input", i), after_skip=True)
    if deep is None:
        h = run(unet.middle_block, h, "middle", 0)
    kept = deep
    for i, block in enumerate(unet.output_blocks):
        if i < split and deep is not None:
            continue
        if i == split:
            if deep is None:
                kept = h
            else:
                h = deep
        skip = skips.pop()
        if patches:
            h, skip = patches.run_output(h, skip, site("output", i))
        h = torch.cat([h, skip], dim=1)
        size = tuple(skips[-1].shape[-2:]) if skips else None
        h = run(block, h, "output", i, size)
    assert kept is not None
    return unet.out(h), kept

