"""Seeded noise. Drawn on the CPU from a local generator so that a seed gives the same image on any device."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NoiseSampler = Callable[[Tensor, Tensor], Tensor]


def prepare_noise(
    latent: Tensor,
    seed: int,
    batch_index: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Initial noise in the latent's shape (float32, standard normal), moved to `device` (default: the latent's).

    Without `batch_index` the whole batch is one draw. With it, noise for indices 0..max(batch_index) is drawn
    one image at a time in index order and image i of the batch gets the noise of index batch_index[i]; so an
    image's noise depends only on the seed and its own index, never on which other indices are in the batch.
    """
    device = latent.device if device is None else device
    generator = torch.Generator().manual_seed(int(seed))
    if batch_index is None:
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
        return noise.to(device)
    indices = [int(i) for i in batch_index]
    if len(indices) != latent.shape[0]:
        raise ValueError(f"batch_index has {len(indices)} entries but the latent batch is {latent.shape[0]}")
    if min(indices) < 0:
        raise ValueError(f"batch_index entries must be >= 0, got {indices}")
    per_index = [
        torch.randn((1, *latent.shape[1:]), generator=generator, dtype=torch.float32) for _ in range(max(indices) + 1)
    ]
    return torch.cat([per_index[i] for i in indices]).to(device)


def seeded_noise_sampler(x: Tensor, seed: int) -> NoiseSampler:
    """Fresh standard-normal noise like `x` at every call, from a CPU generator seeded with `seed`.

    This is what ancestral and SDE samplers add each step. It is not a Brownian tree: the noise for an interval
    does not depend on sigma, so SDE results change with the number of steps. The first draw equals
    `prepare_noise(x, seed)` (ComfyUI on the CPU seeds both the same way).
    """
    generator = torch.Generator().manual_seed(int(seed))

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


class BrownianNoiseSampler:
    """Noise for SDE samplers from one seeded Brownian path W(sigma): a call for (sigma, sigma_next) returns
    (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), so the noises of overlapping intervals (a sub-step
    and its whole step, as in dpmpp_sde) are correlated as the SDE requires.

    Values of W at new points are drawn in query order, by Brownian-bridge interpolation between known
    neighbours (or a free increment beyond them). Unlike k-diffusion's Brownian tree the path therefore depends
    on the query order, i.e. on the step count; for a fixed schedule it is reproducible.
    """

    def __init__(self, x: Tensor, seed: int) -> None:
        self.shape, self.device, self.dtype = x.shape, x.device, x.dtype
        self.generator = torch.Generator().manual_seed(int(seed))
        self.points: dict[float, Tensor] = {}

    def _normal(self) -> Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32)

    def _value(self, t: float) -> Tensor:
        if t in self.points:
            return self.points[t]
        if not self.points:
            value = torch.zeros(self.shape)
        else:
            below = max((p for p in self.points if p < t), default=None)
            above = min((p for p in self.points if p > t), default=None)
            if below is not None and above is not None:
                w_lo, w_hi = self.points[below], self.points[above]
                frac = (t - below) / (above - below)
                std = math.sqrt((t - below) * (above - t) / (above - below))
                value = w_lo + frac * (w_hi - w_lo) + std * self._normal()
            else:
                nearest = below if above is None else above
                value = self.points[nearest] + math.sqrt(abs(t - nearest)) * self._normal()
        self.points[t] = value
        return value

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        t0, t1 = float(sigma), float(sigma_next)
        if t0 == t1:
            raise ValueError(f"Brownian noise needs a non-empty interval, got sigma = sigma_next = {t0}")
        w0 = self._value(t0)
        noise = (self._value(t1) - w0) / math.sqrt(abs(t1 - t0))
        return noise.to(device=self.device, dtype=self.dtype)
