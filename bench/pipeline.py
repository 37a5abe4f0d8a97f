"""The whole text-to-image run, ours vs diffusers' StableDiffusionPipeline, on the same full-size random SD1.5 file.

One image is: load the checkpoint, encode the prompt and the negative prompt, N euler steps with CFG, VAE decode,
write a PNG. Ours runs ComfyUI's default graph (CheckpointLoaderSimple, two CLIPTextEncode, EmptyLatentImage,
KSampler euler/simple, VAEDecode, SaveImage) through the real executor; diffusers runs the same steps by hand
(`from_single_file`, `encode_prompt`, the pipeline with EulerDiscreteScheduler on "trailing" timesteps, which are
the "simple" schedule's, the VAE, PIL) with our initial noise, so both should make the same image up to dtype
noise (the PSNR between them is printed as a check that the comparison is like for like).

Each measurement is a fresh process making three images: the first is the cold one (imports of the engine or the
pipeline package, loading, first-call kernel set-up; `torch` itself is imported before the clock starts for
both), the third the warm one (the model stays loaded; every image has its own prompt and seed, so text encoding,
sampling, decoding and saving run again — as on a warm server). Ours and diffusers alternate, `--repeats` times,
and the median of each phase is printed with the ratio ours/diffusers, for fp32 and (where the CPU has native
bf16) bf16. Peak RSS is the process's VmHWM. `--deep-cache N` adds a run of ours with DeepCache (reuse the deep
UNet features for N-1 of every N steps) and prints its speed-up and its PSNR against our plain image.

    python bench/pipeline.py [--threads 1] [--steps 4] [--size 256] [--512] [--repeats 3] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("bench.pipeline")
PHASES = ("setup", "load", "text", "sample", "decode", "png")
NODE_PHASES = {"CheckpointLoaderSimple": "load", "CLIPTextEncode": "text", "EmptyLatentImage": "sample",
               "KSampler": "sample", "VAEDecode": "decode", "SaveImage": "png"}
PROMPTS = ("a lighthouse on a cliff at dawn, oil painting", "a red bicycle leaning on a brick wall",
           "a bowl of ramen, studio photo")
NEGATIVE = "blurry, watermark"
CFG = 7.0
SEED = 42


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmHWM"].split()[0]) * 1024


def initial_noise(seed: int, size: int) -> torch.Tensor:
    """The KSampler's noise for a [1, 4, size/8, size/8] latent (a CPU generator seeded with `seed`)."""
    return torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))


def workflow(ckpt: str, prompt: str, seed: int, size: int, steps: int, deep_cache: int) -> dict:
    model = ["4", 0]
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }
    if deep_cache > 1:
        graph["10"] = {"class_type": "DeepCache", "inputs": {
            "model": ["4", 0], "cache_interval": deep_cache, "cache_depth": 3, "start_step": 0, "end_step": 1000}}
        graph["3"]["inputs"]["model"] = ["10", 0]
    return graph


