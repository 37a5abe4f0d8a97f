"""The nodes' memory estimates against what really happens: the peak bytes torch allocates while a node runs
(read from the profiler's allocator events, on the CPU, on tiny random models) and the shapes its outputs have.

These are ratio bounds, not timings: an estimate that drifts from the code it models fails them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import checkpoint_spec
from diffusion.devices import pick_dtype
from diffusion.handles import wrap_checkpoint
from diffusion.memory import ModelManager
from diffusion.models.unet import UNetModel
from graph.memory_estimate import EstimateContext, TensorSpec, estimate_prompt
from graph.validation import validate_prompt
from nodes.estimates import (
    image_file_estimate,
    latent_shape,
    sampler_estimate,
    unet_bytes,
    vae_decode_estimate,
    vae_encode_estimate,
)
from nodes.sampling import KSampler
from nodes.vae import VAEDecode, VAEDecodeTiled, VAEEncode

CPU = EstimateContext(device="cpu")
TINY = checkpoint_spec("sd1", "tiny")


def peak_bytes(fn, tmp_path) -> int:
    """The highest number of bytes the CPU allocator had handed out above where it stood when `fn` started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    allocations = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                         key=lambda e: e["ts"])
    live = peak = 0
    for event in allocations:
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def needed(estimate) -> int:
    """What a node needs on a CPU, where device and host are one memory (graph.memory_estimate.NodeMemory)."""
    return max(estimate.device_bytes, estimate.host_bytes) + estimate.new_output_bytes()


@pytest.fixture(scope="module")
def handles(model_dir):
    """The tiny checkpoint in the dtype CheckpointLoaderSimple would give it here (bf16 on CPUs with native
    bf16 matmuls, else fp32): the dtype the estimates assume."""
    loaded = load_checkpoint(model_dir / "sd1.safetensors", dtype=pick_dtype("cpu"))
    return wrap_checkpoint(loaded, ModelManager("cpu"))


