"""Checkpoint loading and UNet step time: our loader and UNet vs diffusers, on a full-size random SD1.5 file.

Targets: load time at most 0.5x diffusers' single-file loading, with peak RSS at most 1.3x the file size
(above the interpreter's own); UNet step (batch 2, 64x64 latent) at most 1.0x diffusers' UNet2DConditionModel
on identical weights, in fp32 and bf16.

The 2.1 GB fp16 checkpoint is written once (random weights, real layout) and cached under --cache-dir.
Diffusers needs a diffusers-layout config folder for single-file loading without the Hub; it is written
from code next to the checkpoint. Each load runs in a fresh process; peak RSS is that process's VmHWM
(getrusage's ru_maxrss would include the forked parent's size on Linux).

Each step round runs ours and diffusers' in alternating order on `--threads` threads (1 by default): on a shared
2-core machine two OpenMP threads per process made bit-identical computations differ by 0.57x-1.41x from run to
run (the two UNets give the same bf16 output, max rel diff 0: they run the same oneDNN kernels in the same order).
`--profile` prints torch.profiler's top operators of one step of each.

    python bench/models.py [--cache-dir /tmp/latentloom-bench] [--steps 3] [--threads 1] [--skip-load] [--skip-step]
        [--profile]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

log = logging.getLogger("bench.models")

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


def write_diffusers_config(folder: Path) -> Path:
    """The SD1.5 diffusers folder layout, configs only (no weights): what from_single_file reads instead
    of the Hub. The tokenizer files are made from the project's own shipped CLIP BPE vocabulary."""
    from diffusion.text.tokenizer import BOS_TOKEN, EOS_TOKEN, build_vocab, read_merges

    write_json(folder / "unet" / "config.json", SD15_UNET)
    write_json(folder / "vae" / "config.json", SD15_VAE)
    write_json(folder / "text_encoder" / "config.json", SD15_TEXT)
    write_json(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    merges = read_merges()
    vocab = build_vocab(merges)
    write_json(folder / "tokenizer" / "vocab.json", {token: i for i, token in enumerate(vocab)})
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    (folder / "tokenizer" / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    write_json(folder / "tokenizer" / "special_tokens_map.json", special)
    write_json(folder / "tokenizer" / "tokenizer_config.json",
               {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special})
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    })
    return folder


def ensure_random_checkpoint(cache: Path, family: str, name: str) -> Path:
    """A full-size random fp16 checkpoint of `family` (seed 0) at cache/name, written once (through a .partial
    file, so an interrupted write is never taken for a finished one)."""
    from diffusion.checkpoints.random_checkpoints import write_random_checkpoint

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / name
    if not path.exists():
        start = time.perf_counter()
        partial = path.with_suffix(".partial")
        write_random_checkpoint(partial, family, size="real", dtype=torch.float16, seed=0)
        partial.rename(path)
        log.info("wrote %s (%.1f GB) in %.1f s", path, path.stat().st_size / 1e9, time.perf_counter() - start)
    return path


def ensure_files(cache: Path) -> tuple[Path, Path]:
    """The full-size random SD1.5 file and the diffusers config folder that reads it."""
    path = ensure_random_checkpoint(cache, "sd1", "sd15-random-fp16.safetensors")
    return path, write_diffusers_config(cache / "sd15-diffusers-config")


# --- one load per fresh process ---------------------------------------------------------------------


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmHWM"].split()[0]) * 1024


def child_load(which: str, path: str, config: str) -> dict:
    """Runs in a fresh process: one load, then one read of every weight (our loader is lazy: the read is
    where its file pages come in), timed and measured."""
    if which == "ours":
        from diffusion.checkpoints.loader import load_checkpoint

        def load():
            c = load_checkpoint(path)
            return [c.unet, c.vae, *(e.model for e in c.text.encoders.values())]
    else:
        import diffusers  # noqa: F401  (imports are part of the baseline for both)
        from diffusers import StableDiffusionPipeline

        def load():
            pipe = StableDiffusionPipeline.from_single_file(
                path, config=config, local_files_only=True, safety_checker=None, torch_dtype=torch.float16
            )
            return [pipe.unet, pipe.vae, pipe.text_encoder]
    import transformers  # noqa: F401

    import diffusion.checkpoints.loader  # noqa: F401

    baseline = peak_rss()
    start = time.perf_counter()
    modules = load()
    loaded = time.perf_counter() - start
    touched = sum(float(p.max()) for m in modules for p in m.parameters())
    total = time.perf_counter() - start
    return {"load_s": loaded, "load_and_read_s": total, "baseline": baseline, "peak": peak_rss(), "check": touched}


