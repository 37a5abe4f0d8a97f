"""Loading, saving and merging nodes on tiny random checkpoints: a merged checkpoint saved and loaded back holds the
hand-computed merge, per-block ratios reach the right keys, an extracted LoRA reproduces the LoRA it came from,
parts saved as separate files load back through UNETLoader / CLIPLoader / DualCLIPLoader, `.latent` files as
ComfyUI writes them, configs checked against the detected family, and errors that name the node, file and folder."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.checkpoints.files import read_metadata
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint, write_random_vae
from diffusion.checkpoints.unet_keys import diffusers_to_original_unet_keys
from diffusion.patches.lora import kohya_unet_names, lora_patches
from diffusion.patches.patcher import LoraDelta, ModelPatcher
from nodes import loaders, merging, model_io
from tests.nodes.conftest import Engine

F32 = torch.float32


@pytest.fixture
def eng(tmp_path, model_dir, monkeypatch):
    """An engine whose models load in float32 (hand-computed references agree to float32 rounding), with a second
    SD1 checkpoint and a kohya LoRA for it in its data folder."""
    engine = Engine(tmp_path / "data", model_dir)
    engine.env.precision = "fp32"  # --force-fp32
    write_random_checkpoint(engine.env.models_dir / "checkpoints" / "sd1-b.safetensors", "sd1", seed=99)
    return engine


def ctx(engine: Engine) -> types.SimpleNamespace:
    return types.SimpleNamespace(env=engine.env)


def handles(engine: Engine, name: str):
    return loaders.load_checkpoint_handles(engine.env, name)


LINEAR = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def write_lora(engine: Engine, model, name: str = "l.safetensors", seed: int = 5) -> torch.Tensor:
    """A kohya LoRA on one UNet layer and one text-encoder layer; returns the UNet layer's ΔW."""
    weight = model.patcher.model.get_parameter(LINEAR)
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.randn(weight.shape[0], 2, generator=gen), torch.randn(2, weight.shape[1], generator=gen)
    layer = kohya_unet_names(model.family.unet, [LINEAR])[LINEAR.rsplit(".", 1)[0]]
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {f"{layer}.lora_up.weight": up, f"{layer}.lora_down.weight": down, f"{layer}.alpha": torch.tensor(2.0),
               f"{te}.lora_up.weight": torch.randn(16, 1, generator=gen),
               f"{te}.lora_down.weight": torch.randn(1, 16, generator=gen)}
    save_file(tensors, str(engine.env.models_dir / "loras" / name))
    return up @ down


def only_file(folder):
    files = sorted(folder.iterdir())
    assert len(files) == 1, files
    return files[0]


def test_merged_lora_patched_checkpoint_saved_and_loaded_back_equals_the_hand_merge(eng):
    model_a, _, _ = handles(eng, "sd1.safetensors")
    delta = write_lora(eng, model_a)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1-b.safetensors"}},
        "3": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "l.safetensors",
                                                     "strength_model": 0.5, "strength_clip": 1.0}},
        "4": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["3", 0], "model2": ["2", 0], "ratio": 0.3}},
        "5": {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.6}},
        "6": {"class_type": "CheckpointSave", "inputs": {"model": ["4", 0], "clip": ["5", 0], "vae": ["2", 2],
                                                         "filename_prefix": "checkpoints/merged"}},
    }
    eng.run(prompt)
    saved = only_file(eng.env.output_dir / "checkpoints")
    assert saved.name == "merged_00001_.safetensors"
    a = load_checkpoint(eng.env.find_model("checkpoints", "sd1.safetensors"), dtype=F32)
    b = load_checkpoint(eng.env.find_model("checkpoints", "sd1-b.safetensors"), dtype=F32)
    merged = load_checkpoint(saved)
    assert merged.family.title == a.family.title
    wa, wb = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
    spread = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    for key, value in merged.unet.named_parameters():
        lora = 0.5 * delta if key == LINEAR else 0.0
        torch.testing.assert_close(value, 0.3 * (wa[key] + lora) + 0.7 * wb[key], rtol=1e-5, atol=1e-5)
    assert float((0.5 * delta).abs().max()) > 0.1 * spread  # the LoRA's part is far above the tolerance
    ta = a.text.encoders["l"].model.state_dict()
    tb = b.text.encoders["l"].model.state_dict()
    for key, value in merged.text.encoders["l"].model.state_dict().items():
        if value.dtype.is_floating_point and "q_proj" not in key:
            torch.testing.assert_close(value, 0.6 * ta[key] + 0.4 * tb[key], rtol=1e-5, atol=1e-5)
    for key, value in merged.vae.state_dict().items():
        assert torch.equal(value, b.vae.state_dict()[key]), key
    metadata = read_metadata(saved)
    assert metadata["modelspec.predict_key"] == "epsilon" and "prompt" in metadata
    # the inputs are untouched: loading sd1 again in the same engine gives its own weights
    model_again, _, _ = handles(eng, "sd1.safetensors")
    assert torch.equal(model_again.patcher.patched_weight(LINEAR), wa[LINEAR])


