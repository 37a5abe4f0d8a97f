"""The bf16 path (what CPUs with native bf16 run) gives the fp32 images within dtype tolerance: a whole txt2img (text
encode, euler with CFG, VAE decode) in bf16 against the same run in fp32, for SD1, SD2-v and SDXL tiny models, no
further from fp32 than measured when it was checked; and GroupNorm32 in bf16 against float32 on activations with a
large mean (where a variance computed in bf16 itself would fail). Faster paths must keep these passing."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.models.unet_blocks import GroupNorm32
from tests.nodes.conftest import Engine
from tests.nodes.test_sd_nodes import txt2img

FAMILIES = {"sd1.safetensors": ("sd1", {}), "sd2-v.safetensors": ("sd2", {"prediction": "v"}),
            "sdxl.safetensors": ("sdxl", {})}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-path-models")
    for name, (family, options) in FAMILIES.items():
        write_random_checkpoint(root / name, family, seed=len(name), **options)
    return root


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def image(tmp_path, model_dir, precision: str, ckpt: str) -> torch.Tensor:
    engine = Engine(tmp_path / precision, model_dir)
    engine.env.precision = precision
    return engine.outputs(txt2img(ckpt=ckpt, steps=4, size=64, cfg=6.0), "8")[0][0]


SLOW = pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="two txt2img runs; set LATENTLOOM_SLOW=1")
# bf16 against fp32 on these tiny random models, measured when the bf16 path was checked (2026-12): 37.8 (SD1), 38.9
# (SD2-v) and 41.5 dB (SDXL). A faster path may not fall below these by more than half a dB.
FLOOR_DB = {"sd1.safetensors": 37.3, "sd2-v.safetensors": 38.4, "sdxl.safetensors": 41.0}


@pytest.mark.parametrize("ckpt", ["sd1.safetensors", pytest.param("sd2-v.safetensors", marks=SLOW),
                                  pytest.param("sdxl.safetensors", marks=SLOW)])
def test_bf16_images_stay_as_close_to_fp32_as_measured(tmp_path, model_dir, ckpt):
    reference = image(tmp_path, model_dir, "fp32", ckpt)
    fast = image(tmp_path, model_dir, "bf16", ckpt)
    assert reference.shape == fast.shape == (1, 64, 64, 3)
    assert float(reference.std()) > 0.02  # an image with content, not a flat one every dtype agrees on
    assert not torch.equal(reference, fast)  # the bf16 path did run
    assert psnr(reference, fast) >= FLOOR_DB[ckpt], f"{ckpt}: {psnr(reference, fast):.1f} dB from fp32"


@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (1, 32, 9, 7)])
def test_bf16_group_norm_matches_float32_within_one_rounding(shape):
    gen = torch.Generator().manual_seed(0)
    norm = GroupNorm32(8, shape[1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=gen))
        norm.bias.copy_(torch.randn(shape[1], generator=gen))
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(shape, generator=gen) * 3 + 200).to(torch.bfloat16)  # large mean, small spread
    expected = F.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float(), 1e-6)
    got = norm(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=2**-7)
