"""Errors name files relative to the data directory (`models/checkpoints/bad.safetensors`, `input/bad.png`) or
their model folder, never by the server's absolute paths: not in messages, `details`, or tracebacks, whether
from validation, from the executor, or in a real server's history."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from graph.executor import Executor
from graph.node import Node, String
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment, folder_names, name_paths, naming_files
from tests.server.harness import ServerProcess, make_data_dir


def absolute_forms(*folders: Path) -> list[str]:
    return sorted({form for folder in folders for form in (os.path.abspath(folder), os.path.realpath(folder))})


def assert_no_paths(payload: Any, *folders: Path) -> str:
    text = json.dumps(payload)
    for form in absolute_forms(*folders):
        assert form not in text, f"{form} in {text[:2000]}"
    return text


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "good.safetensors"
    write_random_checkpoint(path, "sd1", seed=3)
    return path


@pytest.fixture
def env(tmp_path, good_checkpoint) -> Environment:
    env = Environment(tmp_path / "data")
    env.ensure_dirs()
    os.link(good_checkpoint, env.models_dir / "checkpoints" / "good.safetensors")
    (env.models_dir / "checkpoints" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (env.models_dir / "vae" / "bad.safetensors").write_bytes(b"garbage" * 3)
    (env.models_dir / "loras" / "bad.safetensors").write_bytes(b"garbage" * 3)
    (env.models_dir / "embeddings" / "bad.safetensors").write_bytes(b"garbage" * 3)
    Image.new("RGB", (16, 16), "red").save(env.input_dir / "good.png")
    return env


def sampled(ckpt: str = "good.safetensors", positive: str = "a cat", lora: str | None = None,
            vae: str | None = None) -> dict[str, Any]:
    model, clip = (["10", 0], ["10", 1]) if lora else (["4", 0], ["4", 1])
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}},
        "3": {"class_type": "KSampler", "inputs": {"model": model, "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["6", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["11", 0] if vae else ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if lora:
        prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora,
                                                               "strength_model": 1.0, "strength_clip": 1.0}}
    if vae:
        prompt["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
    return prompt


def load_image(name: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def execution_error(env: Environment, prompt: dict[str, Any]) -> dict[str, Any]:
    registry = build_registry(env, plugins=False)
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    result = Executor(env=env).execute(validation.prompt, "p", lambda event, data: None)
    assert result.status == "error"
    return result.error


@pytest.mark.parametrize("prompt, node, public", [
    (sampled(ckpt="bad.safetensors"), "4", "models/checkpoints/bad.safetensors"),
    (sampled(vae="bad.safetensors"), "11", "models/vae/bad.safetensors"),
    (sampled(lora="bad.safetensors"), "10", "models/loras/bad.safetensors"),
    (sampled(positive="embedding:bad a cat"), "6", "embeddings/bad.safetensors"),
], ids=["checkpoint", "vae", "lora", "embedding"])
def test_loader_errors_name_files_relative_to_the_data_dir(env, prompt, node, public):
    error = execution_error(env, prompt)
    assert error["node_id"] == node
    assert public in error["exception_message"], error["exception_message"]
    text = assert_no_paths(error, env.data_dir)
    assert "Traceback" in text  # the traceback is there, without the paths


def test_an_extra_model_folder_is_named_by_its_kind_and_folder_name(env, tmp_path):
    extra = tmp_path / "webui" / "Stable-diffusion"
    extra.mkdir(parents=True)
    (extra / "broken.safetensors").write_bytes(b"\x00" * 4)
    env.extra_model_dirs = {"checkpoints": [extra]}
    error = execution_error(env, sampled(ckpt="broken.safetensors"))
    assert "<extra checkpoints: Stable-diffusion>/broken.safetensors" in error["exception_message"]
    assert_no_paths(error, env.data_dir, extra)


def test_an_unreadable_image_is_named_in_the_input_folder(env):
    """Refused by validation (which may open the file) or by the run: either way named, not by absolute path."""
    (env.input_dir / "bad.png").write_bytes(b"not an image at all")
    validation = validate_prompt(load_image("bad.png"), build_registry(env, plugins=False), env)
    payload = validation.response() if not validation.ok else execution_error(env, load_image("bad.png"))
    assert "bad.png" in assert_no_paths(payload, env.data_dir)
    (env.input_dir / "later.png").write_bytes((env.input_dir / "good.png").read_bytes())
    validation = validate_prompt(load_image("later.png"), build_registry(env, plugins=False), env)
    assert validation.ok
    (env.input_dir / "later.png").write_bytes(b"broken after validation")
    result = Executor(env=env).execute(validation.prompt, "p", lambda event, data: None)
    assert result.status == "error" and "later.png" in result.error["exception_message"]
    assert_no_paths(result.error, env.data_dir)


class WriteFails(Node):
    """A node that lets an OS error naming a data-directory file through, as a custom node or a full disk can."""

    hidden = ("context",)
    output_node = True
    inputs = [String("name", default="x.png")]

    def execute(self, name, context=None):
        path = context.env.output_dir / "sub" / name
        raise OSError(28, "No space left on device", str(path))


def test_an_error_a_node_lets_through_names_no_absolute_path(env):
    registry = build_registry(env, plugins=False)
    registry.register(WriteFails)
    validation = validate_prompt({"1": {"class_type": "WriteFails", "inputs": {"name": "big.png"}}}, registry, env)
    assert validation.ok, validation.response()
    result = Executor(env=env).execute(validation.prompt, "p", lambda event, data: None)
    assert result.status == "error"
    assert "No space left on device: 'output/sub/big.png'" in result.error["exception_message"]
    assert "output/sub/big.png" in "".join(result.error["traceback"])
    assert_no_paths(result.error, env.data_dir)


def test_validation_errors_name_no_folder(env):
    registry = build_registry(env, plugins=False)
    for prompt in (sampled(lora="missing.safetensors"), load_image("missing.png")):
        assert_no_paths(validate_prompt(prompt, registry, env).response(), env.data_dir)
    with pytest.raises(ValueError, match="not found in data/models/loras/") as caught:
        env.find_model("loras", "missing.safetensors")
    assert_no_paths(str(caught.value), env.data_dir)


def test_renaming_keeps_the_type_and_drops_a_chain_that_names_paths(tmp_path):
    names = folder_names([(tmp_path / "data", ""), (tmp_path / "x", "<x>")])
    assert name_paths(f"{tmp_path}/data/models/a.pt and {tmp_path}/data and {tmp_path}/x/b and {tmp_path}/xy",
                      names) == f"models/a.pt and <data directory> and <x>/b and {tmp_path}/xy"
    with pytest.raises(FileNotFoundError) as caught, naming_files(names):
        raise FileNotFoundError(f"no file {tmp_path}/data/models/a.pt")
    assert str(caught.value) == "no file models/a.pt" and caught.value.__suppress_context__
    with pytest.raises(KeyError) as unchanged, naming_files(names):
        raise KeyError("k")
    assert unchanged.value.args == ("k",)
    with pytest.raises(ValueError) as chained, naming_files(names):
        try:
            open(tmp_path / "data" / "nope")  # noqa: SIM115 - the OSError names the absolute path
        except OSError as exc:
            raise ValueError("cannot read") from exc
    assert chained.value.__cause__ is None and chained.value.__suppress_context__


def wait_history(server: ServerProcess, prompt_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = server.json("GET", f"/history/{prompt_id}")
        if status == 200 and body:
            return body[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish")


def test_a_real_server_names_no_absolute_path(tmp_path):
    data = make_data_dir(tmp_path / "data")
    for folder in ("checkpoints", "loras"):
        (data / "models" / folder).mkdir(parents=True)
    (data / "models" / "checkpoints" / "bad.safetensors").write_bytes(b"\x00" * 12)
    (data / "input").mkdir()
    (data / "input" / "bad.png").write_bytes(b"not an image")
    server = ServerProcess(data).start()
    try:
        status, body = server.json("POST", "/prompt", {"prompt": sampled(ckpt="bad.safetensors")})
        assert status == 200, body
        entry = wait_history(server, body["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        message = json.dumps(entry["status"]["messages"])
        assert "models/checkpoints/bad.safetensors" in message and "Traceback" in message
        assert_no_paths(entry, data)
        assert_no_paths(server.json("GET", "/history")[1], data)
        status, body = server.json("POST", "/prompt", {"prompt": load_image("bad.png")})
        refused = body if status == 400 else wait_history(server, body["prompt_id"])  # at validation or run
        assert "bad.png" in assert_no_paths(refused, data)
        for prompt in (sampled(ckpt="bad.safetensors", lora="missing.safetensors"), sampled(ckpt="../../etc/passwd")):
            status, body = server.json("POST", "/prompt", {"prompt": prompt})
            assert status == 400
            assert_no_paths(body, data)
    finally:
        server.stop()
