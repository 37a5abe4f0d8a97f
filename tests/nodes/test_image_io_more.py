"""LoadImageOutput, MaskPreview and SaveImageWebsocket through validation and the executor (the WebSocket frames
themselves: tests/server/test_websocket_images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment


@pytest.fixture
def setup(tmp_path):
    env = Environment(tmp_path)
    env.ensure_dirs()
    return env, build_registry(env, plugins=False), Executor(env=env)


def run(setup, prompt):
    env, registry, executor = setup
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    events = []
    result = executor.execute(validation.prompt, "p", lambda event, data: events.append((event, data)))
    assert result.status == "success", result.error
    return result, events


def test_load_image_output_reads_the_output_folder(setup):
    env, registry, _ = setup
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 255
    pixels[0, 0, 3] = 0
    (env.output_dir / "runs").mkdir()
    Image.fromarray(pixels, "RGBA").save(env.output_dir / "runs" / "shot_00001_.png")
    Image.fromarray(pixels[..., :3]).save(env.input_dir / "elsewhere.png")
    options = registry.get("LoadImageOutput").info(env)["input"]["required"]["image"][0]
    assert options == ["runs/shot_00001_.png [output]"]  # the input folder's images are not offered
    prompt = {"1": {"class_type": "LoadImageOutput", "inputs": {"image": "runs/shot_00001_.png [output]"}},
              "2": {"class_type": "MaskPreview", "inputs": {"mask": ["1", 1]}}}
    result, _ = run(setup, prompt)
    preview = result.outputs["2"]["images"][0]
    assert preview["type"] == "temp"
    shown = np.asarray(Image.open(env.temp_dir / preview["subfolder"] / preview["filename"]).convert("RGB"))
    assert shown.shape == (4, 6, 3)
    assert shown[0, 0].tolist() == [255, 255, 255] and shown[1, 1].tolist() == [0, 0, 0]  # mask = 1 − alpha


def test_load_image_output_refuses_names_outside_the_list(setup):
    env, registry, _ = setup
    Image.new("RGB", (2, 2)).save(env.input_dir / "in.png")
    for name in ("in.png", "../input/in.png [output]", "missing.png [output]"):
        validation = validate_prompt({"1": {"class_type": "LoadImageOutput", "inputs": {"image": name}},
                                      "2": {"class_type": "MaskPreview", "inputs": {"mask": ["1", 1]}}},
                                     registry, env)
        assert not validation.ok
        assert validation.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"


def test_load_image_output_refingerprints_a_changed_file(setup):
    env, registry, _ = setup
    path = env.output_dir / "a.png"
    Image.new("RGB", (2, 2), (10, 20, 30)).save(path)
    cls = registry.get("LoadImageOutput")
    before = cls.fingerprint({"image": "a.png [output]"}, env)
    Image.new("RGB", (2, 2), (11, 20, 30)).save(path)
    assert cls.fingerprint({"image": "a.png [output]"}, env) != before
    assert cls.validate_inputs({"image": "a.png [output]"}, env) is None


def test_mask_preview_takes_a_single_mask_too(setup):
    env, registry, _ = setup
    node = registry.get("MaskPreview")()

    class Context:
        pass

    context = Context()
    context.env = env
    ui = node.execute(torch.full((3, 5), 0.5), context=context).ui
    saved = np.asarray(Image.open(env.temp_dir / ui["images"][0]["filename"]))
    assert saved.shape == (3, 5, 3) and (saved == 128).all()


def test_save_image_websocket_reports_each_image_as_a_full_size_png_preview_every_run(setup):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 700, "height": 3, "batch_size": 2,
                                                           "color": 0x336699}},
              "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    for _ in range(2):  # a second run sends the images again (its output is never cached)
        result, events = run(setup, prompt)
        assert "2" not in result.outputs  # no ui: no `executed` event, no file
        previews = [d["image"] for e, d in events if e == "preview"]
        progress = [(d["value"], d["max"]) for e, d in events if e == "progress"]
        assert progress == [(1, 2), (2, 2)]
        assert [(kind, limit) for kind, _, limit in previews] == [("PNG", None), ("PNG", None)]
        assert previews[0][1].size == (700, 3) and previews[0][1].getpixel((0, 0)) == (0x33, 0x66, 0x99)
    env = setup[0]
    assert not any(env.output_dir.iterdir()) and not any(env.temp_dir.iterdir())
