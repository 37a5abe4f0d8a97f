"""What the first image of a process no longer pays for: the 16-bit → 16-bit cast goes through fp32 chunks (same
values as torch's own cast), the preview map is read back from the data directory's cache instead of fitted again,
and transformers is not imported until a text encoder or a CLIP vision tower is built."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.checkpoints import loader
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.preview import PreviewCache, fit_latent_rgb_projection, weights_digest

ROOT = Path(__file__).resolve().parents[2]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Values with every kind of rounding case: normals across the range, subnormals, zeros, infinities, NaN."""
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(5000, generator=gen) * torch.logspace(-6, 4, 5000)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 6e-8, -3e-5, 65504.0, 1e-40])
    return torch.cat([normal, specials]).to(dtype)


@pytest.mark.parametrize(("source", "target"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_half_to_half_cast_gives_torchs_values(monkeypatch, source, target):
    monkeypatch.setattr(loader, "CAST_CHUNK", 1000)  # several chunks and a short last one
    values = special_values(source).reshape(-1, 8)
    got = loader._cast(values, target, torch.device("cpu"))
    expected = values.to(target)
    assert got.dtype == target and got.shape == values.shape
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))  # bit for bit


def test_cast_keeps_file_views_and_casts_other_dtypes():
    view = torch.arange(6, dtype=torch.float16)
    assert loader._cast(view, torch.float16, torch.device("cpu")) is view  # no copy when the dtype is right
    assert loader._cast(view, torch.float32, torch.device("cpu")).dtype == torch.float32
    ints = torch.arange(3)
    assert loader._cast(ints, torch.bfloat16, torch.device("cpu")).dtype == torch.int64


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    return AutoencoderKL(config).eval().requires_grad_(False)


class CountingEncoder:
    """images [B, H, W, 3] -> raw latents through a VAE's encoder mean, counting calls."""

    def __init__(self, vae: AutoencoderKL):
        self.vae, self.calls = vae, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        mean, _ = self.vae.quant_conv(self.vae.encoder(images.movedim(-1, 1) * 2 - 1)).chunk(2, dim=1)
        return mean


def test_preview_map_is_fitted_once_then_read_from_the_cache(tmp_path):
    vae = tiny_vae(0)
    first = CountingEncoder(vae)
    fitted = PreviewCache(tmp_path, vae).projection(first)
    assert first.calls == 1
    assert len(list(tmp_path.glob("latent_rgb_*.json"))) == 1
    again = CountingEncoder(vae)  # a new process: same weights, nothing fitted yet
    read = PreviewCache(tmp_path, vae).projection(again)
    assert again.calls == 0
    assert torch.equal(read.weight, fitted.weight) and torch.equal(read.bias, fitted.bias)
    direct = fit_latent_rgb_projection(CountingEncoder(vae))  # the cached map is the plain fit
    torch.testing.assert_close(read.weight, direct.weight, rtol=1e-5, atol=1e-6)


def test_other_encoder_weights_get_their_own_map(tmp_path):
    a, b = tiny_vae(0), tiny_vae(1)
    assert weights_digest(a) != weights_digest(b)
    decoder_only = tiny_vae(0)
    with torch.no_grad():
        decoder_only.decoder.conv_in.weight.add_(1.0)
    assert weights_digest(decoder_only) == weights_digest(a)  # only the encoder's weights shape the map
    PreviewCache(tmp_path, a).projection(CountingEncoder(a))
    other = CountingEncoder(b)
    PreviewCache(tmp_path, b).projection(other)
    assert other.calls == 1
    assert len(list(tmp_path.glob("latent_rgb_*.json"))) == 2


def test_unreadable_cache_entry_is_fitted_again(tmp_path, caplog):
    vae = tiny_vae(0)
    PreviewCache(tmp_path, vae).projection(CountingEncoder(vae))
    (entry,) = tmp_path.glob("latent_rgb_*.json")
    entry.write_text("{not json")
    encoder = CountingEncoder(vae)
    with caplog.at_level(logging.WARNING, logger="diffusion.preview"):
        projection = PreviewCache(tmp_path, vae).projection(encoder)
    assert encoder.calls == 1 and "unreadable" in caplog.text
    assert projection.weight.shape == (4, 3)
    assert json.loads(entry.read_text())["bias"] == projection.bias.tolist()  # rewritten


def test_engine_modules_do_not_import_transformers_until_a_model_is_built():
    code = ("import sys\n"
            "import diffusion.handles, diffusion.checkpoints.loader, diffusion.models.clip_vision, nodes.loaders\n"
            "assert not [m for m in sys.modules if m.startswith('transformers')], 'imported at start-up'\n"
            "from diffusion.models import transformers_clip\n"
            "from diffusion.models.transformers_clip import clip_classes, start_import\n"
            "nodes.loaders.prefetch_imports()  # what serve calls once it is up\n"
            "thread = transformers_clip._thread\n"
            "assert thread is not None and thread.name == 'import-transformers'\n"
            "start_import()\n"
            "assert transformers_clip._thread is thread  # started once\n"
            "classes = clip_classes()\n"
            "from transformers import CLIPTextModel\n"
            "assert classes.CLIPTextModel is CLIPTextModel and clip_classes() is classes\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
