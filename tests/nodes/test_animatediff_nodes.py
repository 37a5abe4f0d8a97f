"""AnimateDiff-Evolved's basic nodes on a tiny random checkpoint and a tiny random motion module: Gen1 and Gen2
paths agree, frames are coupled, context windows bound the UNet batch, the schedule changes, errors name the node."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoints.motion_files import (
    build_motion_modules,
    random_motion_lora,
    random_motion_state_dict,
    tiny_motion_config,
    write_motion_file,
)
from diffusion.patches.unet_patches import UNetPatches
from nodes.animatediff import (
    ADE_StandardStaticContextOptions,
    ADE_StandardUniformContextOptions,
    ContextChoice,
    MotionModel,
    apply_animatediff,
)
from nodes.sampling import KSampler
from tests.nodes.test_sd_nodes import txt2img

TINY_SD1_WIDTHS = (16, 32, 32, 32)  # the tiny sd1 checkpoint of tests/nodes/conftest.py
FRAMES = 6


@pytest.fixture
def motion_engine(engine):
    folder = engine.env.models_dir / "animatediff_models"
    folder.mkdir(parents=True, exist_ok=True)
    write_motion_file(folder / "mm_v2.safetensors", random_motion_state_dict(tiny_motion_config("v2", TINY_SD1_WIDTHS)))
    loras = engine.env.models_dir / "animatediff_motion_lora"
    loras.mkdir(parents=True, exist_ok=True)
    torch.save(random_motion_lora(tiny_motion_config("v2", TINY_SD1_WIDTHS), seed=4), loras / "v2_lora_PanLeft.ckpt")
    write_motion_file(folder / "mm_xl.safetensors",
                      random_motion_state_dict(tiny_motion_config("sdxl_beta", (16, 32, 48))))
    return engine


def gen1(model_name="mm_v2.safetensors", context=None, beta="autoselect", frames=FRAMES) -> dict:
    prompt = txt2img(size=32, steps=2, batch=frames)
    prompt["20"] = {"class_type": "ADE_AnimateDiffLoaderGen1",
                    "inputs": {"model": ["4", 0], "model_name": model_name, "beta_schedule": beta}}
    if context is not None:
        prompt["21"] = context
        prompt["20"]["inputs"]["context_options"] = ["21", 0]
    prompt["3"]["inputs"]["model"] = ["20", 0]
    return prompt


def gen2(context=None, beta="autoselect") -> dict:
    prompt = txt2img(size=32, steps=2, batch=FRAMES)
    prompt["30"] = {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": "mm_v2.safetensors"}}
    prompt["31"] = {"class_type": "ADE_ApplyAnimateDiffModelSimple", "inputs": {"motion_model": ["30", 0]}}
    prompt["32"] = {"class_type": "ADE_UseEvolvedSampling",
                    "inputs": {"model": ["4", 0], "beta_schedule": beta, "m_models": ["31", 0]}}
    if context is not None:
        prompt["21"] = context
        prompt["32"]["inputs"]["context_options"] = ["21", 0]
    prompt["3"]["inputs"]["model"] = ["32", 0]
    return prompt


UNIFORM = {"class_type": "ADE_StandardUniformContextOptions",
           "inputs": {"context_length": 4, "context_stride": 1, "context_overlap": 2}}


def samples(engine, prompt) -> torch.Tensor:
    return engine.outputs(prompt, "3")[0][0]["samples"]


def test_gen1_and_gen2_agree_and_differ_from_independent_frames(motion_engine):
    plain = samples(motion_engine, txt2img(size=32, steps=2, batch=FRAMES))
    one = samples(motion_engine, gen1(beta="use existing"))
    two = samples(motion_engine, gen2(beta="use existing"))
    assert one.shape == plain.shape == (FRAMES, 4, 4, 4)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one, plain, atol=1e-3)
    windowed = samples(motion_engine, gen1(context=UNIFORM, beta="use existing"))
    assert torch.isfinite(windowed).all() and not torch.allclose(windowed, one, atol=1e-4)
    torch.testing.assert_close(samples(motion_engine, gen2(context=UNIFORM, beta="use existing")), windowed,
                               rtol=1e-5, atol=1e-5)


def test_autoselect_uses_animatediffs_linear_betas(motion_engine):
    prompt = gen1()
    model = motion_engine.outputs(prompt, "20")[0][0]
    base = motion_engine.outputs(prompt, "4")[0][0]
    betas = 1 - model.model_sampling.schedule.alphas_cumprod[1:] / model.model_sampling.schedule.alphas_cumprod[:-1]
    assert torch.allclose(betas[:3].float(), torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)[1:4].float())
    assert model.model_sampling.sigma_max != pytest.approx(base.model_sampling.sigma_max)
    assert base.unet_patches.block_features == () and model.unet_patches.block_features  # the input MODEL unchanged


def test_context_windows_bound_the_unet_batch(motion_engine):
    prompt = gen1(context=UNIFORM, beta="use existing", frames=10)
    model = motion_engine.outputs(prompt, "20")[0][0]
    seen = []

    def record(h, site):
        if site.block == ("input", 0):
            seen.append(h.shape[0])
        return h

    spy = model.with_unet_patches(UNetPatches(input_block=(record,)))
    positive = motion_engine.outputs(prompt, "6")[0][0]
    negative = motion_engine.outputs(prompt, "7")[0][0]
    latent = {"samples": torch.zeros(10, 4, 4, 4)}
    KSampler().execute(spy, 1, 2, 5.0, "euler", "normal", positive, negative, latent, 1.0)
    assert seen and max(seen) == 2 * 4  # positive and negative rows of one 4-frame window


def test_errors_name_the_node_and_the_value(motion_engine):
    message = motion_engine.error(gen1(model_name="mm_xl.safetensors"))
    assert "ADE_AnimateDiffLoaderGen1" in message and "mm_xl.safetensors" in message and "SD1.x" in message
    assert "beta_schedule 'lcm' is not supported" in motion_engine.error(gen1(beta="lcm"))
    with pytest.raises(ValueError, match="ADE_StandardUniformContextOptions: fuse_method '🔬random'"):
        ADE_StandardUniformContextOptions().execute(16, 1, 4, fuse_method="🔬random")
    with pytest.raises(ValueError, match="input 'view_opts' is not supported"):
        ADE_StandardStaticContextOptions().execute(16, 4, view_opts=object())
    with pytest.raises(ValueError, match="context_overlap 16"):
        ADE_StandardStaticContextOptions().execute(16, 16)
    choice = ADE_StandardStaticContextOptions().execute(8, 2, fuse_method="flat", start_percent=0.5)[0]
    assert isinstance(choice, ContextChoice) and choice.options.schedule == "static" and choice.start_percent == 0.5


def test_declared_interfaces(motion_engine):
    info = motion_engine.registry.object_info(motion_engine.env)
    gen1_info = info["ADE_AnimateDiffLoaderGen1"]
    assert list(gen1_info["input"]["required"]) == ["model", "model_name", "beta_schedule"]
    modules = gen1_info["input"]["required"]["model_name"][0]
    # the data directory's modules and the repository's shipped one (models/animatediff_models/)
    assert sorted(modules) == ["latentloom-shapes-motion.safetensors", "mm_v2.safetensors", "mm_xl.safetensors"]
    assert gen1_info["input"]["required"]["beta_schedule"][1] == {"default": "autoselect"}
    assert list(gen1_info["input"]["optional"]) == ["context_options", "motion_lora", "ad_settings", "ad_keyframes",
                                                    "sample_settings", "scale_multival", "effect_multival",
                                                    "per_block"]
    uniform = info["ADE_StandardUniformContextOptions"]
    assert uniform["input"]["required"]["context_length"] == ["INT", {"default": 16, "min": 1, "max": 128}]
    assert uniform["output"] == ["CONTEXT_OPTIONS"] and uniform["output_name"] == ["CONTEXT_OPTS"]
    assert uniform["category"] == "Animate Diff 🎭🅐🅓/context opts"
    assert info["ADE_LoadAnimateDiffModel"]["output"] == ["MOTION_MODEL_ADE"]
    assert info["ADE_UseEvolvedSampling"]["display_name"] == "Use Evolved Sampling 🎭🅐🅓②"


def test_v1_modules_normalise_resblocks_over_the_clip(motion_engine):
    prompt = txt2img(size=32, steps=2, batch=FRAMES)
    base = motion_engine.outputs(prompt, "4")[0][0]
    positive = motion_engine.outputs(prompt, "6")[0][0]
    negative = motion_engine.outputs(prompt, "7")[0][0]
    plain = KSampler().execute(base, 1, 2, 5.0, "euler", "normal", positive, negative,
                               {"samples": torch.zeros(FRAMES, 4, 4, 4)}, 1.0)[0]["samples"]
    results = {}
    for version in ("v1", "v2"):
        sd = random_motion_state_dict(tiny_motion_config(version, TINY_SD1_WIDTHS))
        motion = MotionModel(version, build_motion_modules(sd))
        model = apply_animatediff("test", base, [(motion, 0.0, ())], None, "use existing")  # effect 0: no attention
        results[version] = KSampler().execute(model, 1, 2, 5.0, "euler", "normal", positive, negative,
                                              {"samples": torch.zeros(FRAMES, 4, 4, 4)}, 1.0)[0]["samples"]
    torch.testing.assert_close(results["v2"], plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(results["v1"], plain, atol=1e-3)


def test_motion_lora_loader_changes_the_clip_in_both_generations(motion_engine):
    plain = samples(motion_engine, gen1(beta="use existing"))
    lora = {"class_type": "ADE_AnimateDiffLoRALoader", "inputs": {"name": "v2_lora_PanLeft.ckpt", "strength": 0.8}}
    one = gen1(beta="use existing")
    one["40"] = lora
    one["20"]["inputs"]["motion_lora"] = ["40", 0]
    two = gen2(beta="use existing")
    two["40"] = lora
    two["31"]["inputs"]["motion_lora"] = ["40", 0]
    with_lora = samples(motion_engine, one)
    assert not torch.allclose(with_lora, plain, atol=1e-4)
    torch.testing.assert_close(samples(motion_engine, two), with_lora, rtol=1e-5, atol=1e-5)
    chained = gen1(beta="use existing")
    chained["40"] = lora
    chained["41"] = {"class_type": "ADE_AnimateDiffLoRALoader",
                     "inputs": {"name": "v2_lora_PanLeft.ckpt", "strength": 0.0, "prev_motion_lora": ["40", 0]}}
    chained["20"]["inputs"]["motion_lora"] = ["41", 0]
    torch.testing.assert_close(samples(motion_engine, chained), with_lora, rtol=1e-5, atol=1e-5)


def test_prompt_travel_composes_with_context_windows(motion_engine):
    prompt = gen1(context=UNIFORM, beta="use existing")
    prompt["6"] = {"class_type": "PromptSchedule",
                   "inputs": {"clip": ["4", 1], "schedule": "0: a red circle\n5: a blue square", "frames": FRAMES,
                              "curve": "linear"}}
    travelled = samples(motion_engine, prompt)
    still = samples(motion_engine, gen1(context=UNIFORM, beta="use existing"))
    assert travelled.shape == still.shape and torch.isfinite(travelled).all()
    assert not torch.allclose(travelled, still, atol=1e-4)