def child_ours(path: Path, dtype: str, size: int, steps: int, out: Path, deep_cache: int,
               images: int = len(PROMPTS), cache: Path | None = None) -> list[dict]:
    start = time.perf_counter()
    from graph.executor import Executor
    from graph.validation import validate_prompt
    from nodes import build_registry
    from nodes.environment import Environment

    data = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    # A fresh data directory per process, but its cache/ (the fitted preview map, the weights cast to bf16) persists
    # as a user's does: the first run after the bench files are made fits and casts, later ones read them
    # (--fresh-cache: fit and cast every time).
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (data / "cache").symlink_to(cache, target_is_directory=True)
    precision = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    env = Environment(data, extra_model_dirs={"checkpoints": [path.parent]}, precision=precision)
    env.ensure_dirs()
    registry = build_registry(env, plugins=False)
    executor = Executor(env=env, previews=True)  # as the server by default (--preview-method latent2rgb)
    results = []
    for i, text in enumerate(PROMPTS[:images]):
        phases = dict.fromkeys(PHASES, 0.0)
        phases["setup"] = time.perf_counter() - start if i == 0 else 0.0
        marks: list[tuple[float, str | None]] = []

        def sink(event: str, data: dict, marks=marks) -> None:
            if event == "executing":
                marks.append((time.perf_counter(), data.get("node")))

        validation = validate_prompt(workflow(path.name, text, SEED + i, size, steps, deep_cache), registry, env)
        if not validation.ok:
            raise SystemExit(json.dumps(validation.response()))
        begin = time.perf_counter()
        result = executor.execute(validation.prompt, f"p{i}", sink)
        if result.status != "success":
            raise SystemExit(f"our run failed: {result.error}")
        marks.append((time.perf_counter(), None))
        classes = validation.prompt.api_prompt
        phases["setup"] += marks[0][0] - begin if marks else 0.0
        for (t, node), (t_next, _) in itertools.pairwise(marks):
            if node is None:
                continue
            phases[NODE_PHASES.get(classes[node]["class_type"], "sample")] += t_next - t
        saved = sorted((data / "output").glob("bench_*.png"))[-1]
        target = out / f"ours-{dtype}-{i}.png"
        target.write_bytes(saved.read_bytes())
        results.append({"phases": phases, "png": str(target)})
    return results


