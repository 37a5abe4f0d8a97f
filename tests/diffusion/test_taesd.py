"""TAESD-style tiny decoders: the file layout, the preview image, how a checkpoint finds its decoder, and the
shipped decoder of the demo model against the demo model's own VAE."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch

from diffusion.checkpoints.files import CheckpointError
from diffusion.models.taesd import TinyDecoder, load_tiny_decoder, write_tiny_decoder
from diffusion.preview import tiny_decoder_names, tiny_decoder_preview_image, tiny_decoder_rgb
from nodes.environment import Environment

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "vae_approx" / "latentloom-shapes_taesd_decoder.safetensors"
DEMO = REPO / "models" / "checkpoints" / "latentloom-shapes.safetensors"


def random_decoder(width: int = 64, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(4, width).eval()


def test_a_decoder_has_taesds_key_layout_and_size():
    sd = random_decoder().state_dict()
    # TAESD's decoder file: Clamp at 0, conv 1, ReLU 2, Blocks 3-5, Upsample 6, conv 7 (no bias), ..., conv 19
    for key in ("1.weight", "1.bias", "3.conv.0.weight", "3.conv.2.bias", "3.conv.4.weight", "7.weight",
                "12.weight", "17.weight", "18.conv.4.bias", "19.weight", "19.bias"):
        assert key in sd, key
    assert "7.bias" not in sd and "0.weight" not in sd and not any(k.startswith(("6.", "11.", "16.")) for k in sd)
    assert tuple(sd["1.weight"].shape) == (64, 4, 3, 3) and tuple(sd["19.weight"].shape) == (3, 64, 3, 3)
    assert sum(v.numel() for v in sd.values()) == 1_222_531  # the published decoder's parameter count


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_decoder_file_loads_and_decodes_x8(tmp_path, suffix):
    model = random_decoder(width=16, seed=3)
    path = tmp_path / f"taesd_decoder{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        write_tiny_decoder(path, model, dtype=torch.float32)
    loaded = load_tiny_decoder(path)
    assert loaded.width == 16 and loaded.latent_channels == 4
    latent = torch.randn(2, 4, 5, 7)
    out = loaded(latent)
    assert out.shape == (2, 3, 40, 56) and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(latent), atol=1e-5, rtol=1e-4)
    # the soft clamp keeps wild latents (early steps) in range: the output of 100x the latent stays finite, bounded
    assert loaded(latent * 100).abs().max() < loaded(torch.full_like(latent, 3.0)).abs().max() * 10 + 10


def test_files_that_are_not_decoders_are_clear_errors(tmp_path):
    encoder_like = tmp_path / "taesd_encoder.safetensors"
    write_tiny_decoder(encoder_like, random_decoder(width=8))
    sd = load_tiny_decoder(encoder_like).state_dict()
    from diffusion.checkpoints.files import write_safetensors
    # TAESD's encoder: conv 0 from RGB, no conv 1
    renamed = {("0.weight" if k == "1.weight" else k): (v[:, :3] if k == "1.weight" else v) for k, v in sd.items()}
    write_safetensors(encoder_like, {k: (v.dtype, tuple(v.shape)) for k, v in renamed.items()}, renamed.__getitem__)
    with pytest.raises(CheckpointError, match=r"taesd_encoder\.safetensors: not a TAESD decoder \(a TAESD encoder"):
        load_tiny_decoder(encoder_like)
    cut = tmp_path / "cut.safetensors"
    partial = {k: v for k, v in sd.items() if not k.startswith("19.")}
    write_safetensors(cut, {k: (v.dtype, tuple(v.shape)) for k, v in partial.items()}, partial.__getitem__)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a TAESD decoder of width 8"):
        load_tiny_decoder(cut)
    evil = tmp_path / "evil.pth"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({"1.weight": Boom()}))
    with pytest.raises(CheckpointError):
        load_tiny_decoder(evil)


def test_preview_image_is_x8_and_large_latents_are_pooled_first():
    decoder = random_decoder(width=8)
    image = tiny_decoder_preview_image(torch.randn(1, 4, 8, 12), decoder)
    assert image.size == (96, 64) and image.mode == "RGB"
    rgb = tiny_decoder_rgb(torch.randn(4, 128, 64), decoder, max_latent=32)
    assert rgb.shape == (256, 128, 3) and rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(ValueError, match="C = 4"):
        tiny_decoder_preview_image(torch.randn(1, 16, 8, 8), decoder)


def test_a_checkpoint_finds_its_own_decoder_then_its_familys(tmp_path, caplog):
    assert tiny_decoder_names("sdxl", "x")[:2] == ["x_taesd_decoder.safetensors", "x_taesd_decoder.pth"]
    assert tiny_decoder_names("sdxl", "x")[2:] == ["taesdxl_decoder.safetensors", "taesdxl_decoder.pth"]
    assert tiny_decoder_names("sd2")[0] == "taesd_decoder.safetensors" and tiny_decoder_names("flux") == []
    env = Environment(tmp_path / "data")
    folder = env.models_dir / "vae_approx"
    folder.mkdir(parents=True)
    write_tiny_decoder(folder / "taesd_decoder.safetensors", random_decoder(width=8))
    write_tiny_decoder(folder / "mine_taesd_decoder.safetensors", random_decoder(width=16))
    assert env.preview_decoder("sd1", "other")().width == 8
    assert env.preview_decoder("sd1", "mine")().width == 16
    assert env.preview_decoder("sdxl", "mine")().width == 16
    env.preview_method = "latent2rgb"
    assert env.preview_decoder("sd1", "mine") is None
    env.preview_method = "taesd"
    with caplog.at_level(logging.WARNING):
        assert env.preview_decoder("sdxl", "other") is None
    assert "no tiny decoder for 'other'" in caplog.text and "taesdxl_decoder.safetensors" in caplog.text


def test_the_demo_model_finds_the_shipped_decoder_from_an_empty_data_directory(tmp_path):
    env = Environment(tmp_path / "data")
    assert SHIPPED.is_file() and SHIPPED.stat().st_size <= 1_000_000
    assert env.preview_decoder("sd1", DEMO.stem)().width == 32


@torch.no_grad()
def test_the_shipped_decoder_matches_the_demo_vae_on_demo_latents():
    from diffusion.checkpoints.loader import load_checkpoint
    from train import data, shapes
    from train.recipe import SCALING_FACTOR

    vae = load_checkpoint(DEMO, dtype=torch.float32).vae.eval()
    images, _ = shapes.batch(12345, "test", range(24))  # a draw the decoder was not trained on
    z = vae.encode(data.to_tensor(images)) * SCALING_FACTOR
    target = ((vae.decode(z / SCALING_FACTOR) + 1) / 2).clamp(0, 1)
    shipped = load_tiny_decoder(SHIPPED)
    error = (shipped(z).clamp(0, 1) - target).abs().mean().item() * 255
    untrained = (random_decoder(width=32)(z).clamp(0, 1) - target).abs().mean().item() * 255
    assert error < 8.0, f"shipped decoder is {error:.1f}/255 off the VAE"
    assert untrained > 3 * error


def test_the_preview_budget_skips_frames_of_a_slow_previewer():
    from diffusion.preview import PreviewBudget

    now = [0.0]
    budget = PreviewBudget(share=0.1, idle=5.0, clock=lambda: now[0])
    made = 0
    for _ in range(20):  # steps of 1 s; each preview takes 0.3 s: the first free, then a third fit in 10 %
        now[0] += 1.0
        if budget.allows():
            made += 1
            budget.spend(0.3)
    assert made == 8  # at 1 (warm-up), 2, 3, 6, 9, 12, 15, 18 s
    now[0] += 60  # a new run starts afresh: its first frame is made at once
    assert budget.allows()
    cheap = PreviewBudget(share=0.1, clock=lambda: now[0])
    for _ in range(20):  # a previewer at 5 % of a step makes every frame
        now[0] += 1.0
        assert cheap.allows()
        cheap.spend(0.05)


def test_the_trainer_resumes_to_the_same_weights(tmp_path):
    from train.train_taesd import main

    common = ["--base", str(DEMO), "--images", "16", "--batch", "2", "--steps", "4", "--width", "8",
              "--log-every", "100"]
    assert main([*common, "--state", str(tmp_path / "a.pt"), "--out", str(tmp_path / "a.safetensors")]) == 0
    b = ["--state", str(tmp_path / "b.pt"), "--out", str(tmp_path / "b.safetensors")]
    assert main([*common, *b, "--stop-after", "2"]) == 3 and not (tmp_path / "b.safetensors").exists()
    assert main([*common, *b, "--resume"]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert load_tiny_decoder(tmp_path / "b.safetensors").width == 8