def test_block_merges_hit_their_keys_sd1_and_sdxl(eng):
    a, _, _ = handles(eng, "sd1.safetensors")
    b, _, _ = handles(eng, "sd1-b.safetensors")
    ratios = {name: 1.0 for name in merging.SD_BLOCKS} | {"input_blocks.1.": 0.0, "out.": 0.25}
    (merged,) = merging.ModelMergeSD1().execute(a, b, **ratios)
    for key, _ in a.patcher.model.named_parameters():
        wa, wb = a.patcher.patched_weight(key), b.patcher.patched_weight(key)
        r = 0.0 if key.startswith("input_blocks.1.") else 0.25 if key.startswith("out.") else 1.0
        torch.testing.assert_close(merged.patcher.patched_weight(key), r * wa + (1 - r) * wb, rtol=1e-6, atol=1e-6)
    (blocks,) = merging.ModelMergeBlocks().execute(a, b, input=1.0, middle=1.0, out=0.0)
    assert torch.equal(blocks.patcher.patched_weight("output_blocks.0.0.in_layers.2.weight"),
                       b.patcher.patched_weight("output_blocks.0.0.in_layers.2.weight").float())
    assert torch.equal(blocks.patcher.patched_weight("time_embed.0.weight"),  # no prefix: the first ratio, input
                       a.patcher.patched_weight("time_embed.0.weight").float())
    write_random_checkpoint(eng.env.models_dir / "checkpoints" / "sdxl-b.safetensors", "sdxl", seed=98)
    xa, _, _ = handles(eng, "sdxl.safetensors")
    xb, _, _ = handles(eng, "sdxl-b.safetensors")
    ratios = {name: 1.0 for name in merging.SDXL_BLOCKS} | {"output_blocks.4": 0.0}
    (xm,) = merging.ModelMergeSDXL().execute(xa, xb, **ratios)
    changed = [k for k, _ in xa.patcher.model.named_parameters()
               if not torch.equal(xm.patcher.patched_weight(k), xa.patcher.patched_weight(k).float())]
    assert changed and all(k.startswith("output_blocks.4.") for k in changed)
    linear = types.SimpleNamespace(patcher=ModelPatcher(torch.nn.Linear(2, 2), "cpu"))
    with pytest.raises(ValueError, match="ModelMergeSimple: the two models have no weight in common"):
        merging.ModelMergeSimple().execute(a, linear, 0.5)


def test_lora_extracted_from_a_model_minus_itself_reproduces_the_lora(eng):
    c = ctx(eng)
    model, clip, _ = handles(eng, "sd1.safetensors")
    write_lora(eng, model)
    tuned, tuned_clip = loaders.LoraLoader().execute(model, clip, "l.safetensors", 0.7, 1.0, context=c)
    (diff,) = merging.ModelMergeSubtract().execute(tuned, model, 1.0)
    (clip_diff,) = merging.CLIPMergeSubtract().execute(tuned_clip, clip, 1.0)
    merging.LoraSave().execute("loras/extracted", 64, "standard", True, model_diff=diff, text_encoder_diff=clip_diff,
                               context=c)
    saved = only_file(eng.env.output_dir / "loras")
    tensors = load_file(str(saved))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    params = [n for n, _ in model.patcher.model.named_parameters()]
    patches = lora_patches(tensors, unet_config=model.family.unet, unet_param_names=params, text_encoders=clip.text)
    assert not patches.unmatched and set(patches.unet) == {LINEAR}
    extracted = patches.unet[LINEAR]
    assert isinstance(extracted, LoraDelta)
    expected = tuned.patcher.patched_weight(LINEAR) - model.patcher.patched_weight(LINEAR)
    scale = float(expected.abs().max())
    torch.testing.assert_close(extracted.delta(torch.device("cpu")), expected, rtol=0, atol=2e-3 * scale)
    (q_key,) = patches.text["l"]
    te_expected = tuned_clip.patchers["l"].patched_weight(q_key) - clip.patchers["l"].patched_weight(q_key)
    te_scale = float(te_expected.abs().max())
    torch.testing.assert_close(patches.text["l"][q_key].delta(torch.device("cpu")), te_expected, rtol=0,
                               atol=2e-3 * te_scale)
    merging.LoraSave().execute("loras/low", 1, "standard", False, model_diff=diff, context=c)  # rank 1 of rank 2
    low = lora_patches(load_file(str(next((eng.env.output_dir / "loras").glob("low_*")))),
                       unet_config=model.family.unet, unet_param_names=params).unet[LINEAR]
    assert low.rank == 1 and float((low.delta(torch.device("cpu")) - expected).abs().max()) > 1e-2 * scale


