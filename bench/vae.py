"""VAE decode at 512x512: ours vs diffusers' AutoencoderKL on the same weights (the full-size random SD1.5 file).

One process loads our VAE (diffusion/checkpoints/loader.py) and diffusers' `AutoencoderKL.from_single_file` from
the same checkpoint, in the same dtype, and decodes the same [1, 4, 64, 64] latent with each in rounds (ours, then
diffusers, then ours again...), so that a shared machine's load drifts over both; after a warm-up call each, the
median of `--rounds` calls is printed with the ratio ours/diffusers (target <= 0.7) and the largest difference of
the two images (they should agree to dtype noise). `--profile` prints torch.profiler's top operators of one
decode of each.

    python bench/vae.py [--threads 1] [--rounds 3] [--dtypes bfloat16,float32] [--size 512] [--profile]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("bench.vae")


def load_pair(path: Path, config: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(our AutoencoderKL, diffusers' AutoencoderKL) with the checkpoint's VAE weights in `dtype`."""
    from diffusers import AutoencoderKL as DiffusersVAE

    from diffusion.checkpoints.loader import load_checkpoint

    ours = load_checkpoint(path, dtype=dtype, autoencoder_dtype=dtype).vae
    theirs = DiffusersVAE.from_single_file(str(path), config=str(config), subfolder="vae", local_files_only=True,
                                           torch_dtype=dtype).eval()
    return ours, theirs


def measure(dtype_name: str, path: Path, config: Path, size: int, rounds: int, profile: bool) -> dict[str, float]:
    dtype = getattr(torch, dtype_name)
    ours, theirs = load_pair(path, config, dtype)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    calls = {"ours": lambda: ours.decode(z), "diffusers": lambda: theirs.decode(z).sample}
    times: dict[str, list[float]] = {name: [] for name in calls}
    outputs = {}
    with torch.inference_mode():
        for name, call in calls.items():  # warm-up: oneDNN builds its kernels for each shape on the first call
            outputs[name] = call()
        for _ in range(rounds):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            for name, call in calls.items():
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    call()
                log.info("%s %s, one decode:\n%s", name, dtype_name,
                         prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    a, b = outputs["ours"].float(), outputs["diffusers"].float()
    return {"ours": statistics.median(times["ours"]), "diffusers": statistics.median(times["diffusers"]),
            "max_diff": float((a - b).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/latentloom-bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtypes", default="")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top operators of one decode each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from bench.models import ensure_files
    from diffusion.devices import cpu_has_fast_bf16

    path, config = ensure_files(args.cache_dir)
    dtypes = [d for d in args.dtypes.split(",") if d] or (
        ["bfloat16", "float32"] if cpu_has_fast_bf16() else ["float32"])
    for dtype_name in dtypes:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        r = measure(dtype_name, path, config, args.size, args.rounds, args.profile)
        log.info("VAE decode %dx%d %-8s (%d thread(s), load %s), median of %d: ours %.3f s, diffusers %.3f s, "
                 "ratio %.2f (target <= 0.7); max |difference| of the images %.1e (range -1..1)", args.size,
                 args.size, dtype_name, args.threads, load, args.rounds, r["ours"], r["diffusers"],
                 r["ours"] / r["diffusers"], r["max_diff"])


if __name__ == "__main__":
    main()
