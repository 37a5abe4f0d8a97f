"""Time and peak memory per frame of text-to-video on this machine: the demo model with its motion module (and
the module's cross-attention adapter, as workflows/video.json applies them), 16, 32
and 64 frames, context windows of 16 frames (ADE_StandardUniformContextOptions, overlap 4, pyramid fuse) so the
memory of a step is bounded by the window, not by the clip.

Each length runs in a fresh process (the workflow of bench/motion.py: KSampler `--steps` steps, cfg 5, euler,
VAEDecode, SaveImage), after a one-frame warm-up run in that process that loads the models; time is the timed
run's wall clock, peak memory the process's resident high-water mark (VmHWM) and how far the timed run raised it
above the warm-up's.

    python bench/video.py [--frames 16 32 64] [--steps 20] [--threads 1] [--context 16] [--overlap 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.video")


def peak_rss() -> int:
    """This process's resident-memory high-water mark in bytes."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmHWM"].split()[0]) * 1024


def child(frames: int, steps: int, context: int, overlap: int, threads: int) -> dict:
    """Runs in a fresh process: warm-up (models loaded), then the timed clip."""
    import torch

    from bench.motion import VideoRunner

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        runner = VideoRunner(Path(tmp))
        caption = "a red circle on a white background moving to the right"
        runner.clip(caption, 0, 1, steps=1, context=(context, overlap))
        warm = peak_rss()
        start = time.perf_counter()
        clip = runner.clip(caption, 0, frames, steps=steps, context=(context, overlap))
        seconds = time.perf_counter() - start
    assert clip.shape[0] == frames
    return {"frames": frames, "seconds": seconds, "peak": peak_rss(), "warm": warm}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.context, args.overlap, args.threads)))
        return
    log.info("txt2vid, demo model + motion module, %d steps, context windows %d (overlap %d), %s thread(s)",
             args.steps, args.context, args.overlap, args.threads or "default")
    for frames in args.frames:
        proc = subprocess.run([sys.executable, __file__, "--child", str(frames), "--steps", str(args.steps),
                               "--context", str(args.context), "--overlap", str(args.overlap),
                               "--threads", str(args.threads)], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{frames} frames failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        log.info("%3d frames: %6.1f s (%.2f s/frame), peak memory %.0f MiB (%.1f MiB above the loaded model, "
                 "%.2f MiB/frame)", frames, r["seconds"], r["seconds"] / frames, r["peak"] / 2**20,
                 (r["peak"] - r["warm"]) / 2**20, (r["peak"] - r["warm"]) / 2**20 / frames)


if __name__ == "__main__":
    main()