def test_parts_saved_as_files_load_back_through_the_part_loaders(eng):
    c = ctx(eng)
    for family, name in (("sd1", "sd1.safetensors"), ("sd2", "sd2-v.safetensors"), ("sdxl", "sdxl.safetensors")):
        model, clip, vae = handles(eng, name)
        merging.ModelSave().execute(model, f"diffusion_models/{family}", context=c)
        merging.CLIPSave().execute(clip, f"clip/{family}", context=c)
        merging.VAESave().execute(vae, f"vae/{family}", context=c)
    models = eng.env.models_dir
    for folder, target in (("diffusion_models", "unet"), ("clip", "clip"), ("vae", "vae")):
        for path in (eng.env.output_dir / folder).iterdir():
            path.rename(models / target / path.name)  # the legacy folder names are searched too
    sd2_model, sd2_clip, _ = handles(eng, "sd2-v.safetensors")
    (unet,) = model_io.UNETLoader().execute("sd2_00001_.safetensors", "default", context=c)
    assert unet.family.name == "sd2" and unet.model_sampling.prediction == "v_prediction"
    for key, value in unet.patcher.model.named_parameters():
        assert torch.equal(value, sd2_model.patcher.patched_weight(key)), key
    (clip_h,) = model_io.CLIPLoader().execute("sd2_clip_h_00001_.safetensors", "stable_diffusion", context=c)
    assert clip_h.text.family == "sd2"
    torch.testing.assert_close(clip_h.encode("a red circle")[0], sd2_clip.encode("a red circle")[0])
    assert "sd2_00001_.safetensors" in model_io.UNETLoader.info(eng.env)["input"]["required"]["unet_name"][0]
    (refiner_clip,) = model_io.CLIPLoader().execute("sdxl_clip_g_00001_.safetensors", "stable_diffusion", context=c)
    assert refiner_clip.text.family == "sdxl_refiner"  # bigG alone is the refiner's
    (clip_l,) = model_io.CLIPLoader().execute("sd1_clip_l_00001_.safetensors", "stable_diffusion", context=c)
    _, sd1_clip, sd1_vae = handles(eng, "sd1.safetensors")
    assert clip_l.text.family == "sd1"
    torch.testing.assert_close(clip_l.encode("a blue star")[0], sd1_clip.encode("a blue star")[0])
    _, xl_clip, _ = handles(eng, "sdxl.safetensors")
    (pair,) = model_io.DualCLIPLoader().execute("sdxl_clip_g_00001_.safetensors", "sdxl_clip_l_00001_.safetensors",
                                                "sdxl", context=c)
    for ours, theirs in zip(pair.encode("a square"), xl_clip.encode("a square"), strict=True):
        torch.testing.assert_close(ours, theirs)
    (loaded_vae,) = loaders.VAELoader().execute("sd1_00001_.safetensors", context=c)
    for key, value in loaded_vae.vae.state_dict().items():
        assert torch.equal(value, sd1_vae.vae.state_dict()[key]), key


