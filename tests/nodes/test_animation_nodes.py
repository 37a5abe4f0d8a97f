from __future__ import annotations

import json
import threading

import pytest
import torch
from PIL import Image

from graph.executor import ExecutionContext
from nodes.animation import (
    LatentBatchSeedBehavior,
    PromptSchedule,
    SaveAnimatedPNG,
    SaveAnimatedWEBP,
    frame_weights,
    parse_schedule,
)
from nodes.loaders import load_checkpoint_handles


def test_parse_schedule():
    assert parse_schedule("0: a red circle\n\n# comment\n 10 : a blue star ") == [(0, "a red circle"),
                                                                                  (10, "a blue star")]
    with pytest.raises(ValueError, match="line 2"):
        parse_schedule("0: ok\nnot a keyframe")
    with pytest.raises(ValueError, match="empty"):
        parse_schedule("  \n")


def test_frame_weights_linear_and_eased():
    values = [0.0, 1.0]  # what each keyframe contributes, to read the mixture off

    def mixed(weights):
        return [round(values[b] * (1 - t) + values[a] * t, 3) for b, a, t in weights]

    weights = frame_weights([0, 4], 6, "linear")
    assert mixed(weights) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert weights[2][:2] == (0, 1) and weights[5][:2] == (1, 1)
    eased = frame_weights([0, 4], 5, "ease_in_out")
    assert eased[1][2] < 0.25 and eased[2][2] == pytest.approx(0.5)
    assert frame_weights([3], 3, "linear") == [(0, 0, 0.0)] * 3


def test_prompt_schedule_travels_between_keyframes(engine):
    _, clip, _ = load_checkpoint_handles(engine.env, "sd1.safetensors")
    (cond,) = PromptSchedule().execute(clip, "0: a red circle\n4: a long prompt about a blue star " * 1, 5,
                                       "linear")
    tensor, options = cond[0]
    first, _ = clip.encode("a red circle")
    last, last_pooled = clip.encode("a long prompt about a blue star")
    assert tensor.shape == (5, 77, first.shape[-1]) and options["pooled_output"].shape[0] == 5
    torch.testing.assert_close(tensor[0:1], first)
    torch.testing.assert_close(tensor[4:5], last)
    torch.testing.assert_close(tensor[2:3], (first + last) / 2)
    torch.testing.assert_close(options["pooled_output"][4:5], last_pooled)


def test_prompt_schedule_batch_samples_end_to_end(engine):
    from tests.nodes.test_sd_nodes import txt2img

    prompt = txt2img(batch=3)
    prompt["70"] = {"class_type": "PromptSchedule", "inputs": {"clip": ["4", 1], "frames": 3, "curve": "linear",
                                                               "schedule": "0: a red circle\n2: a blue star"}}
    prompt["71"] = {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["5", 0],
                                                                        "seed_behavior": "fixed"}}
    prompt["3"]["inputs"].update(positive=["70", 0], latent_image=["71", 0])
    prompt["9"] = {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["8", 0], "filename_prefix": "anim",
                                                                "fps": 4.0, "lossless": False, "quality": 70,
                                                                "method": "fastest"}}
    result = engine.run(prompt)
    item = result.outputs["9"]["images"][0]
    webp = Image.open(engine.env.output_dir / item["filename"])
    assert webp.n_frames == 3 and webp.size == (64, 64) and result.outputs["9"]["animated"] == [True]


def test_seed_behavior():
    latent = {"samples": torch.zeros(3, 4, 2, 2), "batch_index": [5, 6, 7]}
    assert LatentBatchSeedBehavior().execute(latent, "fixed")[0]["batch_index"] == [5, 5, 5]
    assert "batch_index" not in LatentBatchSeedBehavior().execute(latent, "random")[0]


@pytest.fixture
def ctx(tmp_path):
    from nodes.environment import Environment

    env = Environment(tmp_path)
    env.ensure_dirs()
    return ExecutionContext("p", "1", env, {}, lambda e, d: None, threading.Event())


def frames(n=4):
    return torch.stack([torch.full((8, 8, 3), i / n) for i in range(n)])


def test_save_animated_webp_and_png(ctx):
    prompt, workflow = {"1": {"class_type": "X"}}, {"nodes": []}
    out = SaveAnimatedWEBP().execute(frames(), "clips/a", 10.0, True, 80, "default", 2, prompt,
                                     {"workflow": workflow}, ctx)
    item = out.ui["images"][0]
    assert item == {"filename": "a_00001_.webp", "subfolder": "clips", "type": "output"}
    webp = Image.open(ctx.env.output_dir / "clips" / item["filename"])
    assert webp.n_frames == 4 and webp.info["loop"] == 2
    exif = webp.getexif()
    assert json.loads(exif[0x0110].removeprefix("prompt:")) == prompt
    assert json.loads(exif[0x010F].removeprefix("workflow:")) == workflow
    out = SaveAnimatedPNG().execute(frames(3), "a", 5.0, 4, 0, prompt, {"workflow": workflow}, ctx)
    png = Image.open(ctx.env.output_dir / out.ui["images"][0]["filename"])
    assert png.n_frames == 3 and json.loads(png.text["workflow"]) == workflow and png.info["loop"] == 0
    png.seek(1)
    assert png.info["duration"] == 200
    second = SaveAnimatedPNG().execute(frames(2), "a", 5.0, 4, 0, None, None, ctx)
    assert second.ui["images"][0]["filename"] == "a_00002_.png"
    with pytest.raises(ValueError, match="outside the output folder"):
        SaveAnimatedWEBP().execute(frames(), "../x", 10.0, True, 80, "default", 0, None, None, ctx)
