"""Animation: prompt travel over a batch of frames, and saving a batch as an animated WebP or PNG.

A prompt schedule names keyframes, one per line, `frame: prompt`:

    0: a red circle on a white background
    12: a blue circle on a white background

Each keyframe prompt is encoded once; frame f's conditioning interpolates between the keyframes around it,
so a batch sampled with shared noise (LatentBatchSeedBehavior "fixed") morphs from one prompt to the next.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch
from PIL import Image

from graph.node import Boolean, Combo, Float, Int, Node, NodeOutput, Output, Socket, String
from graph.types import CLIP, CONDITIONING, IMAGE, LATENT
from nodes.environment import embedding_file_names
from nodes.image_io import next_counter, output_folder, png_metadata

KEYFRAME = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")
CURVES = ["linear", "ease_in_out"]


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """Keyframes sorted by frame; a line that is not `frame: prompt` is an error naming the line."""
    keyframes: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = KEYFRAME.match(line)
        if match is None:
            raise ValueError(f"prompt schedule line {number}: expected 'frame: prompt', got {line.strip()!r}")
        keyframes[int(match.group(1))] = match.group(2)
    if not keyframes:
        raise ValueError("prompt schedule is empty: give at least one 'frame: prompt' line")
    return sorted(keyframes.items())


def frame_weights(keyframes: list[int], frames: int, curve: str) -> list[tuple[int, int, float]]:
    """For each frame: (index of the keyframe before, index of the one after, weight of the one after)."""
    out = []
    for f in range(frames):
        after = next((i for i, k in enumerate(keyframes) if k >= f), len(keyframes) - 1)
        before = max(0, after - 1) if keyframes[after] > f else after
        span = keyframes[after] - keyframes[before]
        t = 0.0 if span <= 0 else min(1.0, max(0.0, (f - keyframes[before]) / span))
        if curve == "ease_in_out":
            t = (1 - math.cos(math.pi * t)) / 2
        out.append((before, after, t))
    return out


def _match_tokens(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat each [1, T, dim] along tokens to the least common multiple length (attention is unchanged)."""
    target = math.lcm(*(t.shape[1] for t in tensors))
    return [t.repeat(1, target // t.shape[1], 1) for t in tensors]


class PromptSchedule(Node):
    display_name = "Prompt Schedule (Prompt Travel)"
    category = "conditioning/animation"
    description = "Conditioning for a batch of frames that travels between keyframed prompts."
    inputs = [Socket("clip", CLIP),
              String("schedule", default="0: a red circle\n15: a blue circle", multiline=True,
                     tooltip="One keyframe per line: 'frame: prompt'. Frames count from 0."),
              Int("frames", default=16, min=1, max=4096, tooltip="Number of frames; match the latent batch."),
              Combo("curve", CURVES, tooltip="How frames between keyframes move from one prompt to the next.")]
    outputs = [Output(CONDITIONING)]

    def execute(self, clip, schedule, frames, curve):
        keyframes = parse_schedule(schedule)
        with embedding_file_names(clip):
            encoded = [clip.encode(prompt) for _, prompt in keyframes]
        conds = _match_tokens([cond for cond, _ in encoded])
        pooled = [p for _, p in encoded]
        rows, pooled_rows = [], []
        for before, after, t in frame_weights([k for k, _ in keyframes], frames, curve):
            rows.append(conds[before] * (1 - t) + conds[after] * t)
            pooled_rows.append(pooled[before] * (1 - t) + pooled[after] * t)
        return ([(torch.cat(rows), {"pooled_output": torch.cat(pooled_rows)})],)


class LatentBatchSeedBehavior(Node):
    category = "latent/advanced"
    description = "'fixed' gives every image of the batch the same noise (for animations); 'random' its own."
    inputs = [Socket("samples", LATENT), Combo("seed_behavior", ["random", "fixed"], default="fixed")]
    outputs = [Output(LATENT)]

    def execute(self, samples, seed_behavior):
        out = dict(samples)
        count = samples["samples"].shape[0]
        if seed_behavior == "fixed":
            first = samples.get("batch_index", [0])[0]
            out["batch_index"] = [first] * count
        else:
            out.pop("batch_index", None)
        return (out,)


def _frames(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def _output_target(context: Any, filename_prefix: str, extension: str) -> tuple[Any, str, str]:
    """(folder, file name, subfolder) for the next file of this prefix in the output folder."""
    folder, name, subfolder = output_folder(context.env.output_dir, filename_prefix, "output")
    return folder, f"{name}_{next_counter(folder, name, extension):05}_.{extension}", subfolder


_ANIMATION_HIDDEN = ("prompt", "extra_pnginfo", "context")


def _fps() -> Float:
    return Float("fps", default=6.0, min=0.01, max=1000.0, step=0.01)


def _loop() -> Int:
    return Int("loop", default=0, min=0, max=65535, optional=True, tooltip="Times to play; 0 loops forever.")


class SaveAnimatedWEBP(Node):
    category = "image/animation"
    output_node = True
    hidden = _ANIMATION_HIDDEN
    inputs = [Socket("images", IMAGE), String("filename_prefix", default="ComfyUI"), _fps(),
              Boolean("lossless", default=True), Int("quality", default=80, min=0, max=100, step=None),
              Combo("method", ["default", "fastest", "slowest"]), _loop()]
    outputs = []

    def execute(self, images, filename_prefix, fps, lossless, quality, method, loop=0, prompt=None,
                extra_pnginfo=None, context=None):
        folder, file, subfolder = _output_target(context, filename_prefix, "webp")
        exif = Image.Exif()
        if prompt is not None:  # where ComfyUI keeps them in WebP files: the EXIF Make/Model tags
            exif[0x0110] = "prompt:" + json.dumps(prompt)
        if isinstance(extra_pnginfo, dict) and "workflow" in extra_pnginfo:
            exif[0x010F] = "workflow:" + json.dumps(extra_pnginfo["workflow"])
        frames = _frames(images)
        frames[0].save(folder / file, save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=loop, lossless=lossless, quality=quality,
                       method={"default": 4, "fastest": 0, "slowest": 6}[method], exif=exif)
        return NodeOutput(ui={"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                              "animated": [len(frames) > 1]})


class SaveAnimatedPNG(Node):
    category = "image/animation"
    output_node = True
    hidden = _ANIMATION_HIDDEN
    inputs = [Socket("images", IMAGE), String("filename_prefix", default="ComfyUI"), _fps(),
              Int("compress_level", default=4, min=0, max=9, step=None), _loop()]
    outputs = []

    def execute(self, images, filename_prefix, fps, compress_level, loop=0, prompt=None, extra_pnginfo=None,
                context=None):
        folder, file, subfolder = _output_target(context, filename_prefix, "png")
        frames = _frames(images)
        frames[0].save(folder / file, save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=loop, compress_level=compress_level, pnginfo=png_metadata(prompt, extra_pnginfo))
        return NodeOutput(ui={"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                              "animated": [len(frames) > 1]})


NODE_CLASSES = [PromptSchedule, LatentBatchSeedBehavior, SaveAnimatedWEBP, SaveAnimatedPNG]