def child_diffusers(path: Path, config: Path, dtype: str, size: int, steps: int, out: Path) -> list[dict]:
    start = time.perf_counter()
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    torch_dtype = getattr(torch, dtype)
    results = []
    pipe = None
    for i, text in enumerate(PROMPTS):
        phases = dict.fromkeys(PHASES, 0.0)
        phases["setup"] = time.perf_counter() - start if i == 0 else 0.0
        t = time.perf_counter()
        if pipe is None:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), local_files_only=True, safety_checker=None, torch_dtype=torch_dtype)
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
            pipe.set_progress_bar_config(disable=True)
        phases["load"] = time.perf_counter() - t
        with torch.inference_mode():
            t = time.perf_counter()
            positive, negative = pipe.encode_prompt(text, "cpu", 1, True, NEGATIVE)
            phases["text"] = time.perf_counter() - t
            t = time.perf_counter()
            latents = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=steps,
                           guidance_scale=CFG, height=size, width=size, output_type="latent",
                           latents=initial_noise(SEED + i, size).to(torch_dtype)).images
            phases["sample"] = time.perf_counter() - t
            t = time.perf_counter()
            pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            array = ((pixels[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8)
            phases["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        target = out / f"diffusers-{dtype}-{i}.png"
        Image.fromarray(array.numpy()).save(target, compress_level=4)
        phases["png"] = time.perf_counter() - t
        results.append({"phases": phases, "png": str(target)})
    return results


def child(args: argparse.Namespace) -> None:
    which, path, config, dtype = args.child
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_cache = Path(args.data_cache) if args.data_cache else None
    if which == "diffusers":
        images = child_diffusers(Path(path), Path(config), dtype, args.size, args.steps, out)
    elif args.profile:  # the cold image under cProfile: where the first image's extra time goes
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        images = profiler.runcall(child_ours, Path(path), dtype, args.size, args.steps, out, 0, 1, data_cache)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(args.profile)
    else:
        images = child_ours(Path(path), dtype, args.size, args.steps, out, args.deep_cache if which == "deep" else 0,
                            cache=data_cache)
    print(json.dumps({"images": images, "peak_rss": peak_rss()}))


def data_cache_args(args: argparse.Namespace) -> list[str]:
    return [] if args.fresh_cache else ["--data-cache", str(args.cache_dir / "ours-data-cache")]


def run_child(which: str, path: Path, config: Path, dtype: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", which, str(path), str(config), dtype, "--out", str(out),
               "--threads", str(args.threads), "--size", str(args.size), "--steps", str(args.steps),
               "--deep-cache", str(args.deep_cache), *data_cache_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{which} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def psnr(a: str, b: str) -> float:
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def summarise(runs: list[dict], image: int) -> dict[str, float]:
    phases = {p: statistics.median(r["images"][image]["phases"][p] for r in runs) for p in PHASES}
    phases["total"] = statistics.median(sum(r["images"][image]["phases"].values()) for r in runs)
    return phases


def report(dtype: str, results: dict[str, list[dict]], steps: int) -> None:
    names = list(results)
    for label, image in (("cold (1st image)", 0), ("warm (3rd image)", 2)):
        rows = {name: summarise(results[name], image) for name in names}
        log.info("%s %s, median of %d:", dtype, label, len(results["ours"]))
        log.info("  %-8s %s", "phase", "".join(f"{n:>12}" for n in names) + f"{'ours/diff':>11}")
        for phase in (*PHASES, "total"):
            values = "".join(f"{rows[n][phase]:12.3f}" for n in names)
            ratio = rows["ours"][phase] / rows["diffusers"][phase] if rows["diffusers"][phase] > 1e-4 else math.nan
            log.info("  %-8s %s %10.2f", phase, values, ratio)
        if image == 2:
            log.info("  per step: ours %.3f s, diffusers %.3f s", rows["ours"]["sample"] / steps,
                     rows["diffusers"]["sample"] / steps)
    ours_cold, ours_warm = summarise(results["ours"], 0)["total"], summarise(results["ours"], 2)["total"]
    diff_cold = summarise(results["diffusers"], 0)["total"]
    log.info("  ours cold/warm %.2f (target <= 1.25); ours cold / diffusers cold %.2f (target <= 0.5)",
             ours_cold / ours_warm, ours_cold / diff_cold)
    for name in names:
        log.info("  peak RSS %-9s %.2f GB", name, statistics.median(r["peak_rss"] for r in results[name]) / 1e9)
    last = {n: results[n][-1]["images"][2]["png"] for n in names}
    log.info("  PSNR ours vs diffusers (3rd image): %.1f dB", psnr(last["ours"], last["diffusers"]))
    if "deep" in results:
        plain = summarise(results["ours"], 2)["sample"]
        cached = summarise(results["deep"], 2)["sample"]
        log.info("  DeepCache: sampling %.2fx faster; PSNR vs plain %.1f dB", plain / cached,
                 psnr(last["ours"], last["deep"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/latentloom-bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--512", dest="large", action="store_true", help="512x512 instead of --size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="")
    parser.add_argument("--deep-cache", type=int, default=0, help="also run ours with DeepCache every N steps")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="only profile our cold image (cProfile, the top N functions by cumulative time)")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="our data directory's cache (preview map, cast weights) starts empty in every run")
    parser.add_argument("--data-cache", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.large:
        args.size = 512
    from bench.models import ensure_files
    from diffusion.devices import cpu_has_fast_bf16

    path, config = ensure_files(args.cache_dir)
    dtypes = [d for d in args.dtypes.split(",") if d] or (
        ["float32", "bfloat16"] if cpu_has_fast_bf16() else ["float32"])
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    log.info("%s, %d steps euler cfg %.1f at %dx%d, %d thread(s), load average %s",
             path.name, args.steps, CFG, args.size, args.size, args.threads, " ".join(load))
    if args.profile:
        command = [sys.executable, __file__, "--child", "ours", str(path), str(config), dtypes[0], "--out",
                   tempfile.mkdtemp(prefix="bench-profile-"), "--threads", str(args.threads), "--size", str(args.size),
                   "--steps", str(args.steps), "--profile", str(args.profile), *data_cache_args(args)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        return
    names = ["ours", "diffusers"] + (["deep"] if args.deep_cache > 1 else [])
    for dtype in dtypes:
        results: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else list(reversed(names)):
                out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
                results[name].append(run_child(name, path, config, dtype, args, out))
                log.info("  %s %s run %d: cold %.2f s, warm %.2f s (each finished run is shown as it ends)", name,
                         dtype, r + 1, sum(results[name][-1]["images"][0]["phases"].values()),
                         sum(results[name][-1]["images"][-1]["phases"].values()))
        report(dtype, results, args.steps)


if __name__ == "__main__":
    main()
