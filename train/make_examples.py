"""Make the files the shipped workflows need on a fresh clone, with the project's own model and code.

- `examples/input/example.png` (img2img, inpaint, outpaint): the default workflow (workflows/txt2img.json)
  run through our own CLI on the shipped checkpoint with a fixed seed, then given a transparent square at
  the bottom right, where a small shape would sit: LoadImage turns alpha into the inpainting mask.
- `models/loras/latentloom-shapes-new-colour.safetensors` (workflows/lora.json): the five-image LoRA of
  bench/quality.py's recipe (TrainLoraFromImages, five orange shapes from `shapes.draw_sample(7, "train", i,
  "orange")`, 300 steps, rank 8, lr 5e-3, seed 0), trained in a workflow run by the same CLI. Orange never
  appears in the base model's training data, so the LoRA teaches it a colour.
- `docs/examples/controlnet-N-{hint,with,without}.png` (README's ControlNet pictures, not needed by a workflow):
  workflows/controlnet.json on three held-out samples of bench/quality.py's ControlNet row (their silhouettes as
  hints, their captions without the position as prompts, so that only the hint says where, seed 42), with the
  ControlNet and at strength 0.

    OMP_NUM_THREADS=1 python -m train.make_examples [--only image|lora|controlnet] [--seed 42] [--lora-steps 300]

Everything runs in a scratch data directory; only the files above are written into the repository.
Deterministic for a given machine and thread count (the seeds are fixed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import shapes

log = logging.getLogger("train.make_examples")

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = "latentloom-shapes.safetensors"
EXAMPLE_IMAGE = REPO / "examples" / "input" / "example.png"
LORA_FILE = REPO / "models" / "loras" / "latentloom-shapes-new-colour.safetensors"
# The inpainting hole: rows and columns [40, 60) of the 64x64 image, the "bottom right" cell of shapes.POSITIONS.
HOLE = (slice(40, 60), slice(40, 60))
LORA_DATA_SEED = 7  # bench/quality.py's lora_effect draws its five training images with this seed
CONTROLNET_HINT_SEED = 2  # bench/quality.py's controlnet_effect draws its held-out hints with this seed
DOCS = REPO / "docs" / "examples"


def run_cli(data_dir: Path, workflow: Path, *extra: str) -> list[Path]:
    """`latentloom --data-dir DATA run WORKFLOW ...` in a child process; the files its output nodes wrote."""
    output = data_dir / "output"
    args = [sys.executable, "-m", "server.cli", "--data-dir", str(data_dir), "run", str(workflow),
            "--output", str(output), *extra]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise SystemExit(f"{workflow.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    named = [Path(line.split(": ", 1)[1]) for line in proc.stdout.splitlines() if ": " in line]
    return [path for path in named if path.is_file()]


def with_hole(rgb: np.ndarray) -> Image.Image:
    """The image as RGBA, opaque but for HOLE (alpha 0): the region the inpaint workflow repaints."""
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, dtype=np.uint8)], axis=-1)
    rgba[(*HOLE, 3)] = 0
    return Image.fromarray(rgba, "RGBA")


def make_image(scratch: Path, seed: int) -> Path:
    files = run_cli(scratch, REPO / "workflows" / "txt2img.json", "--set", f"3.seed={seed}")
    if len(files) != 1:
        raise SystemExit(f"txt2img wrote {len(files)} files, expected one")
    with Image.open(files[0]) as image:
        rgb = np.asarray(image.convert("RGB"))
    EXAMPLE_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    with_hole(rgb).save(EXAMPLE_IMAGE, optimize=True)  # no text chunks: a plain picture, not a workflow
    log.info("wrote %s (%dx%d, txt2img seed %d, transparent rows/columns 40..59)",
             EXAMPLE_IMAGE.relative_to(REPO), rgb.shape[1], rgb.shape[0], seed)
    return EXAMPLE_IMAGE


def lora_prompt(captions: list[str], steps: int, lr: float, name: str) -> dict:
    """The API-format workflow: the checkpoint, five LoadImage nodes batched, TrainLoraFromImages."""
    prompt: dict = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}
    batch: list = ["200", 0]
    for i in range(len(captions)):
        prompt[f"20{i}"] = {"class_type": "LoadImage", "inputs": {"image": f"lora-{i}.png"}}
        if i:
            prompt[f"21{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"20{i}", 0]}}
            batch = [f"21{i}", 0]
    prompt["30"] = {"class_type": "TrainLoraFromImages", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2], "images": batch, "captions": "\n".join(captions),
        "steps": steps, "rank": 8, "learning_rate": lr, "seed": 0, "lora_name": name}}
    return prompt


def make_lora(scratch: Path, steps: int, lr: float) -> Path:
    samples = [shapes.draw_sample(LORA_DATA_SEED, "train", i, shapes.NEW_COLOUR) for i in range(5)]
    (scratch / "input").mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        Image.fromarray(shapes.render(sample)).save(scratch / "input" / f"lora-{i}.png")
    workflow = scratch / "train-lora.json"
    workflow.write_text(json.dumps(lora_prompt([s.caption for s in samples], steps, lr, LORA_FILE.name), indent=1))
    run_cli(scratch, workflow)
    LORA_FILE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(scratch / "models" / "loras" / LORA_FILE.name, LORA_FILE)
    log.info("wrote %s (%.0f kB) from: %s", LORA_FILE.relative_to(REPO), LORA_FILE.stat().st_size / 1024,
             "; ".join(s.caption for s in samples))
    return LORA_FILE


def without_position(caption: str) -> str:
    """"a small red circle at the left on a green background" -> "a small red circle on a green background"."""
    return re.sub(r" (at|in) the [a-z ]+? on a ", " on a ", caption)


def make_controlnet_examples(scratch: Path, seed: int, count: int = 3) -> list[Path]:
    from .train_controlnet import silhouette

    (scratch / "input").mkdir(parents=True, exist_ok=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        sample = shapes.draw_sample(CONTROLNET_HINT_SEED, "test", i)
        hint = DOCS / f"controlnet-{i}-hint.png"
        Image.fromarray(silhouette(sample)).save(hint, optimize=True)
        shutil.copyfile(hint, scratch / "input" / hint.name)
        for label, strength in (("with", 1.0), ("without", 0.0)):
            files = run_cli(scratch, REPO / "workflows" / "controlnet.json", "--set", f"11.image={hint.name}",
                            "--set", f"6.text={without_position(sample.caption)}", "--set", f"12.strength={strength}",
                            "--set", f"3.seed={seed}")
            target = DOCS / f"controlnet-{i}-{label}.png"
            with Image.open(files[0]) as image:
                image.convert("RGB").save(target, optimize=True)  # the picture without the workflow chunks
            written.append(target)
        log.info("wrote %s and its results for %r", hint.relative_to(REPO), without_position(sample.caption))
    return written


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("image", "lora", "controlnet"), default=None)
    parser.add_argument("--seed", type=int, default=42, help="txt2img seed of the example image")
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--lora-lr", type=float, default=5e-3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="latentloom-examples-") as tmp:
        if args.only in (None, "image"):
            make_image(Path(tmp) / "image", args.seed)
        if args.only in (None, "lora"):
            make_lora(Path(tmp) / "lora", args.lora_steps, args.lora_lr)
        if args.only in (None, "controlnet"):
            make_controlnet_examples(Path(tmp) / "controlnet", args.seed)


if __name__ == "__main__":
    main()
