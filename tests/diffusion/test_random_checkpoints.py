"""The random test-checkpoint writer: deterministic, small at tiny size, streaming at large sizes, real
layouts, and clear errors for what it cannot write."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffusion.checkpoints.files import read_metadata, read_state_dict
from diffusion.checkpoints.random_checkpoints import layout_shapes, write_random_checkpoint, write_random_vae


def test_same_seed_same_bytes_other_seed_other_values(tmp_path):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    write_random_checkpoint(a, "sdxl", seed=1)
    write_random_checkpoint(b, "sdxl", seed=1)
    write_random_checkpoint(c, "sdxl", seed=2)
    assert a.read_bytes() == b.read_bytes()
    sa, sc = read_state_dict(a), read_state_dict(c)
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(sa[key], sc[key])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_tiny_files_are_small_and_hold_the_real_key_structure(tmp_path, family):
    path = tmp_path / "t.safetensors"
    write_random_checkpoint(path, family)
    assert path.stat().st_size < 12e6  # the 49408-row token tables (16 wide) are most of it
    sd = read_state_dict(path)
    real = layout_shapes(family, "real")
    assert set(sd) <= set(real) | {"v_pred"}
    # every kind of entry of the real file is there, only fewer blocks and layers
    def kinds(keys):
        return {".".join(p for p in k.split(".") if not p.isdigit()) for k in keys}
    assert kinds(sd) == kinds(real)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.dtype.is_floating_point)
    assert "latentloom.config" in read_metadata(path)


def test_random_weights_are_scaled_and_nothing_is_zero(tmp_path):
    path = tmp_path / "t.safetensors"
    write_random_checkpoint(path, "sd1")
    sd = read_state_dict(path)
    for key, value in sd.items():
        if not value.dtype.is_floating_point:
            continue
        assert value.abs().max() > 0, key
        if value.ndim >= 2:  # 1/sqrt(fan-in): rows of unit norm on average
            fan_in = value[0].numel()
            assert 0.5 < value.float().std().item() * fan_in**0.5 < 2.0, key
    ids = sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(77)[None])


def test_real_layout_text_encoders(tmp_path):
    sd2 = layout_shapes("sd2")
    assert sd2["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    xl = layout_shapes("sdxl")
    assert xl["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    assert xl["conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"].shape == (5120, 1280)
    assert xl["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    refiner = layout_shapes("sdxl_refiner")
    assert refiner["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)
    total = sum(v.numel() for k, v in layout_shapes("sd1").items() if k.startswith("model.diffusion_model."))
    assert total == 859_520_964  # the SD1.5 UNet's parameter count


WRITE = """
import sys, torch
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
def peak():
    with open("/proc/self/status") as f:
        return int(dict(line.split(":", 1) for line in f)["VmHWM"].split()[0]) * 1024
write_random_checkpoint(sys.argv[2], "sd1")  # warm-up
base = peak()
write_random_checkpoint(sys.argv[1], "sd1", size="small", dtype=torch.float16)
print(base, peak())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_writing_streams_one_tensor_at_a_time(tmp_path):
    path = tmp_path / "small.safetensors"
    command = [sys.executable, "-c", WRITE, str(path), str(tmp_path / "warm.safetensors")]
    base, peak = (int(x) for x in subprocess.run(command, capture_output=True, text=True, check=True).stdout.split())
    size = path.stat().st_size
    # the largest single tensor (the token table, a fifth of this file, drawn in fp32 then cast) bounds the
    # growth; holding the tensors of the file at once would take at least its size
    assert peak - base < 0.75 * size, f"writing grew RSS by {(peak - base) / 1e6:.0f} MB for {size / 1e6:.0f} MB"


def test_standalone_vae_layouts(tmp_path):
    write_random_vae(tmp_path / "a.safetensors", prefix=True)
    write_random_vae(tmp_path / "b.safetensors", prefix=False)
    a, b = read_state_dict(tmp_path / "a.safetensors"), read_state_dict(tmp_path / "b.safetensors")
    assert all(k.startswith("first_stage_model.") for k in a)
    assert {k.removeprefix("first_stage_model.") for k in a} == set(b)


def test_what_cannot_be_written(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        write_random_checkpoint(path, "sd3")
    with pytest.raises(ValueError, match="size must be one of"):
        write_random_checkpoint(path, "sd1", size="huge")
    with pytest.raises(ValueError, match="eps-prediction only"):
        write_random_checkpoint(path, "sd1", prediction="v")
    with pytest.raises(ValueError, match="prediction must be"):
        write_random_checkpoint(path, "sd2", prediction="x0")
    with pytest.raises(ValueError, match="sd1 only"):
        write_random_checkpoint(path, "sdxl", size="small")
    assert not path.exists()
