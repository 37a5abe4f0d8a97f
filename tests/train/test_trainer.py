"""The model trainer on the tiny spec: it runs, writes an SD1 file our loader reads, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion.checkpoints.files import read_metadata, read_state_dict, write_safetensors
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.models.unet_blocks import CrossAttention
from train import data, shapes
from train.recipe import (
    build_text_encoder,
    build_unet,
    build_vae,
    rescale_latents,
    tiny_spec,
    use_eager_attention,
)
from train.train_model import lr_at, main

TINY = ["--spec", "tiny", "--vae-steps", "4", "--vae-batch", "4", "--latents", "32", "--unet-steps", "5",
        "--decoder-steps", "3", "--sharpen-steps", "2", "--unet-batch", "4", "--log-every", "2", "--save-every", "3"]


def train(tmp_path, name, *extra):
    out = tmp_path / f"{name}.safetensors"
    code = main([*TINY, "--out", str(out), "--state", str(tmp_path / f"{name}.pt"), *extra])
    return out, code


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out, code = train(tmp_path_factory.mktemp("full"), "full")
    assert code == 0
    return out


def test_writes_an_sd1_file_the_loader_reads(uninterrupted):
    loaded = load_checkpoint(uninterrupted)
    spec = tiny_spec()
    assert loaded.family.name == "sd1" and loaded.family.prediction == "eps"
    assert loaded.family.unet == spec.unet and loaded.family.vae == spec.vae and loaded.family.clip_heads == 2
    sd = read_state_dict(uninterrupted)
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd
    assert json.loads(read_metadata(uninterrupted)["latentloom.config"])["unet"]["num_heads"] == 2
    # the written text encoder is the seeded one, token table at std 0.1
    table = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].float()
    assert abs(float(table.std()) - 0.1) < 0.005


@pytest.mark.parametrize("first_run_steps", [2, 7, 10, 13])  # stop inside the VAE / UNet / decoder / sharpening
def test_resume_gives_the_same_weights(tmp_path, uninterrupted, first_run_steps):
    out, code = train(tmp_path, "cut", "--stop-after", str(first_run_steps))
    assert code == 3 and not out.exists() and (tmp_path / "cut.pt").exists()
    out, code = train(tmp_path, "cut", "--resume")
    assert code == 0
    assert out.read_bytes() == uninterrupted.read_bytes()


def test_resume_refuses_other_seed_and_missing_state(tmp_path):
    train(tmp_path, "a", "--stop-after", "1")
    with pytest.raises(SystemExit, match="seed"):
        train(tmp_path, "a", "--resume", "--seed", "5")
    with pytest.raises(SystemExit, match="no training state"):
        train(tmp_path, "missing", "--resume")


def test_decoder_phase_changes_only_the_decoder(tmp_path):
    out, code = train(tmp_path, "nodec", "--decoder-steps", "0")
    assert code == 0
    polished = read_state_dict(train(tmp_path, "dec")[0])
    plain = read_state_dict(out)
    changed = {k for k in plain if not torch.equal(plain[k], polished[k])}
    assert changed and all(k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))
                           for k in changed)


def test_sharpening_from_a_phase_4_checkpoint_gives_the_full_runs_bytes(tmp_path, uninterrupted):
    phases_1_to_4, code = train(tmp_path, "p4", "--sharpen-steps", "0")
    assert code == 0
    assert "sharpen" not in read_metadata(phases_1_to_4)["latentloom.training"]
    out, code = train(tmp_path, "p5", "--from-checkpoint", str(phases_1_to_4))
    assert code == 0
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert "sharpen_steps=2 sharpen_band=3" in read_metadata(out)["latentloom.training"]
    sharpened, plain = read_state_dict(out), read_state_dict(phases_1_to_4)
    changed = {k for k in plain if not torch.equal(plain[k], sharpened[k])}
    assert changed and all(k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))
                           for k in changed)


def test_from_checkpoint_refuses_a_file_of_another_recipe(tmp_path, uninterrupted):
    phases_1_to_4, _ = train(tmp_path, "p4", "--sharpen-steps", "0")
    with pytest.raises(SystemExit, match="metadata"):  # another seed
        train(tmp_path, "other", "--seed", "3", "--from-checkpoint", str(phases_1_to_4))
    with pytest.raises(SystemExit, match="metadata"):  # already sharpened
        train(tmp_path, "again", "--from-checkpoint", str(uninterrupted))
    sd = read_state_dict(phases_1_to_4)
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    sd[key] = sd[key] + 1.0  # right metadata, but a text encoder this seed does not make
    tampered = tmp_path / "tampered.safetensors"
    write_safetensors(tampered, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, sd.__getitem__,
                      read_metadata(phases_1_to_4))
    with pytest.raises(SystemExit, match=r"1 tensors differ.*final_layer_norm"):
        train(tmp_path, "tampered", "--from-checkpoint", str(tampered))
    with pytest.raises(SystemExit, match="no file"):
        train(tmp_path, "missing", "--from-checkpoint", str(tmp_path / "nope.safetensors"))


def test_band_weights_count_the_edge_on_both_sides():
    weights = torch.ones(1, 1, 9, 9)
    weights[..., 3:6, 3:6] = data.FOREGROUND_WEIGHT
    banded = data.band_weights(weights, 1)
    assert torch.equal(data.band_weights(weights, 0), weights)
    assert float(banded[0, 0, 2, 2]) == data.FOREGROUND_WEIGHT and float(banded[0, 0, 4, 4]) == data.FOREGROUND_WEIGHT
    assert float(banded[0, 0, 1, 4]) == 1.0 and int((banded > 1).sum()) == 25


def test_rescaled_vae_reconstructs_the_same_with_scaled_latents():
    vae = build_vae(tiny_spec(), 0).eval()
    images = data.to_tensor(shapes.batch(0, "train", range(2))[0])
    with torch.no_grad():
        mean, logvar = vae.encode_moments(images)
        decoded = vae.decode(mean)
        rescale_latents(vae, 3.0)
        mean3, logvar3 = vae.encode_moments(images)
        decoded3 = vae.decode(mean3)
    torch.testing.assert_close(mean3, 3 * mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar3, logvar + 2 * torch.log(torch.tensor(3.0)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded3, decoded, rtol=1e-4, atol=1e-4)


def test_eager_attention_matches_the_fused_kernel():
    spec = tiny_spec()
    unet = build_unet(spec, 0)
    torch.nn.init.normal_(unet.out[-1].weight)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 16)
    fused = unet(x, t, ctx)
    use_eager_attention(unet)
    assert all("forward" in vars(m) for m in unet.modules() if isinstance(m, CrossAttention))
    torch.testing.assert_close(unet(x, t, ctx), fused, rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(CrossAttention(8, 2, 4))  # other instances keep the fused kernel


def test_text_encoder_tells_colour_words_apart():
    encoder = data.CaptionEncoder(build_text_encoder(tiny_spec(), 0), num_heads=2)
    red, blue = encoder("a red circle"), encoder("a blue circle")
    assert red.shape == (77, 16) and encoder("a red circle") is red  # cached
    assert not torch.allclose(red, blue)


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)
