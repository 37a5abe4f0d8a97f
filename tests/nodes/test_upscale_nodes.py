"""UpscaleModelLoader and ImageUpscaleWithModel in workflows: the file list, the upscale itself, errors that name the
file as the user knows it, the memory estimate (shapes, and bytes against the allocator's peak)."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffusion.checkpoints.upscale_models import load_upscale_model, write_random_upscale_model
from diffusion.devices import pick_dtype
from diffusion.memory import ModelManager
from graph.memory_estimate import EstimateContext, estimate_prompt
from graph.validation import validate_prompt
from nodes.upscale_models import ASSUMED_SCALE, ImageUpscaleWithModel, UpscaleModelShape
from tests.nodes.test_memory_estimates import needed, peak_bytes


@pytest.fixture
def upscale_dir(engine):
    folder = engine.env.models_dir / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def upscale_prompt(model_name: str, width: int = 40, height: int = 24, batch: int = 2) -> dict:
    return {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                     "color": 0x3366CC}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_the_loader_lists_the_folder_and_the_node_upscales(engine, upscale_dir):
    write_random_upscale_model(upscale_dir / "4x-tiny.pth", "rrdbnet", 4, wrapper="params_ema")
    (upscale_dir / "sub").mkdir()
    write_random_upscale_model(upscale_dir / "sub" / "2x-compact.safetensors", "srvgg", 2)
    options = engine.registry.object_info(engine.env)["UpscaleModelLoader"]["input"]["required"]["model_name"][0]
    assert options == ["4x-tiny.pth", "sub/2x-compact.safetensors"]

    for name, scale in (("4x-tiny.pth", 4), ("sub/2x-compact.safetensors", 2)):
        engine.run(upscale_prompt(name))
        assert [d["node"] for e, d in engine.events if e == "progress"] == ["3", "3"]  # one tile per image
        ((model,),) = engine.outputs(upscale_prompt(name), "1")
        ((image,),) = engine.outputs(upscale_prompt(name), "3")
        assert model.scale == scale
        assert image.shape == (2, 24 * scale, 40 * scale, 3) and image.dtype == torch.float32
        source = torch.tensor([0x33, 0x66, 0xCC]) / 255
        assert torch.allclose(image, model.upscale(source.expand(2, 24, 40, 3).clone()))
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0
    # loaded once: a second prompt naming the file gets the same model
    assert engine.outputs(upscale_prompt("4x-tiny.pth", width=8), "1")[0][0] is \
        engine.outputs(upscale_prompt("4x-tiny.pth", width=16), "1")[0][0]


def test_the_model_runs_in_the_dtype_the_device_rule_picks(engine, upscale_dir):
    write_random_upscale_model(upscale_dir / "half.safetensors", "srvgg", 4, dtype=torch.float16)
    ((model,),) = engine.outputs(upscale_prompt("half.safetensors"), "1")
    assert model.dtype == pick_dtype("cpu", for_vae=True)  # never fp16: fp32, or bf16 on CPUs with bf16 matmuls


def test_a_checkpoint_given_as_upscale_model_fails_naming_the_file(engine, upscale_dir, model_dir):
    shutil.copy(model_dir / "sd1.safetensors", upscale_dir / "sd1.safetensors")
    validation = validate_prompt(upscale_prompt("sd1.safetensors"), engine.registry, engine.env)
    assert validation.ok
    result = engine.executor.execute(validation.prompt, "bad", lambda *_: None)
    assert result.status == "error"
    message = result.error["exception_message"]
    assert result.error["node_type"] == "UpscaleModelLoader"
    assert "models/upscale_models/sd1.safetensors: this is a Stable Diffusion checkpoint" in message
    assert str(engine.env.data_dir) not in message


def test_names_outside_the_folder_are_refused_before_running(engine, upscale_dir):
    write_random_upscale_model(upscale_dir / "ok.pth", "srvgg", 4)
    validation = validate_prompt(upscale_prompt("../checkpoints/ok.pth"), engine.registry, engine.env)
    assert not validation.ok
    assert "model_name" in str(validation.response())


def test_estimated_shape_uses_the_scale_from_the_file_header(engine, upscale_dir):
    write_random_upscale_model(upscale_dir / "2x.safetensors", "rrdbnet", 2)
    write_random_upscale_model(upscale_dir / "2x.pth", "rrdbnet", 2)
    for name, scale in (("2x.safetensors", 2), ("2x.pth", ASSUMED_SCALE)):  # pickles are not read to estimate
        validation = validate_prompt(upscale_prompt(name), engine.registry, engine.env)
        estimate = estimate_prompt(validation.prompt, EstimateContext(engine.env, "cpu"))
        assert estimate.shapes["3"][0].shape == (2, 24 * scale, 40 * scale, 3), name
        assert isinstance(estimate.shapes["1"][0], UpscaleModelShape) == (scale == 2)
    ((image,),) = engine.outputs(upscale_prompt("2x.safetensors"), "3")
    assert tuple(image.shape) == (2, 48, 80, 3)


def test_estimate_covers_the_allocated_peak(tmp_path):
    """A model of released width (64 features, 32 growth) on one image, in the dtype the node would use here: the
    estimate is at least the peak the CPU allocator saw and not far above it."""
    path = tmp_path / "wide.safetensors"
    write_random_upscale_model(path, "rrdbnet", 4, num_feat=64, num_block=1, num_grow=32)
    model = load_upscale_model(path, ModelManager("cpu"), dtype=pick_dtype("cpu", for_vae=True))
    image = torch.rand(1, 48, 48, 3)
    peak = peak_bytes(lambda: model.upscale(image), tmp_path)
    from nodes.estimates import image_spec

    shape = UpscaleModelShape(model.arch, model.config)
    estimate = ImageUpscaleWithModel.estimate_memory({}, {"upscale_model": shape, "image": image_spec(1, 48, 48)},
                                                     EstimateContext(device="cpu"))
    assert peak <= needed(estimate) <= 2.0 * peak, (peak, needed(estimate))
