"""`--compile`: UNet step time eager vs torch.compile'd, and diffusers' eager step, on the full-size random SD1.5 file.

One process: our UNet (bf16 by default) from the cached random checkpoint, the same weights in diffusers'
UNet2DConditionModel; batch 2 (cond and uncond), 64x64 latent, 77 tokens. Our forward goes through
diffusion/patches/compile.py exactly as `--compile` installs it; the first compiled call's time (compiling
included) is printed apart, then the median of `--steps` calls of each. The compiled output is compared with the
eager one (max relative difference). Inductor's cache goes to --cache-dir/inductor, so a second run shows the
cached compile time. `--vae` adds the VAE decoder at 512x512 (eager vs compiled).

    python bench/compile.py [--threads 1] [--steps 3] [--dtype bfloat16] [--vae]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("bench.compile")


def timed(fn, steps: int) -> tuple[float, float, torch.Tensor]:
    """(first call's seconds, median of the next `steps`, the last output)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/latentloom-bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae", action="store_true", help="also the VAE decoder at 512x512")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.cache_dir / "inductor"))

    from bench.models import ensure_files
    from diffusion.checkpoints.loader import load_checkpoint
    from diffusion.patches.compile import compile_forward

    path, config = ensure_files(args.cache_dir)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    log.info("%s on %s, %s, %d thread(s), load average %s; inductor cache %s", path.name, device, args.dtype,
             args.threads, load, os.environ["TORCHINDUCTOR_CACHE_DIR"])
    loaded = load_checkpoint(path, dtype=dtype, device=device)
    unet = loaded.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen).to(device, dtype)
    t = torch.tensor([999.0, 500.0], device=device)
    context = (torch.randn(2, 77, 768, generator=gen) * 0.5).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        out = unet(x, t, context)
        sync()
        return out

    theirs = None
    if not args.no_diffusers:
        from diffusers import UNet2DConditionModel

        theirs = UNet2DConditionModel.from_single_file(
            str(path), config=str(config), subfolder="unet", local_files_only=True, torch_dtype=dtype).eval().to(device)
    with torch.inference_mode():
        eager_out = step()  # warm-up
        wrapper = compile_forward(unet, "SD1.5 UNet")
        started = time.perf_counter()
        compiled_out = step()
        first = time.perf_counter() - started
        if wrapper.failed:
            log.info("the compiled path failed (see the warning above): nothing to compare")
            return
        # rounds of eager, compiled and diffusers back to back, so that a shared machine's load drifts over all three
        calls = {"eager": lambda: wrapper.eager(x, t, context), "compiled": step}
        if theirs is not None:
            calls["diffusers"] = lambda: theirs(x, t, encoder_hidden_states=context).sample
            theirs_out = calls["diffusers"]()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.steps):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                sync()
                times[name].append(time.perf_counter() - started)
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    log.info("UNet step (batch 2, 64x64), median of %d rounds: eager %.3f s, compiled %.3f s (%.2fx); first compiled "
             "call %.1f s (compiling, or reading Inductor's cache, included); compiled vs eager max rel diff %.1e",
             args.steps, eager, compiled, eager / compiled, first, rel_diff(compiled_out, eager_out))
    if theirs is not None:
        diffusers_s = statistics.median(times["diffusers"])
        log.info("diffusers eager %.3f s: ours eager / diffusers %.2f (target <= 0.7), compiled / diffusers %.2f "
                 "(target <= 0.5); ours vs diffusers max rel diff %.1e", diffusers_s, eager / diffusers_s,
                 compiled / diffusers_s, rel_diff(eager_out, theirs_out))
        del theirs
    if args.vae:
        decoder = loaded.vae
        z = torch.randn(1, 4, 64, 64, generator=gen).to(device, decoder.post_quant_conv.weight.dtype)
        with torch.inference_mode():
            _, eager, eager_out = timed(lambda: decoder.decode(z), max(1, args.steps - 1))
            compile_forward(decoder.decoder, "SD1.5 VAE decoder")
            first, compiled, compiled_out = timed(lambda: decoder.decode(z), max(1, args.steps - 1))
        log.info("VAE decode 512x512: eager %.3f s, compiled %.3f s (%.2fx); first compiled call %.1f s; "
                 "max rel diff %.1e", eager, compiled, eager / compiled, first, rel_diff(compiled_out, eager_out))


if __name__ == "__main__":
    main()
