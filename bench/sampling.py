"""Sampler overhead per step: wall time minus time inside the model, for every registered sampler, on a
[1, 4, 64, 64] latent (a 512x512 SD image) with a trivial linear denoiser. The time spent drawing noise is
shown on its own (it is the noise sampler's cost, the same for every stochastic sampler of ComfyUI's), and
the sampler's own arithmetic is what remains. Best of --repeats runs.

Run: python bench/sampling.py [--steps 20] [--repeats 5] [--only euler,seeds_2]"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch

from diffusion.sampling.ksampler import BROWNIAN_NOISE_SAMPLERS
from diffusion.sampling.noise import BrownianNoiseSampler, seeded_noise_sampler
from diffusion.sampling.sampler_registry import SAMPLER_NAMES, get_sampler
from diffusion.sampling.schedules import DiscreteSchedule, calculate_sigmas

log = logging.getLogger("bench.sampling")
TARGET_MS = 1.0


class TimedModel:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        s = sigma.reshape(-1, 1, 1, 1)
        out = x / (1 + s**2)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


class TimedNoise:
    def __init__(self, sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.sampler, self.seconds = sampler, 0.0

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.sampler(sigma, sigma_next)
        self.seconds += time.perf_counter() - start
        return out


def bench_one(name: str, x: torch.Tensor, sigmas: torch.Tensor, steps: int, repeats: int) -> tuple[float, ...]:
    """(own ms/step, noise ms/step, model calls, model ms) of the best of `repeats` runs."""
    best: tuple[float, ...] | None = None
    for _ in range(repeats):
        model = TimedModel()
        brownian = name in BROWNIAN_NOISE_SAMPLERS  # as diffusion.sampling.ksampler.sample chooses
        noise = TimedNoise(BrownianNoiseSampler(x, 0) if brownian else seeded_noise_sampler(x, 0))
        start = time.perf_counter()
        get_sampler(name)(model, x, sigmas, noise_sampler=noise)
        wall = time.perf_counter() - start
        own = (wall - model.seconds - noise.seconds) / steps
        if best is None or own < best[0]:
            best = (own * 1e3, noise.seconds / steps * 1e3, model.calls, model.seconds * 1e3)
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated sampler names (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n for n in args.only.split(",") if n] or list(SAMPLER_NAMES)
    unknown = [n for n in names if n not in SAMPLER_NAMES]
    if unknown:
        parser.error(f"unknown sampler(s) {', '.join(unknown)}; expected some of {', '.join(SAMPLER_NAMES)}")
    torch.set_num_threads(1)
    sigmas = calculate_sigmas(DiscreteSchedule.from_config(), "karras", args.steps)
    x = torch.randn(1, 4, 64, 64) * sigmas[0]

    bare = TimedModel()
    start = time.perf_counter()
    for _ in range(200):
        bare(x, sigmas[:1])
    log.info("bare model call: %.3f ms (wall %.3f ms); %d samplers, %d karras steps, best of %d",
             bare.seconds / 200 * 1e3, (time.perf_counter() - start) / 200 * 1e3, len(names), args.steps,
             args.repeats)
    log.info("%-32s %6s %9s %15s %15s", "sampler", "calls", "model ms", "noise ms/step", "own ms/step")
    over = []
    for name in names:
        own, noise, calls, model_ms = bench_one(name, x, sigmas, args.steps, args.repeats)
        log.info("%-32s %6d %9.2f %15.3f %15.3f", name, calls, model_ms, noise, own)
        if own > TARGET_MS:
            over.append(f"{name} ({own:.2f} ms)")
    log.info("own overhead per step over %.1f ms: %s", TARGET_MS, ", ".join(over) or "none")


if __name__ == "__main__":
    main()
