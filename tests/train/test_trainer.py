"""The model trainer on the tiny spec: it runs, writes an SD1 file our loader reads, and resumes exactly."""

from __future__ import annotations

import json
import types

import pytest
import torch

from diffusion.checkpoints.files import read_metadata, read_state_dict, strip_prefix, write_safetensors
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.models.unet_blocks import CrossAttention
from train import data, shapes
from train.recipe import (
    RECIPES,
    build_text_encoder,
    build_unet,
    build_vae,
    rescale_latents,
    tiny_spec,
    use_eager_attention,
)
from train.train_model import Trainer, lr_at, main, parse_args

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


# ---- recipe v2: the VAE flags ------------------------------------------------------------------------------------
V2 = ["--vae-band", "2", "--vae-edge", "1", "--vae-kl", "1e-05", "--vae-logvar-init", "-6", "--vae-mult", "1,2,2,4",
      "--vae-blocks", "2"]


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory):
    out, code = train(tmp_path_factory.mktemp("v2"), "v2", *V2)
    assert code == 0
    return out


def test_the_readmes_v2_command_writes_the_shipped_files_training_metadata():
    """train/README.md, Recipe v2: the second stage's flags made the shipped file (v1 defaults: the first model)."""
    shipped = read_metadata("models/checkpoints/latentloom-shapes.safetensors")["latentloom.training"]
    stage_2 = ["--recipe", "v2", "--vae-init", "v2-stage1.pt", "--vae-steps", "1200", "--vae-lr", "5e-4",
               "--unet-steps", "3600"]
    assert Trainer.training_metadata(types.SimpleNamespace(args=parse_args(stage_2))) == shipped
    first_model = Trainer.training_metadata(types.SimpleNamespace(args=parse_args([])))
    assert first_model == Trainer.training_metadata(types.SimpleNamespace(args=parse_args(["--recipe", "v1"])))
    assert first_model != shipped and "sharpen_steps=600" in first_model


def test_recipe_v2_sets_its_defaults_and_explicit_flags_win():
    args = parse_args(["--recipe", "v2"])
    assert RECIPES["v2"] and all(getattr(args, k) == v for k, v in RECIPES["v2"].items())
    assert parse_args(["--recipe", "v2", "--vae-band", "0"]).vae_band == 0
    assert parse_args(["--vae-band", "0", "--recipe", "v2"]).vae_band == 0


def test_vae_flags_build_the_vae_the_loader_reads_and_name_it_in_the_metadata(v2_run):
    loaded = load_checkpoint(v2_run)
    assert loaded.family.vae.ch_mult == (1, 2, 2, 4) and loaded.family.vae.num_res_blocks == 2
    assert loaded.family.vae.embed_dim == 4 and loaded.family.vae.downscale == 8  # still SD1's latent space
    metadata = read_metadata(v2_run)["latentloom.training"]
    assert metadata.endswith(" vae_kl=1e-05 vae_band=2 vae_edge=1.0 vae_logvar_init=-6.0 vae_mult=1,2,2,4 "
                             "vae_blocks=2 sharpen_steps=2 sharpen_band=3 sharpen_lr=0.001")


def test_logvar_init_starts_the_posterior_quiet():
    trainer = Trainer(parse_args(["--vae-logvar-init", "-6"]), tiny_spec())
    images = data.to_tensor(shapes.batch(0, "train", range(2))[0])
    with torch.no_grad():
        _, logvar = trainer.vae.encode_moments(images)
    assert float(logvar.mean()) == pytest.approx(-6.0, abs=0.5)
    default = Trainer(parse_args([]), tiny_spec())
    with torch.no_grad():
        _, logvar = default.vae.encode_moments(images)
    assert abs(float(logvar.mean())) < 1.0


# the later phases at one step each: the encoder the flags shape is fixed once the VAE phase ends
VAE_ONLY = ["--unet-steps", "1", "--decoder-steps", "1", "--sharpen-steps", "1"]


def test_vae_flags_change_the_vae(tmp_path, uninterrupted):
    for flag in (["--vae-band", "2"], ["--vae-edge", "1"], ["--vae-kl", "1e-3"], ["--vae-logvar-init", "-6"],
                 ["--vae-small-boost", "4"]):
        out, code = train(tmp_path, "flag", *flag, *VAE_ONLY)
        assert code == 0
        vae = strip_prefix(read_state_dict(out), "first_stage_model.")
        base = strip_prefix(read_state_dict(uninterrupted), "first_stage_model.")
        assert not torch.equal(vae["encoder.conv_in.weight"], base["encoder.conv_in.weight"]), flag


@pytest.mark.parametrize("first_run_steps", [3, 4])  # inside phase 1, and exactly at its end
def test_v2_resume_gives_the_same_weights(tmp_path, v2_run, first_run_steps):
    out, code = train(tmp_path, "cut", *V2, "--stop-after", str(first_run_steps))
    assert code == 3 and not out.exists()
    if first_run_steps == 4:  # a VAE-only run stops before the UNet's first step
        state = torch.load(tmp_path / "cut.pt", weights_only=True)
        assert (state["phase"], state["step"]) == ("unet", 0)
    out, code = train(tmp_path, "cut", *V2, "--resume")
    assert code == 0
    assert out.read_bytes() == v2_run.read_bytes()