def test_unet_loader_reads_the_diffusers_layout(eng):
    model, _, _ = handles(eng, "sdxl.safetensors")
    ours = {k: v.contiguous() for k, v in model.patcher.model.state_dict().items()}
    diffusers = {theirs: ours[mine] for theirs, mine in diffusers_to_original_unet_keys(model.family.unet).items()}
    metadata = read_metadata(eng.env.find_model("checkpoints", "sdxl.safetensors"))
    save_file(diffusers, str(eng.env.models_dir / "diffusion_models" / "xl-diffusers.safetensors"), metadata)
    (unet,) = model_io.UNETLoader().execute("xl-diffusers.safetensors", "default", context=ctx(eng))
    assert unet.family.name == "sdxl"
    for key, value in unet.patcher.model.named_parameters():
        assert torch.equal(value, ours[key]), key
    (fp8,) = model_io.UNETLoader().execute("xl-diffusers.safetensors", "fp8_e5m2", context=ctx(eng))
    assert fp8 is not unet and fp8.dtype == F32
    key = "input_blocks.0.0.weight"
    weight = fp8.patcher.model.get_parameter(key)
    assert torch.equal(weight, ours[key].to(torch.float8_e5m2).float()) and not torch.equal(weight, ours[key])
    assert torch.equal(unet.patcher.model.get_parameter(key), ours[key])  # the default load is untouched