@pytest.mark.parametrize("side", [512])
def test_vae_decode_estimate_is_close_to_the_allocated_peak(handles, tmp_path, side):
    _, _, vae = handles
    samples = torch.randn(1, 4, side // 8, side // 8)
    estimate = vae_decode_estimate(latent_shape(1, side // 8, side // 8), TINY.vae, CPU)
    measured = peak_bytes(lambda: VAEDecode().execute({"samples": samples}, vae), tmp_path)
    assert estimate.outputs[0] == TensorSpec((1, side, side, 3))
    assert 0.8 < needed(estimate) / measured < 1.25, (needed(estimate), measured)


def test_tiled_decode_and_encode_estimates_are_close_to_the_allocated_peak(handles, tmp_path):
    _, _, vae = handles
    samples, pixels = torch.randn(2, 4, 64, 48), torch.rand(2, 512, 384, 3)
    tiled = vae_decode_estimate(latent_shape(2, 64, 48), TINY.vae, CPU, tile=256 // 8)
    measured = peak_bytes(lambda: VAEDecodeTiled().execute({"samples": samples}, vae, 256, 64), tmp_path)
    assert 0.8 < needed(tiled) / measured < 1.25, (needed(tiled), measured)
    encode = vae_encode_estimate(TensorSpec((2, 512, 384, 3)), TINY.vae, CPU)
    measured = peak_bytes(lambda: VAEEncode().execute(pixels, vae), tmp_path)
    assert encode.outputs[0]["samples"].shape == (2, 4, 64, 48)
    assert 0.8 < needed(encode) / measured < 1.25, (needed(encode), measured)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_estimate_matches_the_allocated_peak(tmp_path, family):
    config = checkpoint_spec(family, "tiny").unet
    unet = UNetModel(config).eval().requires_grad_(False)
    x, t = torch.randn(2, 4, 48, 40), torch.full((2,), 500.0)
    context = torch.randn(2, 77, config.context_dim)
    y = torch.randn(2, config.adm_in_channels) if config.adm_in_channels else None
    with torch.no_grad():
        measured = peak_bytes(lambda: unet(x, t, context, y), tmp_path)
    assert 0.9 < unet_bytes(config, 2, 48, 40, 4, "cpu") / measured < 1.1


def test_ksampler_estimate_is_close_to_the_allocated_peak(handles, tmp_path):
    model, clip, _ = handles
    cond, pooled = clip.encode("a red circle")
    positive = [(cond, {"pooled_output": pooled})]
    latent = {"samples": torch.zeros(1, 4, 64, 64)}
    estimate = sampler_estimate(latent_shape(1, 64, 64), TINY.unet, CPU, batch_factor=2)
    measured = peak_bytes(lambda: KSampler().execute(model, 1, 1, 5.0, "euler", "normal", positive, positive,
                                                     latent, 1.0), tmp_path)
    assert 0.8 < needed(estimate) / measured < 1.25, (needed(estimate), measured)


def test_estimated_shapes_are_the_shapes_the_nodes_produce(engine):
    rgba = np.zeros((48, 80, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(engine.env.input_dir / "in.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                       "scale_by": 1.5}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["2", 2]}},
        "5": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["4", 0], "upscale_method": "nearest-exact",
                                                          "scale_by": 0.5}},
        "6": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 3}},
        "7": {"class_type": "LatentFromBatch", "inputs": {"samples": ["6", 0], "batch_index": 1, "length": 5}},
        "8": {"class_type": "GrowMask", "inputs": {"mask": ["1", 1], "expand": 1, "tapered_corners": True}},
        "9": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["7", 0], "mask": ["8", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 2]}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 24, "batch_size": 1, "color": 0}},
        "12": {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}},
        "13": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["12", 0], "left": 8, "top": 0, "right": 16,
                                                               "bottom": 8, "feathering": 4}},
        "14": {"class_type": "ImageToMask", "inputs": {"image": ["13", 0], "channel": "green"}},
        "15": {"class_type": "MaskToImage", "inputs": {"mask": ["14", 0]}},
        "16": {"class_type": "ImageCrop", "inputs": {"image": ["15", 0], "width": 50, "height": 30, "x": 40,
                                                     "y": 10}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}},
    }
    validation = validate_prompt(prompt, engine.registry, engine.env)
    assert validation.ok, validation.response()
    estimate = estimate_prompt(validation.prompt, EstimateContext(engine.env, "cpu"))
    engine.run(prompt)
    keys = engine.executor.cache_keys(validation.prompt)
    compared = 0
    for node_id in validation.prompt.nodes:
        if node_id in ("2", "17"):  # models, and an output node without outputs
            continue
        assert node_id in estimate.nodes, f"node {node_id} has no estimate"
        real = engine.executor.cache.get(keys[node_id]).outputs
        declared = estimate.shapes[node_id]
        for slot, values in enumerate(real):
            value, shape = values[0], declared[slot]
            if isinstance(value, dict):
                assert {k: shape[k].shape for k in shape} == {k: tuple(value[k].shape) for k in shape
                                                              if k in ("samples", "noise_mask")}, node_id
            else:
                assert shape.shape == tuple(value.shape), node_id
            compared += 1
    assert compared == 17


def test_load_image_estimate_reads_the_header_only(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated a quarter turn: width and height swap
    Image.new("RGB", (120, 40), "red").save(path, exif=exif)
    estimate = image_file_estimate(path)
    assert estimate.outputs == (TensorSpec((1, 120, 40, 3)), TensorSpec((1, 64, 64)))
    frames = tmp_path / "anim.gif"
    Image.new("RGBA", (30, 20)).save(frames, save_all=True, append_images=[Image.new("RGBA", (30, 20), "blue")])
    assert image_file_estimate(frames).outputs[0].shape == (2, 20, 30, 3)
    (tmp_path / "not.png").write_bytes(b"no image")
    assert image_file_estimate(tmp_path / "not.png") is None
