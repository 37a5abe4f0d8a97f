"""Family detection: every family our writer makes (tiny files), eps vs v, inpainting, forced prediction,
the real-size key/shape maps of all families, and the errors for what is not a usable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion.checkpoints.families import CONFIG_METADATA_KEY, SD2_V_PROBE, FamilyError, detect_family
from diffusion.checkpoints.files import read_metadata, read_state_dict
from diffusion.checkpoints.random_checkpoints import checkpoint_spec, layout_shapes, write_random_checkpoint
from diffusion.models.unet import UNetConfig
from diffusion.models.vae import VAEConfig

CASES = [
    ("sd1", False, "eps"),
    ("sd1", True, "eps"),
    ("sd2", False, "eps"),
    ("sd2", False, "v"),
    ("sdxl", False, "eps"),
    ("sdxl", False, "v"),
    ("sdxl_refiner", False, "eps"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    out = {}
    for family, inpaint, prediction in CASES:
        path = folder / f"{family}-{inpaint}-{prediction}.safetensors"
        write_random_checkpoint(path, family, inpaint=inpaint, prediction=prediction, seed=3)
        out[family, inpaint, prediction] = path
    return out


@pytest.mark.parametrize(("family", "inpaint", "prediction"), CASES)
def test_tiny_checkpoints_are_detected(files, family, inpaint, prediction):
    path = files[family, inpaint, prediction]
    found = detect_family(read_state_dict(path), read_metadata(path))
    spec = checkpoint_spec(family, "tiny", inpaint=inpaint)
    assert (found.name, found.inpaint, found.prediction) == (family, inpaint, prediction)
    assert found.unet == spec.unet  # including heads and groups, which only the metadata tells
    assert found.vae == spec.vae
    assert found.clip_heads == spec.clip_heads
    assert found.text_family == family
    assert found.latent_channels == 4
    assert found.scaling_factor == (0.13025 if family.startswith("sdxl") else 0.18215)
    assert found.unet.in_channels == (9 if inpaint else 4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sd2_prediction_from_weights_when_the_file_does_not_say(files, prediction):
    """Without our metadata, ComfyUI's heuristic (spread of one norm bias) decides."""
    sd = read_state_dict(files["sd2", False, prediction])
    assert detect_family(sd, None).prediction == prediction
    std = sd[SD2_V_PROBE].float().std().item()
    assert (std > 0.09) == (prediction == "v")


def test_sdxl_v_from_the_marker_key(files):
    sd = read_state_dict(files["sdxl", False, "v"])
    assert "v_pred" in sd
    assert detect_family(sd, None).prediction == "v"
    sd.pop("v_pred")
    assert detect_family(sd, None).prediction == "eps"


@pytest.mark.parametrize("forced", ["eps", "v"])
def test_prediction_can_be_forced(files, forced):
    for key in [("sd2", False, "v"), ("sd1", False, "eps"), ("sdxl", False, "v")]:
        path = files[key]
        assert detect_family(read_state_dict(path), read_metadata(path), prediction=forced).prediction == forced
    with pytest.raises(ValueError, match="prediction must be"):
        detect_family(read_state_dict(files["sd1", False, "eps"]), prediction="x0")


REAL = {
    "sd1": UNetConfig.sd1(),
    "sd2": UNetConfig.sd2(),
    "sdxl": UNetConfig.sdxl(),
    "sdxl_refiner": UNetConfig.sdxl_refiner(),
}


@pytest.mark.parametrize("family", sorted(REAL))
@pytest.mark.parametrize("inpaint", [False, True])
def test_real_size_layouts_are_detected_from_shapes(family, inpaint):
    """The full key -> shape map of each released family (built on the meta device, nothing written)."""
    sd = layout_shapes(family, "real", inpaint=inpaint)
    found = detect_family(sd)
    expected_unet = REAL[family] if not inpaint else UNetConfig(**{**REAL[family].__dict__, "in_channels": 9})
    assert (found.name, found.inpaint, found.prediction) == (family, inpaint, "eps")
    assert found.unet == expected_unet
    assert found.vae == VAEConfig()
    assert found.clip_heads is None
    assert detect_family(sd, prediction="v").prediction == "v"


