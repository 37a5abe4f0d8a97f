from __future__ import annotations

import os

import pytest

from nodes.environment import Environment, UnsafePathError, safe_join


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
    assert env.model_dirs("checkpoints") == [tmp_path / "models" / "checkpoints", tmp_path / "a1111"]
    assert Environment(tmp_path, output_dir_override=tmp_path / "o").output_dir == tmp_path / "o"


def test_unload_models_and_device_stats(tmp_path):
    env = Environment(tmp_path)
    env.model_cache["a"] = object()
    assert env.unload_models() == 1 and not env.model_cache
    stats = env.device_stats()
    assert stats and {"name", "type", "index", "vram_total", "vram_free"} <= set(stats[0])
    assert 0 < stats[0]["vram_free"] <= stats[0]["vram_total"]
