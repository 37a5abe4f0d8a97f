"""A file a workflow names but this machine lacks: the error says where it was looked for and what to do, in
validation's `details` (the CLI's line and the API's 400 body), in the loaders' run-time errors, never with an
absolute path; ComfyUI's error `type` stays. And the shipped example inputs: listed after the input folder's
own files, loaded, served by /view, and a user's file of the same name wins."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment, list_files
from nodes.image_io import IMAGE_EXTENSIONS, LoadImage, LoadImageMask
from nodes.model_paths import bundled_inputs_dir
from nodes.sampling import SAMPLER_NAMES
from server.app import create_app
from tests.server.harness import multipart
from tests.server.inprocess import InProcessServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = bundled_inputs_dir() / "example.png"
# Every shipped example input image (the ControlNet hint too, and whatever others ship later).
SHIPPED = list_files(bundled_inputs_dir(), IMAGE_EXTENSIONS, recursive=False)


@pytest.fixture
def env(tmp_path) -> Environment:
    env = Environment(tmp_path / "data")
    env.ensure_dirs()
    return env


def load_image(name: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def lora_prompt(name: str) -> dict:
    return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "latentloom-shapes.safetensors"}},
            "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": name,
                                                          "strength_model": 1.0, "strength_clip": 1.0}},
            "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["10", 1]}},
            "12": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["11", 0]}},
            "13": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "14": {"class_type": "KSampler", "inputs": {
                "model": ["10", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["11", 0], "negative": ["12", 0], "latent_image": ["13", 0], "denoise": 1.0}},
            "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["4", 2]}},
            "16": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}}}


def only_error(validation, node_id: str) -> dict:
    assert not validation.ok
    errors = validation.node_errors[node_id]["errors"]
    assert len(errors) == 1, errors
    return errors[0]


def test_missing_image_says_where_it_looked_and_what_to_do(env, tmp_path):
    registry = build_registry(env, plugins=False)
    error = only_error(validate_prompt(load_image("mine.png"), registry, env), "1")
    assert error["type"] == "value_not_in_list" and error["message"] == "Value not in list"
    assert error["details"] == ("image: 'mine.png' not found in data/input/ (empty) or the shipped examples/input/; "
                                "upload it or put it in data/input/")
    assert error["extra_info"]["input_name"] == "image" and error["extra_info"]["received_value"] == "mine.png"
    Image.new("RGB", (4, 4)).save(env.input_dir / "a.png")
    error = only_error(validate_prompt(load_image("mine.png"), registry, env), "1")
    assert "not found in data/input/ (files there: a.png) or the shipped" in error["details"]
    assert str(tmp_path) not in json.dumps(error)
    with pytest.raises(ValueError, match=r"^image 'mine.png' not found in data/input/ \(files there: a.png\)"):
        LoadImage().execute("mine.png", context=type("C", (), {"env": env})())


def test_missing_model_names_the_folders_the_extra_paths_and_the_files_there(env, tmp_path):
    registry = build_registry(env, plugins=False)
    error = only_error(validate_prompt(lora_prompt("x.safetensors"), registry, env), "10")
    assert error["type"] == "value_not_in_list"
    assert error["details"] == ("lora_name: 'x.safetensors' not found in data/models/loras/, the extra model paths "
                                "(none configured) or the shipped models/loras/; files there: "
                                "latentloom-shapes-motion-adapter.safetensors, "
                                "latentloom-shapes-new-colour.safetensors; put it in data/models/loras/")
    extra = tmp_path / "a111" / "Lora"
    extra.mkdir(parents=True)
    for i in range(14):
        (extra / f"style-{i:02}.safetensors").write_bytes(b"x")
    env.extra_model_dirs = {"loras": [extra]}
    error = only_error(validate_prompt(lora_prompt("x.safetensors"), registry, env), "10")
    assert "the extra model paths (<extra loras: Lora>)" in error["details"]
    shipped = len(list((ROOT / "models" / "loras").glob("*.safetensors")))
    assert "style-00.safetensors, style-01.safetensors" in error["details"]
    assert f"and {14 + shipped - 12} more" in error["details"]  # the first twelve names, then a count
    assert str(tmp_path) not in json.dumps(validate_prompt(lora_prompt("x.safetensors"), registry, env).response())
    with pytest.raises(ValueError, match=r"^lora 'x.safetensors' not found in data/models/loras/, the extra"):
        env.find_model("loras", "x.safetensors")
    with pytest.raises(ValueError, match=r"^checkpoint 'sd.ckpt' not found .* files there: latentloom-shapes"):
        env.find_model("checkpoints", "sd.ckpt")


def test_other_combos_keep_comfyuis_list(env):
    prompt = lora_prompt("latentloom-shapes-new-colour.safetensors")
    prompt["14"]["inputs"]["sampler_name"] = "nope"
    error = only_error(validate_prompt(prompt, build_registry(env, plugins=False), env), "14")
    assert error["details"] == f"sampler_name: 'nope' not in (list of length {len(SAMPLER_NAMES)})"


def test_a_path_that_leaves_the_folder_is_still_refused(env):
    with pytest.raises(ValueError, match="may not leave its folder"):
        env.find_input("../example.png", {".png"})
    with pytest.raises(ValueError, match="may not leave its folder"):
        env.find_input("../../examples/input/example.png", {".png"})


def test_the_shipped_example_is_listed_loaded_and_loses_to_the_users_own(env):
    assert EXAMPLE.is_file() and "example.png" in SHIPPED
    for node in ("LoadImage", "LoadImageMask"):
        options = build_registry(env, plugins=False).object_info(env)[node]["input"]["required"]["image"][0]
        assert options == SHIPPED
    assert validate_prompt(load_image("example.png"), build_registry(env, plugins=False), env).ok
    context = type("C", (), {"env": env})()
    image, mask = LoadImage().execute("example.png", context=context)
    assert image.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    assert torch.all(mask[0, 40:60, 40:60] == 1) and mask.sum() == 400  # the transparent hole alone
    (alpha,) = LoadImageMask().execute("example.png", "alpha", context=context)
    assert torch.equal(alpha, mask)  # ComfyUI's LoadImageMask: 1 - alpha too
    Image.new("RGB", (8, 8), (0, 255, 0)).save(env.input_dir / "example.png")
    image, _ = LoadImage().execute("example.png", context=context)
    assert image.shape == (1, 8, 8, 3) and torch.allclose(image[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert env.list_input_files({".png"}) == [name for name in SHIPPED if name.endswith(".png")]


class ServerWithNodes(InProcessServer):
    async def _start(self) -> None:
        from aiohttp import web

        self.app = create_app(self.config, build_registry(plugins=False))
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@pytest.fixture
def server(tmp_path):
    server = ServerWithNodes(tmp_path / "data").start()
    yield server
    server.stop()


def test_api_details_and_view_of_the_shipped_example(server, tmp_path):
    status, body = server.json("POST", "/prompt", {"prompt": load_image("mine.png")})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    (error,) = body["node_errors"]["1"]["errors"]
    assert error["type"] == "value_not_in_list"
    assert error["details"].startswith("image: 'mine.png' not found in data/input/ (empty) or the shipped examples")
    assert str(tmp_path) not in json.dumps(body)
    status, _, data = server.request("GET", "/view?filename=example.png&type=input&subfolder=")
    assert status == 200 and data == EXAMPLE.read_bytes()
    status, listed = server.json("GET", "/internal/files/input")
    assert status == 200 and sorted(listed) == SHIPPED
    assert server.request("GET", "/view?filename=example.png&type=output")[0] == 404
    assert server.request("GET", "/view?filename=example.png&type=input&subfolder=x")[0] == 404
    mask = io.BytesIO()  # the mask editor on the shipped example: its pixels, the mask's alpha, saved as the user's
    Image.new("RGBA", (64, 64), (0, 0, 0, 100)).save(mask, format="PNG")
    body, content_type = multipart({"image": ("mask.png", mask.getvalue()), "original_ref": json.dumps(
        {"filename": "example.png", "subfolder": "", "type": "input"})})
    status, reply = server.json("POST", "/upload/mask", raw=body, headers={"Content-Type": content_type})
    assert status == 200, reply
    with Image.open(server.data_dir / "input" / reply["subfolder"] / reply["name"]) as masked:
        assert masked.getpixel((5, 5)) == (*Image.open(EXAMPLE).getpixel((5, 5))[:3], 100)
    assert not (server.data_dir / "input" / "example.png").exists()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(server.data_dir / "input" / "example.png")
    status, _, data = server.request("GET", "/view?filename=example.png&type=input")
    assert status == 200 and data == (server.data_dir / "input" / "example.png").read_bytes()


def test_cli_validate_prints_the_explanation(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--data-dir", str(tmp_path / "data"), "validate",
                           str(ROOT / "workflows" / "txt2img-sdxl.json")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert ("node 4 (CheckpointLoaderSimple), input 'ckpt_name': Value not in list (ckpt_name: "
            "'sd_xl_base_1.0.safetensors' not found in data/models/checkpoints/, the extra model paths (none "
            "configured) or the shipped models/checkpoints/; files there: latentloom-shapes.safetensors, "
            "latentloom-shapes_128.safetensors; put it in data/models/checkpoints/)") in out
    assert str(tmp_path) not in out