def test_real_size_marker_keys_match_diffusers_markers():
    """diffusers recognises single files by a few keys; our real layouts carry them."""
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in layout_shapes("sd1")
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in layout_shapes("sdxl")
    assert layout_shapes("sd2")["cond_stage_model.model.text_projection"].shape == (1024, 1024)
    assert layout_shapes("sd1", inpaint=True)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9


def test_not_a_checkpoint_lists_what_was_found():
    sd = {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1),
          "encoder.x": torch.zeros(1)}
    with pytest.raises(FamilyError) as info:
        detect_family(sd)
    message = str(info.value)
    assert "not a Stable Diffusion checkpoint: found 3 keys with prefixes {'encoder': 2, 'decoder': 1}" in message
    assert "expected model.diffusion_model.*" in message
    assert "standalone VAE" in message


def without(sd: dict, *prefixes: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def test_missing_text_encoder_is_named(files):
    sd = read_state_dict(files["sd1", False, "eps"])
    expected = r"SD1\.x checkpoint without its text encoder: .*cond_stage_model\.transformer"
    with pytest.raises(FamilyError, match=expected):
        detect_family(without(sd, "cond_stage_model."), read_metadata(files["sd1", False, "eps"]))
    sdxl = read_state_dict(files["sdxl", False, "eps"])
    with pytest.raises(FamilyError, match=r"SDXL base .* not clip_g under conditioner\.embedders\.1\.model\."):
        detect_family(without(sdxl, "conditioner.embedders.1."))


def test_missing_vae_is_named(files):
    sd = read_state_dict(files["sd2", False, "eps"])
    with pytest.raises(FamilyError, match=r"SD2\.x checkpoint without a VAE: .*first_stage_model"):
        detect_family(without(sd, "first_stage_model."))


def test_text_encoders_of_another_family_are_reported(files):
    sd1 = read_state_dict(files["sd1", False, "eps"])
    sdxl = read_state_dict(files["sdxl", False, "eps"])
    mixed = {**without(sd1, "cond_stage_model."), **{k: v for k, v in sdxl.items() if k.startswith("conditioner.")}}
    with pytest.raises(FamilyError, match="its text encoders are those of SDXL base"):
        detect_family(mixed)


def test_context_width_must_match_the_text_encoder(files):
    sd1 = read_state_dict(files["sd1", False, "eps"])
    sd = dict(sd1)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    sd[key] = torch.zeros(49408, 24)
    with pytest.raises(FamilyError, match="cross-attention takes 16 channels but the text encoder hidden widths"):
        detect_family(sd)


def test_vae_and_unet_latent_widths_must_agree(files):
    sd = dict(read_state_dict(files["sd1", False, "eps"]))
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(FamilyError, match="VAE makes 8-channel latents but the UNet takes 4"):
        detect_family(sd)


def test_broken_unet_and_bad_metadata(files):
    path = files["sd1", False, "eps"]
    sd = read_state_dict(path)
    with pytest.raises(FamilyError, match=r"do not make a UNet.*middle"):
        detect_family(without(sd, "model.diffusion_model.middle_block."))
    with pytest.raises(FamilyError, match="is not valid JSON"):
        detect_family(sd, {CONFIG_METADATA_KEY: "{oops"})
    meta = json.loads(read_metadata(path)[CONFIG_METADATA_KEY])
    assert meta["unet"] == {"num_heads": 2, "norm_groups": 8}


def renamed(sd: dict, old: str, new: str) -> dict:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}


def test_alternative_text_encoder_prefixes(files):
    """SD2 saved in the SGM layout keeps OpenCLIP under conditioner.embedders.0.model.; older SD1 files
    have no text_model. level under cond_stage_model.transformer."""
    path = files["sd2", False, "eps"]
    sgm = renamed(read_state_dict(path), "cond_stage_model.model.", "conditioner.embedders.0.model.")
    assert detect_family(sgm, read_metadata(path)).name == "sd2"
    path = files["sd1", False, "eps"]
    old = renamed(read_state_dict(path), "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
    assert detect_family(old, read_metadata(path)).name == "sd1"
