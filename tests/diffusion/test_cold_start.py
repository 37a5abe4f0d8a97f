"""What the first image of a process no longer pays for: the 16-bit → 16-bit cast goes through fp32 chunks (same
values as torch's own cast), the preview map is read back from the data directory's cache instead of fitted again,
and transformers is never imported by a text-to-image run (the text encoders are our own CLIP; only a CLIP vision
tower imports transformers, when it is built)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.checkpoints import loader
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
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


def run_python(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_transformers_clip_imports_once_when_a_vision_tower_asks():
    run_python("import sys\n"
               "import diffusion.handles, diffusion.checkpoints.loader, diffusion.models.clip_vision, nodes.loaders\n"
               "assert not [m for m in sys.modules if m.startswith('transformers')], 'imported at start-up'\n"
               "from diffusion.models import transformers_clip\n"
               "from diffusion.models.transformers_clip import clip_classes, start_import\n"
               "start_import()\n"
               "thread = transformers_clip._thread\n"
               "assert thread is not None and thread.name == 'import-transformers'\n"
               "start_import()\n"
               "assert transformers_clip._thread is thread  # started once\n"
               "classes = clip_classes()\n"
               "from transformers import CLIPVisionModelWithProjection\n"
               "assert classes.CLIPVisionModelWithProjection is CLIPVisionModelWithProjection\n"
               "assert clip_classes() is classes\n")


def test_text_to_image_never_imports_transformers(tmp_path):
    """ComfyUI's default graph (checkpoint loader, two CLIPTextEncode, KSampler, VAEDecode, SaveImage) on a tiny SD1
    checkpoint, in a fresh process, as a server runs it: transformers is in sys.modules neither before nor after."""
    models = tmp_path / "models"
    models.mkdir()
    write_random_checkpoint(models / "sd1.safetensors", "sd1", seed=3)
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.2) circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "cold"}},
    }
    run_python("import json, sys\n"
               "from pathlib import Path\n"
               "from graph.executor import Executor\n"
               "from graph.validation import validate_prompt\n"
               "from nodes import build_registry\n"
               "from nodes.environment import Environment\n"
               f"data, models = Path({str(tmp_path / 'data')!r}), Path({str(models)!r})\n"
               "env = Environment(data, extra_model_dirs={'checkpoints': [models]})\n"
               "env.ensure_dirs()\n"
               "registry = build_registry(env, plugins=False)\n"
               "assert 'transformers' not in sys.modules, 'imported by the registry'\n"
               f"validation = validate_prompt(json.loads({json.dumps(json.dumps(graph))}), registry, env)\n"
               "assert validation.ok, validation.response()\n"
               "result = Executor(env=env).execute(validation.prompt, 'p', lambda event, data: None)\n"
               "assert result.status == 'success', result.error\n"
               "assert list(env.output_dir.glob('cold_*.png')), 'no image written'\n"
               "imported = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
               "assert not imported, imported[:5]\n")
