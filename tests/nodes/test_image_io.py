from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from graph.executor import ExecutionContext
from nodes.environment import Environment, list_files
from nodes.image_io import (
    IMAGE_EXTENSIONS,
    LoadImage,
    LoadImageMask,
    PreviewImage,
    SaveImage,
    list_input_images,
    next_counter,
)
from nodes.model_paths import bundled_inputs_dir


@pytest.fixture
def env(tmp_path):
    environment = Environment(tmp_path)
    environment.ensure_dirs()
    return environment


def ctx(env):
    return ExecutionContext("p", "1", env, {}, lambda e, d: None, threading.Event())


def test_load_rgba_gives_image_and_inverted_alpha_mask(env):
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(env.input_dir / "a.png")
    image, mask = LoadImage().execute("a.png", ctx(env))
    assert image.shape == (1, 6, 5, 3) and image.dtype == torch.float32
    assert torch.all(image[..., 0] == 1) and torch.all(image[..., 1:] == 0)
    assert mask.shape == (1, 6, 5) and mask[0, 0, 0] == 1 and mask.sum() == 1


def test_load_without_alpha_and_multiframe(env):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(env.input_dir / "b.jpg")
    image, mask = LoadImage().execute("b.jpg", ctx(env))
    assert image.shape == (1, 8, 8, 3) and mask.shape == (1, 64, 64) and mask.sum() == 0
    frames = [Image.new("RGB", (4, 4), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(env.input_dir / "anim.gif", save_all=True, append_images=frames[1:])
    image, mask = LoadImage().execute("anim.gif", ctx(env))
    assert image.shape[0] == 3 and mask.shape[0] == 3
    (env.input_dir / "notes.txt").write_text("not listed")
    shipped = list_files(bundled_inputs_dir(), IMAGE_EXTENSIONS, recursive=False)  # the repository's examples
    assert "example.png" in shipped and list_input_images(env) == sorted({"anim.gif", "b.jpg", *shipped})


def test_fingerprint_follows_file_content(env):
    path = env.input_dir / "c.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    first = LoadImage.fingerprint({"image": "c.png"}, env)
    assert LoadImage.fingerprint({"image": "c.png"}, env) == first
    Image.new("RGB", (4, 4), (9, 2, 3)).save(path)
    assert LoadImage.fingerprint({"image": "c.png"}, env) != first


@pytest.mark.parametrize("name", ["missing.png", "../secret.png", "/etc/passwd"])
def test_validation_refuses_missing_and_traversal(env, name):
    reason = LoadImage.validate_inputs({"image": name}, env)
    assert reason is not None and "Invalid image file" in reason


def test_not_an_image_and_decompression_bomb(env):
    (env.input_dir / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        LoadImage().execute("x.png", ctx(env))
    Image.new("1", (20000, 20000)).save(env.input_dir / "bomb.png")
    with pytest.raises(ValueError, match="too large to decode safely"):
        LoadImage().execute("bomb.png", ctx(env))


def test_load_image_mask_channels(env):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 64
    Image.fromarray(rgba, "RGBA").save(env.input_dir / "m.png")
    (green,) = LoadImageMask().execute("m.png", "green", ctx(env))
    assert torch.all(green == 1) and green.shape == (1, 2, 2)
    (alpha,) = LoadImageMask().execute("m.png", "alpha", ctx(env))
    assert torch.allclose(alpha, torch.full_like(alpha, 1 - 64 / 255))


def test_save_image_chunks_counter_and_subfolders(env):
    images = torch.rand(2, 4, 6, 3)
    prompt = {"1": {"class_type": "X", "inputs": {}}}
    workflow = {"nodes": [], "links": [], "version": 0.4}
    out = SaveImage().execute(images, "run/%width%x%height%", prompt, {"workflow": workflow}, ctx(env))
    saved = out.ui["images"]
    assert saved == [{"filename": "6x4_00001_.png", "subfolder": "run", "type": "output"},
                     {"filename": "6x4_00002_.png", "subfolder": "run", "type": "output"}]
    png = Image.open(env.output_dir / "run" / "6x4_00001_.png")
    assert json.loads(png.text["prompt"]) == prompt and json.loads(png.text["workflow"]) == workflow
    pixels = np.asarray(png, dtype=np.float32) / 255
    assert np.abs(pixels - images[0].numpy()).max() <= 0.5 / 255 + 1e-6
    again = SaveImage().execute(images[:1], "run/%width%x%height%", None, None, ctx(env))
    assert again.ui["images"][0]["filename"] == "6x4_00003_.png"
    assert next_counter(env.output_dir / "run", "6x4") == 4


@pytest.mark.parametrize("prefix", ["../escape", "a/../../b", "/abs/name"])
def test_save_never_writes_outside_output(env, prefix):
    with pytest.raises(ValueError, match="outside the output folder"):
        SaveImage().execute(torch.rand(1, 2, 2, 3), prefix, None, None, ctx(env))


def test_preview_goes_to_temp(env):
    out = PreviewImage().execute(torch.rand(1, 2, 2, 3), None, None, ctx(env))
    item = out.ui["images"][0]
    assert item["type"] == "temp" and (env.temp_dir / item["filename"]).is_file()
