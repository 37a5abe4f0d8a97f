"""Token merging's speed-up and image difference: TomePatchModel (diffusion/patches/tome.py) vs the plain model.

One process, the full-size random SD1.5 file, ComfyUI's default graph through our executor (bench/pipeline.py's),
with and without a TomePatchModel between the checkpoint and the KSampler; same seed and prompts. A small warm-up
run loads the model first, so both measured runs are warm. Printed: the KSampler's time per step of each, the
speed-up, and the PSNR of the ToMe image against the plain one (random weights: the images are noise-like, so
this is a strict measure of how much the result moves).

    python bench/acceleration.py [--threads 1] [--size 512] [--steps 4] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("bench.acceleration")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/latentloom-bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from bench.models import ensure_files
    from bench.pipeline import PROMPTS, SEED, psnr, workflow
    from graph.executor import Executor
    from graph.validation import validate_prompt
    from nodes import build_registry
    from nodes.environment import Environment

    path, _ = ensure_files(args.cache_dir)
    data = Path(tempfile.mkdtemp(prefix="bench-acceleration-"))
    env = Environment(data, extra_model_dirs={"checkpoints": [path.parent]}, precision=args.precision)
    env.ensure_dirs()
    registry = build_registry(env, plugins=False)
    executor = Executor(env=env, previews=False)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    log.info("%s, %s, %dx%d, %d steps euler, %d thread(s), load average %s", path.name, args.precision, args.size,
             args.size, args.steps, args.threads, load)

    def run(size: int, steps: int, ratio: float | None, tag: str) -> tuple[float, Path]:
        graph = workflow(path.name, PROMPTS[0], SEED, size, steps, 0)
        if ratio is not None:
            graph["20"] = {"class_type": "TomePatchModel", "inputs": {"model": ["4", 0], "ratio": ratio}}
            graph["3"]["inputs"]["model"] = ["20", 0]
        graph["9"]["inputs"]["filename_prefix"] = tag
        marks: dict[str, float] = {}

        def sink(event: str, data: dict) -> None:
            if event == "executing":
                marks[str(data.get("node"))] = time.perf_counter()

        validation = validate_prompt(graph, registry, env)
        if not validation.ok:
            raise SystemExit(str(validation.response()))
        result = executor.execute(validation.prompt, tag, sink)
        if result.status != "success":
            raise SystemExit(f"{tag} failed: {result.error}")
        sampled = marks["8"] - marks["3"]  # KSampler until VAEDecode starts
        return sampled / steps, sorted((data / "output").glob(f"{tag}_*.png"))[-1]

    run(64, 1, None, "warmup")
    plain_step, plain_png = run(args.size, args.steps, None, "plain")
    tome_step, tome_png = run(args.size, args.steps, args.ratio, "tome")
    log.info("per step: plain %.2f s, ToMe %.2f %.2f s: %.2fx faster; PSNR ToMe vs plain %.1f dB", plain_step,
             args.ratio, tome_step, plain_step / tome_step, psnr(str(tome_png), str(plain_png)))


if __name__ == "__main__":
    main()
