"""T2I-Adapter: parity with diffusers' T2IAdapter (full, light, full_xl) from both file layouts, detection of
variant, hint channels and family, bad files; a UNet step with adapter features against diffusers'
`down_intrablock_additional_residuals`; and how the features reach the UNet while sampling (computed once per hint,
strength 0 and step ranges, batches, chaining with a ControlNet, family mismatch)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.adapter import T2IAdapter as DiffusersAdapter

from diffusion.checkpoints.files import CheckpointError, write_safetensors
from diffusion.checkpoints.t2i_adapter_files import (
    build_t2i_adapter,
    config_for_unet,
    load_t2i_adapter,
    random_t2i_adapter,
    write_random_t2i_adapter,
)
from diffusion.checkpoints.t2i_adapter_keys import diffusers_to_original, original_to_diffusers
from diffusion.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from tests.diffusion.random_weights import randomize_, relative_error

TOLERANCE = 1e-4
# Tiny adapters of each kind diffusers builds, as diffusers' config and ours.
KINDS = {
    "full": ({"in_channels": 3, "channels": [8, 16, 16, 32], "num_res_blocks": 2, "downscale_factor": 8,
              "adapter_type": "full_adapter"}, T2IAdapterConfig("full", 3, (8, 16, 16, 32), 2, 8)),
    "full_1ch": ({"in_channels": 1, "channels": [8, 16, 32], "num_res_blocks": 3, "downscale_factor": 8,
                  "adapter_type": "full_adapter"}, T2IAdapterConfig("full", 1, (8, 16, 32), 3, 8)),
    "light": ({"in_channels": 3, "channels": [8, 16, 32], "num_res_blocks": 4, "downscale_factor": 8,
               "adapter_type": "light_adapter"}, T2IAdapterConfig("light", 3, (8, 16, 32, 32), 4, 8)),
    "full_xl": ({"in_channels": 3, "channels": [8, 16, 32, 32], "num_res_blocks": 2, "downscale_factor": 16,
                 "adapter_type": "full_adapter_xl"}, T2IAdapterConfig("full", 3, (8, 16, 32, 32), 2, 16, True)),
}


def diffusers_adapter(kind: str, seed: int = 0) -> DiffusersAdapter:
    return randomize_(DiffusersAdapter(**KINDS[kind][0]), seed).eval()


def hint_for(kind: str, batch: int = 2, height: int = 13, width: int = 10) -> torch.Tensor:
    """A hint of `height` x `width` latent pixels: odd sizes, so every average pool rounds up."""
    config = KINDS[kind][1]
    scale = config.unshuffle
    return torch.rand(batch, config.in_channels, height * scale, width * scale,
                      generator=torch.Generator().manual_seed(1))


def write_tensors(path, sd) -> None:
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, lambda k: sd[k].contiguous())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", ["original", "diffusers"])
@torch.no_grad()
def test_features_match_diffusers_from_both_layouts(tmp_path, kind: str, layout: str) -> None:
    theirs = diffusers_adapter(kind)
    path = tmp_path / "adapter.safetensors"
    if layout == "diffusers":
        write_tensors(path, theirs.state_dict())
    else:  # the original release's names, through our own key map
        write_tensors(path, diffusers_to_original(theirs.state_dict()))
    ours, info = load_t2i_adapter(path, dtype=torch.float32)
    assert info.layout == layout and info.config == KINDS[kind][1]
    assert info.family == ("sdxl" if kind == "full_xl" else "sd1")
    hint = hint_for(kind)
    reference = theirs(hint)
    features = ours(hint)
    assert len(features) == len(reference) == len(info.config.channels)
    for f, r in zip(features, reference, strict=True):
        assert f.shape == r.shape
        assert relative_error(f, r) < TOLERANCE


@pytest.mark.parametrize("kind", list(KINDS))
def test_key_maps_cover_every_parameter_both_ways(kind: str) -> None:
    theirs = DiffusersAdapter(**KINDS[kind][0]).state_dict()
    config = KINDS[kind][1]
    original = diffusers_to_original(theirs)
    assert set(original) == set(T2IAdapter(config).state_dict())
    back = original_to_diffusers(original, config)
    assert set(back) == set(theirs)
    assert all(back[k] is theirs[k] for k in theirs)


@pytest.mark.parametrize(("config", "family"), [
    (T2IAdapterConfig("full", 3, (320, 640, 1280, 1280), 2, 8), "sd1"),  # t2iadapter_depth_sd15v2 and the like
    (T2IAdapterConfig("full", 1, (320, 640, 1280, 1280), 2, 8), "sd1"),  # canny/sketch: one channel
    (T2IAdapterConfig("light", 3, (320, 640, 1280, 1280), 4, 8), "sd1"),  # t2iadapter_color_sd14v1
    (T2IAdapterConfig("full", 3, (320, 640, 1280, 1280), 2, 16, True), "sdxl"),  # t2i-adapter-*-sdxl-1.0
    (T2IAdapterConfig("full", 1, (320, 640, 1280, 1280), 2, 16, True), "sdxl"),  # canny/sketch sdxl
])
def test_real_size_files_are_detected_from_shapes(tmp_path, config: T2IAdapterConfig, family: str) -> None:
    """Real-size layouts, on meta tensors (shapes only, nothing allocated)."""
    from diffusion.checkpoints.t2i_adapter_files import T2IAdapterInfo
    from diffusion.checkpoints.t2i_adapter_keys import adapter_config, adapter_state_dict

    with torch.device("meta"):
        sd = T2IAdapter(config).state_dict()
    for stored in (sd, original_to_diffusers(sd, config)):
        ours, _ = adapter_state_dict(stored)
        assert adapter_config(ours) == config
        assert T2IAdapterInfo(config.family, "original", config).family == family
    assert config.total_downscale == (64 if family == "sd1" else 32)


def test_strided_conv_downsample_and_3x3_kernels_are_read(tmp_path) -> None:
    """Files trained with use_conv (down_opt.op) and ksize 3: detected and run as the paper's blocks compute."""
    config = T2IAdapterConfig("full", 3, (8, 16), 2, 8, ksize=3, conv_down=True)
    path = tmp_path / "conv.safetensors"
    sd = write_random_t2i_adapter(path, config, seed=3)
    net, info = load_t2i_adapter(path, dtype=torch.float32)
    assert info.config == config
    hint = torch.rand(1, 3, 32, 24)
    conv = torch.nn.functional.conv2d

    def block(x, k):
        if f"body.{k}.down_opt.op.weight" in sd:
            x = conv(x, sd[f"body.{k}.down_opt.op.weight"], sd[f"body.{k}.down_opt.op.bias"], stride=2, padding=1)
        if f"body.{k}.in_conv.weight" in sd:
            x = conv(x, sd[f"body.{k}.in_conv.weight"], sd[f"body.{k}.in_conv.bias"], padding=1)
        h = conv(x, sd[f"body.{k}.block1.weight"], sd[f"body.{k}.block1.bias"], padding=1).relu()
        return x + conv(h, sd[f"body.{k}.block2.weight"], sd[f"body.{k}.block2.bias"], padding=1)

    x = conv(torch.nn.functional.pixel_unshuffle(hint, 8), sd["conv_in.weight"], sd["conv_in.bias"], padding=1)
    expected = []
    for level in range(2):
        for j in range(2):
            x = block(x, level * 2 + j)
        expected.append(x)
    with torch.no_grad():
        for f, e in zip(net(hint), expected, strict=True):
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_files_that_are_not_adapters_are_refused(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    write_tensors(path, {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="not a T2I-Adapter"):
        load_t2i_adapter(path)
    bad = random_t2i_adapter(T2IAdapterConfig("full", 3, (8, 16), 2, 8))
    bad["conv_in.weight"] = torch.zeros(8, 100, 3, 3)  # 100 input channels: no hint/unshuffle gives that
    write_tensors(path, bad)
    with pytest.raises(CheckpointError, match="reads 100 channels"):
        load_t2i_adapter(path)
    good = random_t2i_adapter(T2IAdapterConfig("full", 3, (8, 16), 2, 8))
    del good["body.3.block2.bias"]
    write_tensors(path, good)
    with pytest.raises(CheckpointError, match="missing"):
        load_t2i_adapter(path)


def test_pickled_adapter_wrapped_under_adapter_loads_safely(tmp_path) -> None:
    config = T2IAdapterConfig("light", 3, (8, 16), 2, 8)
    sd = random_t2i_adapter(config, seed=2)
    path = tmp_path / "t2iadapter_color_sd14v1.pth"
    torch.save({"adapter": sd, "step": 3}, path)
    net, info = load_t2i_adapter(path, dtype=torch.float32)
    assert info.config == config and info.layout == "original"
    assert [tuple(f.shape) for f in net(torch.rand(1, 3, 16, 16))] == [(1, 8, 2, 2), (1, 16, 1, 1)]
    torch.save({"adapter": sd, "evil": torch.nn.ReLU()}, path)  # needs code to unpickle: refused
    with pytest.raises(CheckpointError, match="refused"):
        load_t2i_adapter(path)


def test_config_for_unet_and_build_from_weights() -> None:
    config = config_for_unet(16, (1, 2, 2), xl=True)
    assert config.channels == (16, 32, 32, 32) and config.xl and config.unshuffle == 16
    sd = random_t2i_adapter(config)
    from diffusion.checkpoints.t2i_adapter_files import T2IAdapterInfo

    net = build_t2i_adapter(sd, T2IAdapterInfo("sdxl", "original", config), dtype=torch.float32)
    out = net(torch.rand(1, 3, 64, 48))
    assert [tuple(f.shape) for f in out] == [(1, 16, 4, 3), (1, 32, 4, 3), (1, 32, 2, 2), (1, 32, 2, 2)]
