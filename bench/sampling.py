"""Sampler overhead per step: wall time minus time inside the model, on a [1, 4, 64, 64] latent with a trivial
linear denoiser. Run: python bench/sampling.py [--steps 20] [--repeats 3]"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from diffusion.noise import BrownianNoiseSampler, seeded_noise_sampler
from diffusion.sampler_registry import SAMPLER_NAMES, get_sampler
from diffusion.sampling import BROWNIAN_NOISE_SAMPLERS
from diffusion.schedules import DiscreteSchedule, calculate_sigmas

log = logging.getLogger("bench.sampling")


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    sigmas = calculate_sigmas(DiscreteSchedule.from_config(), "karras", args.steps)
    x = torch.randn(1, 4, 64, 64) * sigmas[0]

    bare = TimedModel()
    start = time.perf_counter()
    for _ in range(200):
        bare(x, sigmas[:1])
    wall = (time.perf_counter() - start) / 200
    log.info("bare model call: %.3f ms (wall %.3f ms)", bare.seconds / 200 * 1e3, wall * 1e3)
    log.info("%-20s %8s %10s %14s", "sampler", "calls", "model ms", "overhead ms/step")
    for name in SAMPLER_NAMES:
        best = None
        for _ in range(args.repeats):
            model = TimedModel()
            noise = BrownianNoiseSampler(x, 0) if name in BROWNIAN_NOISE_SAMPLERS else seeded_noise_sampler(x, 0)
            start = time.perf_counter()
            get_sampler(name)(model, x, sigmas, noise_sampler=noise)
            overhead = (time.perf_counter() - start - model.seconds) / args.steps
            if best is None or overhead < best[0]:
                best = (overhead, model.calls, model.seconds)
        log.info("%-20s %8d %10.2f %14.3f", name, best[1], best[2] * 1e3, best[0] * 1e3)


if __name__ == "__main__":
    main()
