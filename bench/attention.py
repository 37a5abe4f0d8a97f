"""Peak memory and time of one SDXL-size self-attention at 2048x2048: SDPA's fused kernel, its math path split
along the queries to a budget (diffusion/models/attention.py), and the math path whole where it fits.

SDXL's first attention level at 2048x2048 is a 128x128 map: 16384 tokens, 640 channels in 10 heads of 64. Each
variant runs in a fresh process (one image's row: batch 1; --batch 2 for cond and uncond); the peak is the
process's VmHWM above what it held with q, k and v made. The math path whole needs the scores (about 9.5 bytes
each: 25 GB at batch 1), so it runs only where `--whole-max` allows; its size is printed either way.

    python bench/attention.py [--tokens 16384] [--budget-gb 2] [--threads 1] [--whole-max-gb 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.attention")
HEADS, HEAD_DIM = 10, 64


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(variant: str, batch: int, tokens: int, budget: int, dtype_name: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffusion.models.attention import attention

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=gen).to(dtype).transpose(1, 2)
               for _ in range(3))
    base = status("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if variant == "fused":
            out = attention(q, k, v)
        else:
            with sdpa_kernel(SDPBackend.MATH):  # as where no fused kernel takes the inputs (MPS, other layouts)
                out = F.scaled_dot_product_attention(q, k, v) if variant == "whole" else _chunked(q, k, v, budget)
    elapsed = time.perf_counter() - start
    return {"peak": status("VmHWM") - base, "seconds": elapsed, "finite": bool(torch.isfinite(out).all())}


def _chunked(q, k, v, budget: int):
    """attention()'s split, forced onto the math path (on a CPU the fused kernel would take these inputs)."""
    import torch
    import torch.nn.functional as F

    from diffusion.models.attention import query_chunk

    b, heads, n, _ = q.shape
    chunk = query_chunk(b, heads, n, k.shape[-2], budget)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v) for i in range(0, n, chunk)], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128 * 128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget-gb", type=float, default=2.0)
    parser.add_argument("--whole-max-gb", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = int(args.budget_gb * 2**30)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.batch, args.tokens, budget, args.dtype)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusion.models.attention import MATH_SCORE_BYTES, chunks_needed, scores_bytes

    n = args.tokens
    whole = scores_bytes(args.batch, HEADS, n, n, None, fused=False)
    log.info("self-attention: batch %d, %d tokens, %d heads of %d, %s; math path scores whole %.1f GB (%d B each), "
             "budget %.1f GB: %d chunks", args.batch, n, HEADS, HEAD_DIM, args.dtype, whole / 2**30,
             MATH_SCORE_BYTES, args.budget_gb, chunks_needed(args.batch, HEADS, n, n, budget))
    variants = ["fused", "chunked"] + (["whole"] if whole <= args.whole_max_gb * 2**30 else [])
    for variant in variants:
        command = [sys.executable, __file__, "--child", variant, "--tokens", str(n), "--batch", str(args.batch),
                   "--budget-gb", str(args.budget_gb), "--threads", str(args.threads), "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            log.info("  %-8s failed: %s", variant, done.stderr.strip().splitlines()[-1:])
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        log.info("  %-8s peak +%.2f GB, %.1f s%s", variant, r["peak"] / 2**30, r["seconds"],
                 "" if r["finite"] else " (non-finite!)")
    if "whole" not in variants:
        log.info("  whole    not run: %.1f GB of scores is over --whole-max-gb %.1f", whole / 2**30, args.whole_max_gb)


if __name__ == "__main__":
    main()
