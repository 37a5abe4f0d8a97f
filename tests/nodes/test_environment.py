from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodes.environment import Environment, UnsafePathError, safe_join
from nodes.model_paths import ModelPathsError, bundled_models_dir, read_extra_model_paths


def test_safe_join_allows_names_inside(tmp_path):
    assert safe_join(tmp_path, "a", "b.png") == (tmp_path / "a" / "b.png").resolve()
    assert safe_join(tmp_path, "sub/dir/x.png") == (tmp_path / "sub" / "dir" / "x.png").resolve()


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "..", "a\\..\\..\\x", "x\0y"])
def test_safe_join_refuses_escapes(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name)


def test_safe_join_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePathError, match="resolves outside"):
        safe_join(root, "link/secret.txt")


def test_environment_folders(tmp_path):
    env = Environment(tmp_path, extra_model_dirs={"checkpoints": [tmp_path / "a1111"]})
    env.ensure_dirs()
    assert (tmp_path / "models" / "checkpoints").is_dir() and (tmp_path / "output").is_dir()
    assert env.model_dirs("checkpoints") == [tmp_path / "models" / "checkpoints", tmp_path / "a1111",
                                             bundled_models_dir() / "checkpoints"]
    assert Environment(tmp_path, output_dir_override=tmp_path / "o").output_dir == tmp_path / "o"


def test_unload_models_and_device_stats(tmp_path):
    env = Environment(tmp_path)
    env.model_cache["a"] = object()
    assert env.unload_models() == 1 and not env.model_cache
    stats = env.device_stats()
    assert stats and {"name", "type", "index", "vram_total", "vram_free"} <= set(stats[0])
    assert 0 < stats[0]["vram_free"] <= stats[0]["vram_total"]


def test_model_lists_follow_files_and_find_refuses_escapes(tmp_path):
    env = Environment(tmp_path)
    env.ensure_dirs()
    assert "a.safetensors" not in env.list_models("checkpoints")
    (tmp_path / "models" / "checkpoints" / "sub").mkdir()
    (tmp_path / "models" / "checkpoints" / "sub" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_text("x")
    assert "sub/a.safetensors" in env.list_models("checkpoints")
    assert "notes.txt" not in env.list_models("checkpoints")
    assert env.find_model("checkpoints", "sub/a.safetensors").name == "a.safetensors"
    with pytest.raises(ValueError, match="not found"):
        env.find_model("checkpoints", "b.safetensors")
    with pytest.raises(ValueError, match="may not leave"):
        env.find_model("checkpoints", "../../etc/passwd")


A1111 = """
a111:
    base_path: webui/
    checkpoints: models/Stable-diffusion
    lora: |
        models/Lora
        models/LyCORIS
comfyui:
    base_path: /opt/ComfyUI
    unet: models/unet
"""


def test_extra_model_paths_yaml_and_toml(tmp_path):
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(A1111)
    folders = read_extra_model_paths(config)
    assert folders["checkpoints"] == [tmp_path / "webui" / "models" / "Stable-diffusion"]
    assert folders["loras"] == [tmp_path / "webui" / "models" / "Lora", tmp_path / "webui" / "models" / "LyCORIS"]
    assert folders["diffusion_models"] == [Path("/opt/ComfyUI/models/unet")]
    toml = tmp_path / "paths.toml"
    toml.write_text('[mine]\nbase_path = "store"\ncheckpoints = "sd"\n')
    assert read_extra_model_paths(toml) == {"checkpoints": [tmp_path / "store" / "sd"]}


@pytest.mark.parametrize("text, needle", [("[1, 2]", "named sections"), ("a: [1]", "must map"),
                                          ("a:\n  checkpoints: 3", "must be a folder"), ("a: b: c", "not valid")])
def test_extra_model_paths_errors(tmp_path, text, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ModelPathsError, match=needle):
        read_extra_model_paths(config)
