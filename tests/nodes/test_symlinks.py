"""Symlinks in input/ and in model folders: those that lead out are neither listed (object_info, /models) nor
loadable by name; those that stay inside are fine."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment, list_files
from nodes.model_paths import bundled_inputs_dir
from server.routes_info import model_files


@pytest.fixture
def data(tmp_path: Path) -> tuple[Environment, Path]:
    """A data directory whose checkpoints and input folders hold links in and out, and a folder outside."""
    outside = tmp_path / "outside"
    (outside / "ssh").mkdir(parents=True)
    (outside / "secret.safetensors").write_bytes(b"secret")
    (outside / "ssh" / "id_rsa.safetensors").write_bytes(b"key")
    Image.new("RGB", (8, 8)).save(outside / "private.png")
    env = Environment(tmp_path / "data")
    env.ensure_dirs()
    checkpoints = env.models_dir / "checkpoints"
    (checkpoints / "sub").mkdir()
    (checkpoints / "good.safetensors").write_bytes(b"good")
    (checkpoints / "sub" / "deep.safetensors").write_bytes(b"deep")
    os.symlink(outside / "secret.safetensors", checkpoints / "evil.safetensors")
    os.symlink("/etc/passwd", checkpoints / "passwd.safetensors")
    os.symlink(outside / "ssh", checkpoints / "ssh")
    os.symlink(env.models_dir / "loras", checkpoints / "sibling")  # inside the data dir, outside the folder
    os.symlink("good.safetensors", checkpoints / "alias.safetensors")
    os.symlink(checkpoints / "sub", checkpoints / "sublink")
    os.symlink(".", checkpoints / "sub" / "loop")  # a cycle: entered once
    (env.models_dir / "loras" / "l.safetensors").write_bytes(b"lora")
    Image.new("RGB", (8, 8)).save(env.input_dir / "real.png")
    os.symlink(outside / "private.png", env.input_dir / "leak.png")
    os.symlink("/etc/passwd", env.input_dir / "passwd.png")
    os.symlink("real.png", env.input_dir / "same.png")
    return env, outside


INSIDE = ["alias.safetensors", "good.safetensors", "sub/deep.safetensors", "sublink/deep.safetensors"]
OUTSIDE = ["evil.safetensors", "passwd.safetensors", "ssh/id_rsa.safetensors", "sibling/l.safetensors"]


def test_model_lists_leave_out_links_that_lead_out(data):
    env, _ = data
    listed = env.list_models("checkpoints")
    assert set(INSIDE) <= set(listed)
    assert not set(OUTSIDE) & set(listed)
    assert not any(name.startswith(("ssh", "sibling")) for name in listed)
    assert sorted(model_files(SimpleNamespace(env=env), "checkpoints")) == listed  # GET /models/checkpoints


@pytest.mark.parametrize("name", OUTSIDE)
def test_links_that_lead_out_cannot_be_loaded_by_name(data, name):
    env, outside = data
    with pytest.raises(ValueError, match="resolves outside its folder") as caught:
        env.find_model("checkpoints", name)
    assert str(outside) not in str(caught.value) and str(env.data_dir) not in str(caught.value)


@pytest.mark.parametrize("name", INSIDE)
def test_links_inside_the_folder_load(data, name):
    env, _ = data
    assert env.find_model("checkpoints", name).is_file()


def test_a_refused_link_does_not_hide_the_same_name_in_a_later_folder(data, tmp_path):
    env, _ = data
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "evil.safetensors").write_bytes(b"fine")
    env.extra_model_dirs = {"checkpoints": [extra]}
    assert "evil.safetensors" in env.list_models("checkpoints")
    assert env.find_model("checkpoints", "evil.safetensors") == (extra / "evil.safetensors").resolve()


def test_input_listing_and_loading_leave_out_links_that_lead_out(data):
    env, _ = data
    registry = build_registry(env, plugins=False)
    options = registry.object_info(env)["LoadImage"]["input"]["required"]["image"][0]
    shipped = list_files(bundled_inputs_dir(), {".png"}, recursive=False)  # the repository's examples too
    assert options == sorted({"real.png", "same.png", *shipped})
    assert registry.object_info(env)["LoadImageMask"]["input"]["required"]["image"][0] == options
    for name, ok in [("real.png", True), ("same.png", True), ("leak.png", False), ("passwd.png", False)]:
        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                  "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        assert validate_prompt(prompt, registry, env).ok is ok, name


def test_a_linked_folder_itself_is_followed(tmp_path):
    """Users point models/checkpoints at a big disk: the folder is a link, its files are inside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "big.safetensors").write_bytes(b"x")
    env = Environment(tmp_path / "data")
    env.ensure_dirs()
    (env.models_dir / "checkpoints").rmdir()
    os.symlink(disk, env.models_dir / "checkpoints")
    assert "big.safetensors" in env.list_models("checkpoints")
    assert env.find_model("checkpoints", "big.safetensors") == (disk / "big.safetensors").resolve()


def test_list_files_without_recursion_and_a_missing_folder(data, tmp_path):
    env, _ = data
    assert list_files(env.models_dir / "checkpoints", [".safetensors"], recursive=False) == \
        ["alias.safetensors", "good.safetensors"]
    assert list_files(tmp_path / "nope", [".png"]) == []