def measure_load(which: str, path: Path, config: Path) -> dict:
    command = [sys.executable, __file__, "--child-load", which, str(path), str(config)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- UNet step time ---------------------------------------------------------------------------------


def child_step(dtype_name: str, path: str, config: str, steps: int, threads: int = 1, profile: bool = False) -> dict:
    from diffusers import UNet2DConditionModel

    from diffusion.checkpoints.loader import load_checkpoint

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    ours = load_checkpoint(path, dtype=dtype).unet
    theirs = UNet2DConditionModel.from_single_file(
        path, config=config, subfolder="unet", local_files_only=True, torch_dtype=dtype
    ).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen).to(dtype)
    t = torch.tensor([999.0, 500.0])
    context = (torch.randn(2, 77, 768, generator=gen) * 0.5).to(dtype)
    timings: dict[str, list[float]] = {"ours": [], "diffusers": []}
    outputs = {}
    calls = {"ours": lambda: ours(x, t, context),
             "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample}
    with torch.inference_mode():
        for r in range(steps + 1):  # the first round warms up; the order alternates (a machine's load drifts)
            for name in timings if r % 2 == 0 else list(reversed(timings)):
                start = time.perf_counter()
                outputs[name] = calls[name]()
                timings[name].append(time.perf_counter() - start)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            for name, call in calls.items():
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    call()
                print(f"{name} {dtype_name}, one step:\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10), file=sys.stderr)
    a, b = outputs["ours"].float(), outputs["diffusers"].float()
    rel = float((a - b).abs().max() / b.abs().max())
    median = {name: statistics.median(values[1:]) for name, values in timings.items()}
    return {"ours_s": median["ours"], "diffusers_s": median["diffusers"], "max_rel_diff": rel,
            "finite": bool(torch.isfinite(a).all())}


def measure_step(dtype_name: str, path: Path, config: Path, steps: int, threads: int, profile: bool) -> dict:
    command = [sys.executable, __file__, "--child-step", dtype_name, str(path), str(config), str(steps),
               "--threads", str(threads), *(["--profile"] if profile else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if profile:
        log.info("%s", "\n".join(line for line in out.stderr.splitlines() if "one step" in line or "aten::" in line))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/latentloom-bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="threads of the step measurement")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top operators of one step each")
    parser.add_argument("--child-load", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-step", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        print(json.dumps(child_load(*args.child_load)))
        return
    if args.child_step:
        dtype_name, path, config, steps = args.child_step
        print(json.dumps(child_step(dtype_name, path, config, int(steps), args.threads, args.profile)))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, config = ensure_files(args.cache_dir)
    size = path.stat().st_size
    log.info("checkpoint: %s, %.2f GB fp16 (random SD1.5, real layout)", path, size / 1e9)
    if not args.skip_load:
        results = {which: measure_load(which, path, config) for which in ("ours", "diffusers")}
        for which, r in results.items():
            growth = r["peak"] - r["baseline"]
            log.info("load %-9s %6.2f s (%6.2f s incl. reading every weight); peak RSS +%.2f GB = %.2fx file",
                     which, r["load_s"], r["load_and_read_s"], growth / 1e9, growth / size)
        ours, theirs = results["ours"], results["diffusers"]
        log.info("load time ratio ours/diffusers: %.3f (lazy), %.3f (incl. reading every weight); target <= 0.5",
                 ours["load_s"] / theirs["load_s"], ours["load_and_read_s"] / theirs["load_and_read_s"])
    if not args.skip_step:
        for dtype_name in ("float32", "bfloat16"):
            with open("/proc/loadavg") as f:
                load = " ".join(f.read().split()[:3])
            r = measure_step(dtype_name, path, config, args.steps, args.threads, args.profile)
            log.info("UNet step %-8s (%d thread(s), load %s) ours %.3f s, diffusers %.3f s, ratio %.3f "
                     "(target <= 0.7), max rel diff %.1e%s", dtype_name, args.threads, load, r["ours_s"],
                     r["diffusers_s"], r["ours_s"] / r["diffusers_s"], r["max_rel_diff"],
                     "" if r["finite"] else " (non-finite output!)")


if __name__ == "__main__":
    main()
