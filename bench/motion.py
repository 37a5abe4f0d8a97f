"""Motion quality of the demo motion module: does the shape move the way the caption says, and stay itself?

Clips are made the way a user makes them: API-format workflows run by the engine (CheckpointLoaderSimple ->
LoraLoaderModelOnly with the module's cross-attention adapter -> ADE_AnimateDiffLoaderGen1 with the shipped module
and beta_schedule "use existing" -> KSampler 20 steps cfg 5
euler/normal over an EmptyLatentImage batch of 16 frames -> VAEDecode -> SaveImage), read back from the saved
PNGs. The captions are those of held-out clips (train/motion_data.py, split "test": (shape, colour, background)
combinations neither the image model nor the motion module was trained on), such as "a cyan star on a black
background moving to the top"; the seed of clip i is i. The same prompts and seeds without the module and without
the adapter (the plain demo model, frames denoised independently) are the baseline.

Per clip:
- direction: the least-squares line through the frames' shape centroids (train/checker.py's segmentation) covers
  at least 8 pixels along the named axis, in the named sense, and twice as much as across it
  (motion_data.motion_of);
- colour / shape constant: the share of frames after the first whose checker colour / checker shape equals the
  first frame's (the checker's shape CNN trained with this model's VAE round trip, as bench/quality.py does);
- colour as captioned: the share of all frames whose checker colour is the caption's.

    python bench/motion.py [--count 100] [--first 0] [--frames 16] [--steps 20] [--cfg 5.0] [--threads 1]
                           [--skip-baseline] [--only-baseline] [--checker-cache FILE]
                           [--motion models/animatediff_models/latentloom-shapes-motion.safetensors]
                           [--lora models/loras/latentloom-shapes-motion-adapter.safetensors | --no-lora]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from train import motion_data
from train.checker import Checker, classify_colour

log = logging.getLogger("bench.motion")

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "checkpoints" / "latentloom-shapes.safetensors"
MOTION = REPO / "models" / "animatediff_models" / "latentloom-shapes-motion.safetensors"
ADAPTER = REPO / "models" / "loras" / "latentloom-shapes-motion-adapter.safetensors"


class VideoRunner:
    """An engine over a scratch data directory that also sees the given checkpoint's, module's and adapter's
    folders (adapter None: the module alone)."""

    def __init__(self, data_dir: Path, checkpoint: Path = MODEL, motion: Path = MOTION,
                 adapter: Path | None = ADAPTER):
        self.model, self.motion = checkpoint.name, motion.name
        self.adapter = None if adapter is None else adapter.name
        extra = {"checkpoints": [checkpoint.parent], "animatediff_models": [motion.parent]}
        if adapter is not None:
            extra["loras"] = [adapter.parent]
        self.env = Environment(data_dir, extra_model_dirs=extra)
        self.env.ensure_dirs()
        self.registry = build_registry(self.env, plugins=False)
        self.executor = Executor(env=self.env)

    def run(self, prompt: dict) -> dict:
        validation = validate_prompt(prompt, self.registry, self.env)
        if not validation.ok:
            raise RuntimeError(f"invalid workflow: {validation.response()}")
        result = self.executor.execute(validation.prompt, "bench", lambda event, data: None)
        if result.status != "success":
            raise RuntimeError(f"workflow failed: {result.error}")
        return result.outputs

    def clip(self, caption: str, seed: int, frames: int, steps: int = 20, cfg: float = 5.0, motion: bool = True,
             context: tuple[int, int] | None = None) -> np.ndarray:
        """The frames [F, 64, 64, 3] uint8 of one txt2vid run; `context` = (length, overlap) adds uniform context
        windows (ADE_StandardUniformContextOptions, stride 1, pyramid fuse). Without the motion module the
        adapter is left out too: the plain image model on every frame."""
        prompt = video_prompt(self.model, self.motion if motion else None, caption, seed, frames, steps, cfg, context,
                              adapter=self.adapter if motion else None)
        saved = self.run(prompt)["9"]["images"]
        return np.stack([np.asarray(Image.open(self.env.output_dir / s.get("subfolder", "") / s["filename"])
                                    .convert("RGB")) for s in saved])


def video_prompt(ckpt: str, motion: str | None, caption: str, seed: int, frames: int, steps: int = 20,
                 cfg: float = 5.0, context: tuple[int, int] | None = None, negative: str = "",
                 adapter: str | None = None) -> dict:
    """The API-format txt2vid workflow (motion None: the plain image model on every frame; adapter: a LoRA
    applied to the model before the module, as workflows/video.json does)."""
    model = ["4", 0]
    prompt: dict = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if adapter is not None:
        prompt["22"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": adapter, "strength_model": 1.0}}
        model = ["22", 0]
    if motion is not None:
        prompt["20"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
            "model": model, "model_name": motion, "beta_schedule": "use existing"}}
        model = ["20", 0]
        if context is not None:
            prompt["21"] = {"class_type": "ADE_StandardUniformContextOptions", "inputs": {
                "context_length": context[0], "context_stride": 1, "context_overlap": context[1],
                "fuse_method": "pyramid"}}
            prompt["20"]["inputs"]["context_options"] = ["21", 0]
    prompt.update({
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": frames}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "motion"}},
    })
    return prompt


def judge_clip(checker: Checker, frames: np.ndarray, clip: motion_data.Clip) -> dict[str, float]:
    """Direction (0/1), colour and shape agreement with the first frame, colour as captioned (shares)."""
    direction, _ = motion_data.motion_of(frames)
    colours = [classify_colour(f) for f in frames]
    found = checker.shapes_of(list(frames))
    rest = max(len(frames) - 1, 1)
    return {"direction": float(direction == clip.direction),
            "colour": sum(c == colours[0] for c in colours[1:]) / rest,
            "shape": sum(s == found[0] for s in found[1:]) / rest,
            "captioned": sum(c == clip.colour for c in colours) / len(frames)}


def motion_row(runner: VideoRunner, checker: Checker, clips: list[motion_data.Clip], args: argparse.Namespace,
               motion: bool) -> dict[str, float]:
    start, totals = time.perf_counter(), {}
    for seed, clip in enumerate(clips, start=args.first):
        frames = runner.clip(clip.caption, seed, args.frames, args.steps, args.cfg, motion)
        for key, value in judge_clip(checker, frames, clip).items():
            totals[key] = totals.get(key, 0.0) + value
    scores = {k: v / len(clips) for k, v in totals.items()}
    label = ("with the module + adapter" if runner.adapter else "with the motion module") if motion else \
        "without (frames independent)"
    log.info("%-30s direction %5.1f %%  colour constant %5.1f %%  shape constant %5.1f %%  colour as captioned "
             "%5.1f %%  (%d clips, %.0f s)", label, 100 * scores["direction"], 100 * scores["colour"],
             100 * scores["shape"], 100 * scores["captioned"], len(clips), time.perf_counter() - start)
    return scores


def trained_checker(runner: VideoRunner, cache: Path | None = None) -> Checker:
    """bench/quality.py's checker: its shape CNN half trained on this model's VAE round trips (minutes on a loaded
    CPU). With `cache`, its weights are read from that file when it exists and written there when they are trained,
    so the parts of a row split over processes train it once."""
    from nodes.loaders import load_checkpoint_handles
    from train.checker import ShapeNet

    if cache is not None and cache.is_file():
        net = ShapeNet(16)
        net.load_state_dict(torch.load(cache, weights_only=True))
        return Checker(net.eval())

    _, _, vae = load_checkpoint_handles(runner.env, runner.model)

    def round_trip(images: np.ndarray) -> np.ndarray:
        decoded = vae.decode(vae.encode(torch.from_numpy(images).float() / 255.0))
        return (decoded * 255.0).round().clamp(0, 255).byte().numpy()

    checker = Checker.train(seed=0, reconstruct=round_trip)
    if cache is not None:
        torch.save(checker.net.state_dict(), cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)  # a reader never sees half a file
    return checker


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("graph", "nodes", "diffusion"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--first", type=int, default=0, help="first clip index (to split a row over processes)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=MODEL)
    parser.add_argument("--motion", type=Path, default=MOTION)
    parser.add_argument("--lora", type=Path, default=ADAPTER, help="the module's cross-attention adapter")
    parser.add_argument("--no-lora", action="store_true", help="the module without its adapter")
    parser.add_argument("--checker-cache", type=Path, default=None,
                        help="read the trained checker from this file, or train it and write it there")
    parser.add_argument("--skip-baseline", action="store_true", help="only the row with the module")
    parser.add_argument("--only-baseline", action="store_true", help="only the row without the module")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = None if args.no_lora else args.lora
    for path in (args.checkpoint, args.motion, *([adapter] if adapter else [])):
        if not path.is_file():
            raise SystemExit(f"{path} is missing")
    clips = motion_data.clips(0, "test", range(args.first, args.first + args.count), args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        runner = VideoRunner(Path(tmp), args.checkpoint, args.motion, adapter)
        checker = trained_checker(runner, args.checker_cache)
        log.info("%d held-out clips of %d frames, %d steps, cfg %.1f", len(clips), args.frames, args.steps, args.cfg)
        if not args.only_baseline:
            motion_row(runner, checker, clips, args, motion=True)
        if not args.skip_baseline:
            motion_row(runner, checker, clips, args, motion=False)


if __name__ == "__main__":
    main()