def test_latent_round_trip_and_comfyui_files(eng):
    c = ctx(eng)
    samples = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model_io.SaveLatent().execute({"samples": samples}, "latents/ComfyUI", prompt={"1": {}}, context=c)
    assert out.ui["latents"] == [{"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}]
    again = model_io.SaveLatent().execute({"samples": samples}, "latents/ComfyUI", context=c)
    assert again.ui["latents"][0]["filename"] == "ComfyUI_00002_.latent"  # the counter goes on
    saved = eng.env.output_dir / "latents" / "ComfyUI_00001_.latent"
    raw = load_file(str(saved))
    assert set(raw) == {"latent_tensor", "latent_format_version_0"} and raw["latent_format_version_0"].numel() == 0
    saved.rename(eng.env.input_dir / "round.latent")
    assert model_io.LoadLatent.info(eng.env)["input"]["required"]["latent"][0] == ["round.latent"]
    (loaded,) = model_io.LoadLatent().execute("round.latent", context=c)
    assert torch.equal(loaded["samples"], samples)
    # hand-built files: the current format as ComfyUI writes it, and the first one (scaled by 0.18215, no marker)
    save_file({"latent_tensor": samples.half(), "latent_format_version_0": torch.tensor([])},
              str(eng.env.input_dir / "comfy.latent"))
    save_file({"latent_tensor": samples * 0.18215}, str(eng.env.input_dir / "old.latent"))
    (comfy,) = model_io.LoadLatent().execute("comfy.latent", context=c)
    assert comfy["samples"].dtype == F32 and torch.allclose(comfy["samples"], samples, atol=1e-2)
    (old,) = model_io.LoadLatent().execute("old.latent", context=c)
    torch.testing.assert_close(old["samples"], samples, rtol=1e-5, atol=1e-6)
    (eng.env.input_dir / "bad.latent").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"LoadLatent: input/bad.latent is not a \.latent"):
        model_io.LoadLatent().execute("bad.latent", context=c)
    assert "not found in the input folder" in model_io.LoadLatent.validate_inputs({"latent": "none.latent"}, eng.env)


def test_checkpoint_loader_checks_the_config_and_takes_its_prediction_and_clip_skip(eng):
    c = ctx(eng)
    model, clip, _ = model_io.CheckpointLoader().execute("v2-inference-v.yaml", "sd2-v.safetensors", context=c)
    assert model.model_sampling.prediction == "v_prediction"
    _, clip, _ = model_io.CheckpointLoader().execute("v1-inference_clip_skip_2.yaml", "sd1.safetensors", context=c)
    assert clip.text.clip_skip == -2
    with pytest.raises(ValueError, match=r"config 'v2-inference.yaml' describes an sd2 model but 'sd1.safetensors' is "
                                         r"SD1.x"):
        model_io.CheckpointLoader().execute("v2-inference.yaml", "sd1.safetensors", context=c)
    (eng.env.models_dir / "configs" / "mine.yaml").write_text(
        "model:\n  params:\n    parameterization: v\n    unet_config:\n      params:\n        context_dim: 1024\n")
    assert "mine.yaml" in model_io.CheckpointLoader.info(eng.env)["input"]["required"]["config_name"][0]
    model, _, _ = model_io.CheckpointLoader().execute("mine.yaml", "sd2-v.safetensors", context=c)
    assert model.family.name == "sd2" and model.model_sampling.prediction == "v_prediction"
    (eng.env.models_dir / "configs" / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ValueError, match=r"CheckpointLoader config_name 'broken\.yaml'.*not valid YAML"):
        model_io.CheckpointLoader().execute("broken.yaml", "sd1.safetensors", context=c)


def test_errors_name_the_node_file_and_folder(eng):
    c = ctx(eng)
    write_random_vae(eng.env.models_dir / "diffusion_models" / "a-vae.safetensors")
    with eng.env.naming_files(), pytest.raises(ValueError) as info:
        model_io.UNETLoader().execute("a-vae.safetensors", "default", context=c)
    assert "models/diffusion_models/a-vae.safetensors" in str(info.value) and "not a diffusion model" in str(info.value)
    assert str(eng.env.data_dir) not in str(info.value)
    assert "diffusion_model 'none.safetensors' not found in data/models/diffusion_models/ (or unet/)" in \
        model_io.UNETLoader.validate_inputs({"unet_name": "none.safetensors"}, eng.env)
    with pytest.raises(ValueError, match="CLIPLoader type 'sd3' is not supported"):
        model_io.CLIPLoader().execute("x.safetensors", "sd3", context=c)
    write_random_vae(eng.env.models_dir / "text_encoders" / "v.safetensors")
    not_clip = r"models/text_encoders/v\.safetensors: not a CLIP text"
    with eng.env.naming_files(), pytest.raises(ValueError, match=not_clip):
        model_io.CLIPLoader().execute("v.safetensors", "stable_diffusion", context=c)
    model, clip, vae = handles(eng, "sd1.safetensors")
    _, xl_clip, _ = handles(eng, "sdxl.safetensors")
    with pytest.raises(ValueError, match=r"CheckpointSave: the CLIP is sdxl's but the model is SD1\.x"):
        merging.CheckpointSave().execute(model, xl_clip, vae, "checkpoints/x", context=c)
    with pytest.raises(ValueError, match="CLIPMergeSimple: the two CLIPs have no text encoder in common"):
        merging.CLIPMergeSimple().execute(clip, types.SimpleNamespace(patchers={"g": None}), 0.5)


def test_a_merged_model_samples_as_its_saved_checkpoint_does(eng):
    """The merge in memory and the checkpoint it was saved as give the same latent (same seed, same prompt)."""
    write_lora(eng, handles(eng, "sd1.safetensors")[0])
    merge = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1-b.safetensors"}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "l.safetensors",
                                                              "strength_model": 1.0}},
        "4": {"class_type": "ModelMergeSubtract",
              "inputs": {"model1": ["3", 0], "model2": ["2", 0], "multiplier": 0.5}},
        "10": {"class_type": "CheckpointSave", "inputs": {"model": ["4", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "filename_prefix": "checkpoints/diff"}},
    }

    def sample(model, clip):
        return {
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": clip}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {"model": model, "seed": 3, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal",
                                                       "positive": ["6", 0], "negative": ["6", 0],
                                                       "latent_image": ["5", 0], "denoise": 1.0}},
            "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/s"}},
        }

    in_memory = eng.outputs({**merge, **sample(["4", 0], ["1", 1])}, "7")[0][0]["samples"]
    saved = only_file(eng.env.output_dir / "checkpoints")
    saved.rename(eng.env.models_dir / "checkpoints" / saved.name)
    reloaded = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": saved.name}},
                **sample(["1", 0], ["1", 1])}
    from_file = eng.outputs(reloaded, "7", "second")[0][0]["samples"]
    plain = eng.outputs({**merge, **sample(["1", 0], ["1", 1])}, "7", "third")[0][0]["samples"]
    assert float((plain - in_memory).abs().max()) > 0.1  # the merge changes the picture
    torch.testing.assert_close(from_file, in_memory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "title"), [("sd2-v.safetensors", "SD2.x (v-prediction)"),
                                             ("sdxl-refiner.safetensors", "SDXL refiner (eps-prediction)")])
def test_checkpoint_save_keeps_family_and_prediction(eng, name, title):
    model, clip, vae = handles(eng, name)
    merging.CheckpointSave().execute(model, clip, vae, "checkpoints/x", context=ctx(eng))
    saved = only_file(eng.env.output_dir / "checkpoints")
    loaded = load_checkpoint(saved)
    assert loaded.family.title == title
    metadata = read_metadata(saved)
    if "refiner" in name:
        assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
        assert metadata["modelspec.title"] == "x 1"
    else:
        assert metadata["modelspec.predict_key"] == "v" and "v_pred" in load_file(str(saved))
    for key, value in loaded.unet.named_parameters():
        assert torch.equal(value, model.patcher.patched_weight(key)), key