def test_resume_refuses_a_state_of_another_vae(tmp_path):
    train(tmp_path, "a", "--stop-after", "1")
    with pytest.raises(SystemExit, match="its VAE is not the one these flags build"):
        train(tmp_path, "a", "--resume", "--vae-mult", "1,2,2,4")


def test_bad_vae_mult_is_refused():
    with pytest.raises(SystemExit, match="needs 4 levels"):
        main([*TINY, "--vae-mult", "1,2", "--out", "x.safetensors"])


def test_edge_loss_prices_a_soft_edge_not_a_flat_offset():
    images = -torch.ones(1, 3, 8, 8)
    images[..., 4:] = 1.0  # a vertical edge
    ones = torch.ones(1, 1, 8, 8)
    assert float(data.edge_loss(images, images, ones)) == 0.0
    assert float(data.edge_loss(images + 0.3, images, ones)) == pytest.approx(0.0, abs=1e-6)
    soft = images.clone()
    soft[..., 3], soft[..., 4] = -1 / 3, 1 / 3  # the same edge blurred over 3 pixels
    assert float(data.edge_loss(soft, images, ones)) > 0.1
    weighted = ones.clone()
    weighted[..., 4:] = 5.0  # the weight of a difference is the larger of its two pixels'
    assert float(data.edge_loss(soft, images, weighted)) > 3 * float(data.edge_loss(soft, images, ones))


def test_vae_init_starts_phase_1_from_a_checkpoints_vae(tmp_path, uninterrupted):
    out, code = train(tmp_path, "init", "--vae-init", str(uninterrupted), "--vae-steps", "0", "--decoder-steps", "0",
                      "--sharpen-steps", "0")
    assert code == 0
    init, got = read_state_dict(uninterrupted), read_state_dict(out)
    encoder = [k for k in init if k.startswith("first_stage_model.encoder.")]
    assert encoder and all(torch.equal(init[k], got[k]) for k in encoder)
    assert f"vae_init={uninterrupted}" in read_metadata(out)["latentloom.training"]
    fresh, code = train(tmp_path, "fresh", "--vae-steps", "0", "--decoder-steps", "0", "--sharpen-steps", "0")
    assert not torch.equal(read_state_dict(fresh)[encoder[0]], init[encoder[0]])


def test_vae_init_refuses_a_missing_file_and_another_vae(tmp_path, uninterrupted):
    with pytest.raises(SystemExit, match="no file at"):
        train(tmp_path, "x", "--vae-init", str(tmp_path / "missing.safetensors"))
    with pytest.raises(SystemExit, match="its VAE is not the one these flags build"):
        train(tmp_path, "x", "--vae-init", str(uninterrupted), "--vae-mult", "1,2,2,4")


def test_small_shape_boost_gives_small_shapes_the_weight_of_large_ones():
    shape = torch.ones(2, 1, 64, 64)
    shape[0, :, :10, :10] = data.FOREGROUND_WEIGHT  # 100 pixels: boosted 4x (600 / 100 = 6, clamped to 4)
    shape[1, :, :30, :30] = data.FOREGROUND_WEIGHT  # 900 pixels: not boosted
    boosted = data.small_shape_boost(shape, shape, 4.0)
    assert float(boosted[0, 0, 0, 0]) == pytest.approx(1 + 4 * (data.FOREGROUND_WEIGHT - 1))
    assert float(boosted[0, 0, 50, 50]) == 1.0  # the background keeps its weight
    assert torch.equal(boosted[1], shape[1])
    banded = data.band_weights(shape, 2)  # the area is the shape's, not the band's
    assert float(data.small_shape_boost(banded, shape, 8.0)[0, 0, 11, 11]) == pytest.approx(1 + 6 * 4)


def test_recipe_v2_needs_the_vae_it_continues(tmp_path):
    with pytest.raises(SystemExit, match="--vae-init"):
        train(tmp_path, "v2", "--recipe", "v2")


def test_recipe_v2_continues_the_given_vae_with_its_losses(tmp_path, uninterrupted):
    out, code = train(tmp_path, "v2", "--recipe", "v2", "--vae-init", str(uninterrupted), "--vae-steps", "2")
    assert code == 0
    metadata = read_metadata(out)["latentloom.training"]
    assert f"vae_lr=0.001 vae_band=2 vae_edge=3.0 vae_small_boost=4.0 vae_init={uninterrupted}" in metadata


def test_vae_init_reads_a_training_state_too(tmp_path):
    _, code = train(tmp_path, "stage1", "--stop-after", "4")  # TINY's 4 VAE steps: stops at the end of phase 1
    assert code == 3
    state = torch.load(tmp_path / "stage1.pt", weights_only=True)
    assert (state["phase"], state["step"]) == ("unet", 0)
    out, code = train(tmp_path, "stage2", "--vae-init", str(tmp_path / "stage1.pt"), "--vae-steps", "0",
                      "--decoder-steps", "0", "--sharpen-steps", "0")
    assert code == 0
    got = read_state_dict(out)
    encoder = [k for k in state["vae"] if k.startswith("encoder.")]
    assert all(torch.equal(got["first_stage_model." + k], state["vae"][k].half()) for k in encoder)
