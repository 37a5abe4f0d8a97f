"""`--compile`: UNet step time eager vs torch.compile'd, and diffusers' eager step, on a full-size random checkpoint.

One process: our UNet (bf16 by default) from the cached random checkpoint (SD1.5, or SDXL with `--family sdxl`), the
same weights in diffusers' UNet2DConditionModel (SD1.5 only: the SDXL rows are ours alone); batch 2 (cond and
uncond), a `--size`/8 latent (default 512: 64x64), 77 tokens. Our forward goes through diffusion/patches/compile.py
exactly as `--compile` installs it; the first compiled call's time (compiling included) is printed apart, then the
median of `--steps` calls of each, in seconds and in steps a second (it/s, as GPU numbers are quoted). The compiled
output is compared with the eager one (max relative difference). Inductor's cache goes to --cache-dir/inductor, so
a second run shows the cached compile time. `--no-compile` times the eager paths only; `--vae` adds the VAE decoder
at `--size` (eager vs compiled). bench/gpu.sh runs the GPU rows.

    python bench/compile.py [--threads 1] [--steps 3] [--dtype bfloat16] [--family sd1|sdxl] [--size 512]
                            [--device cuda] [--no-compile] [--no-diffusers] [--vae]
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
    parser.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (the latent is a eighth)")
    parser.add_argument("--vae", action="store_true", help="also the VAE decoder at --size")
    parser.add_argument("--no-compile", action="store_true", help="eager paths only")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    if args.size % 8 or not 64 <= args.size <= 4096:
        parser.error(f"--size {args.size}: a multiple of 8 from 64 to 4096")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.cache_dir / "inductor"))

    from bench.models import ensure_files, ensure_random_checkpoint
    from diffusion.checkpoints.loader import load_checkpoint
    from diffusion.patches.compile import compile_forward

    if args.family == "sd1":
        path, config = ensure_files(args.cache_dir)
    else:  # diffusers' SDXL UNet would need a config of its own: ours alone
        path = ensure_random_checkpoint(args.cache_dir, "sdxl", "sdxl-random-fp16.safetensors")
        args.no_diffusers = True
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} thread(s)"
    log.info("%s on %s (%s), %s, %dx%d, load average %s; inductor cache %s", path.name, device, where, args.dtype,
             args.size, args.size, load, os.environ["TORCHINDUCTOR_CACHE_DIR"])
    loaded = load_checkpoint(path, dtype=dtype, device=device)
    unet = loaded.unet
    gen = torch.Generator().manual_seed(0)
    side = args.size // 8
    x = torch.randn(2, 4, side, side, generator=gen).to(device, dtype)
    t = torch.tensor([999.0, 500.0], device=device)
    context = (torch.randn(2, 77, unet.config.context_dim, generator=gen) * 0.5).to(device, dtype)
    adm = unet.config.adm_in_channels
    y = (torch.randn(2, adm, generator=gen) * 0.5).to(device, dtype) if adm else None
    what = f"{args.family.upper()} UNet, batch 2, {side}x{side} latent"

    def synced(fn):
        """`fn` timed to its end: on a GPU, the call returns once the kernels it queued have run."""
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return call

    step = synced(lambda: unet(x, t, context, y))

    theirs = None
    if not args.no_diffusers:
        from diffusers import UNet2DConditionModel

        theirs = UNet2DConditionModel.from_single_file(
            str(path), config=str(config), subfolder="unet", local_files_only=True, torch_dtype=dtype).eval().to(device)
    with torch.inference_mode():
        eager_out = step()  # warm-up
        calls = {"eager": step}
        if not args.no_compile:
            wrapper = compile_forward(unet, f"{args.family} UNet")
            started = time.perf_counter()
            compiled_out = step()
            first = time.perf_counter() - started
            if wrapper.failed:
                log.info("the compiled path failed (see the warning above): eager only")
            else:
                calls = {"eager": synced(lambda: wrapper.eager(x, t, context, y)), "compiled": step}
        # rounds of eager, compiled and diffusers back to back, so that a shared machine's load drifts over all three
        if theirs is not None:
            calls["diffusers"] = synced(lambda: theirs(x, t, encoder_hidden_states=context).sample)
            theirs_out = calls["diffusers"]()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.steps):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    log.info("%s, median of %d rounds: %s", what, args.steps,
             ", ".join(f"{name} {s:.3f} s ({1 / s:.2f} it/s)" for name, s in medians.items()))
    eager = medians["eager"]
    if "compiled" in medians:
        log.info("compiled: %.2fx eager; first compiled call %.1f s (compiling, or reading Inductor's cache, "
                 "included); compiled vs eager max rel diff %.1e", eager / medians["compiled"], first,
                 rel_diff(compiled_out, eager_out))
    if theirs is not None:
        diffusers_s = medians["diffusers"]
        log.info("ours eager / diffusers %.2f (CPU target <= 0.7; GPU: diffusers' it/s over ours, target <= 0.91)%s; "
                 "ours vs diffusers max rel diff %.1e", eager / diffusers_s,
                 f", compiled / diffusers {medians['compiled'] / diffusers_s:.2f} (CPU target <= 0.5, GPU <= 0.67)"
                 if "compiled" in medians else "", rel_diff(eager_out, theirs_out))
        del theirs
    if args.vae:
        decoder = loaded.vae
        z = torch.randn(1, 4, side, side, generator=gen).to(device, decoder.post_quant_conv.weight.dtype)
        with torch.inference_mode():
            decode = synced(lambda: decoder.decode(z))
            _, eager, eager_out = timed(decode, max(1, args.steps - 1))
            if args.no_compile:
                log.info("VAE decode %dx%d: eager %.3f s", args.size, args.size, eager)
                return
            compile_forward(decoder.decoder, f"{args.family} VAE decoder")
            first, compiled, compiled_out = timed(decode, max(1, args.steps - 1))
        log.info("VAE decode %dx%d: eager %.3f s, compiled %.3f s (%.2fx); first compiled call %.1f s; "
                 "max rel diff %.1e", args.size, args.size, eager, compiled, eager / compiled, first,
                 rel_diff(compiled_out, eager_out))


if __name__ == "__main__":
    main()
