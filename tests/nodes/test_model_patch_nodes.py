"""The model-patch nodes through KSampler on tiny random checkpoints: each changes the result, patches compose,
the unpatched MODEL is unchanged after a patched clone ran, and the interfaces are ComfyUI's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nodes.model_patches as model_patches
from diffusion.sampling.ksampler import ksampler_sigmas
from diffusion.sampling.schedules import DiscreteSchedule
from tests.nodes.test_sd_nodes import txt2img

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "comfyui_object_info.json"  # ComfyUI's /object_info


def patched(patches: list[tuple[str, dict]], ckpt="sd1.safetensors", **kwargs) -> dict:
    """txt2img with the patch nodes chained between the checkpoint and the KSampler, in order."""
    prompt = txt2img(ckpt=ckpt, **kwargs)
    source = ["4", 0]
    for i, (class_type, inputs) in enumerate(patches):
        node = str(20 + i)
        prompt[node] = {"class_type": class_type, "inputs": {"model": source, **inputs}}
        source = [node, 0]
    prompt["3"]["inputs"]["model"] = source
    return prompt


def latent(engine, prompt) -> torch.Tensor:
    return engine.outputs(prompt, "3")[0][0]["samples"]


PATCHES = {
    "ModelSamplingDiscrete": {"sampling": "v_prediction", "zsnr": True},
    "RescaleCFG": {"multiplier": 0.7},
    "CFGZeroStar": {},
    "FreeU": {"b1": 1.1, "b2": 1.6, "s1": 0.9, "s2": 0.2},
    "FreeU_V2": {"b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2},
    "PatchModelAddDownscale": {"block_number": 3, "downscale_factor": 2.0, "start_percent": 0.0,
                               "end_percent": 0.5, "downscale_after_skip": True, "downscale_method": "bicubic",
                               "upscale_method": "bicubic"},
    "PerturbedAttentionGuidance": {"scale": 3.0},
    "SelfAttentionGuidance": {"scale": 0.5, "blur_sigma": 2.0},
    "HyperTile": {"tile_size": 32, "swap_size": 2, "max_depth": 1, "scale_depth": False},
    "TomePatchModel": {"ratio": 0.3},
}


@pytest.mark.parametrize("class_type", list(PATCHES))
def test_each_patch_runs_through_ksampler_and_changes_the_result(engine, class_type):
    # the tiny UNet's middle block sees a 1x1 map at 64 px, where any attention is the identity: PAG and SAG
    # need 2x2 there (128 px)
    size = 128 if class_type in ("PerturbedAttentionGuidance", "SelfAttentionGuidance") else 64
    plain = latent(engine, txt2img(size=size))
    out = latent(engine, patched([(class_type, PATCHES[class_type])], size=size))
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, plain, atol=1e-4), class_type


def test_patches_compose_and_the_original_model_is_unchanged(engine):
    plain = latent(engine, txt2img())
    freeu = latent(engine, patched([("FreeU", PATCHES["FreeU"])]))
    rescale = latent(engine, patched([("RescaleCFG", PATCHES["RescaleCFG"])]))
    both = latent(engine, patched([("FreeU", PATCHES["FreeU"]), ("RescaleCFG", PATCHES["RescaleCFG"])]))
    assert not torch.allclose(both, freeu, atol=1e-4) and not torch.allclose(both, rescale, atol=1e-4)
    engine.executor.cache.clear()  # the checkpoint's MODEL stays loaded and shared; its KSampler runs again
    torch.testing.assert_close(latent(engine, txt2img()), plain, rtol=0, atol=0)


def test_perp_neg_nodes(engine):
    empty = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}}
    plain = latent(engine, txt2img())
    prompt = patched([("PerpNeg", {"empty_conditioning": ["30", 0], "neg_scale": 1.0})])
    prompt["30"] = empty
    deprecated = latent(engine, prompt)
    assert not torch.allclose(deprecated, plain, atol=1e-4)
    guided = txt2img()
    guided.update({
        "30": empty,
        "31": {"class_type": "PerpNegGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0],
                                                         "negative": ["7", 0], "empty_conditioning": ["30", 0],
                                                         "cfg": 5.0, "neg_scale": 1.0}},
        "32": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "33": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 3,
                                                          "denoise": 1.0}},
        "34": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "3": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["34", 0], "guider": ["31", 0],
                                                                "sampler": ["32", 0], "sigmas": ["33", 0],
                                                                "latent_image": ["5", 0]}},
    })
    # the guider and the patched model take the same steps from the same noise: the same latent
    # (up to float noise, which grows with the latents' scale: ~300 here, 8e-4 apart on one CPU, 31.7 from `plain`)
    torch.testing.assert_close(latent(engine, guided), deprecated, rtol=1e-4,
                               atol=1e-5 * float(deprecated.abs().max()))
    # at cfg 1 the guider still evaluates all three (e + pos - neg_scale perp is not the positive alone)
    guided["31"]["inputs"]["cfg"] = 1.0
    basic = dict(guided)
    basic["31"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}
    assert not torch.allclose(latent(engine, guided), latent(engine, basic), atol=1e-4)


def test_lcm_sampling_changes_the_schedule(engine):
    prompt = patched([("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False})], sampler="lcm", cfg=1.0)
    assert torch.isfinite(latent(engine, prompt)).all()
    model = engine.outputs(prompt, "20")[0][0]
    sigmas = ksampler_sigmas(model.model_sampling.schedule, "simple", 4)
    # simple over the 50 distilled levels: levels 49, 37, 24, 12 (training timesteps 19 + 20 k)
    full = DiscreteSchedule.from_config().sigmas
    torch.testing.assert_close(sigmas[:-1], full[[999, 759, 499, 259]], rtol=1e-5, atol=0)


def test_bad_values_are_refused_by_name(engine):
    from graph.validation import validate_prompt
    prompt = patched([("RescaleCFG", {"multiplier": 1.5})])
    errors = validate_prompt(prompt, engine.registry, engine.env).response()
    assert "multiplier" in json.dumps(errors) and "1.5" in json.dumps(errors)
    prompt = patched([("PatchModelAddDownscale", {**PATCHES["PatchModelAddDownscale"], "upscale_method": "cubic"})])
    assert "cubic" in json.dumps(validate_prompt(prompt, engine.registry, engine.env).response())


def _normalised(spec: dict) -> dict:
    out = {}
    for section, entries in spec.items():
        out[section] = {}
        for name, value in entries.items():
            value = list(value)
            if len(value) == 2 and isinstance(value[1], dict):
                config = {k: v for k, v in value[1].items() if k not in ("tooltip", "multiselect")}
                value = [value[0]] + ([config] if config else [])
            if value[0] == "COMBO":
                rest = {k: v for k, v in value[1].items() if k != "options"}
                value = [value[1]["options"]] + ([rest] if rest else [])
            out[section][name] = value
    return out


@pytest.mark.parametrize("cls", model_patches.NODE_CLASSES, ids=lambda c: c.node_type)
def test_interfaces_match_comfyui(engine, cls):
    reference = json.loads(REFERENCE.read_text())[cls.node_type]
    ours = engine.registry.get(cls.node_type).info(engine.env)
    assert _normalised(ours["input"]) == _normalised(reference["input"])
    for key in ("input_order", "output", "output_name", "output_is_list", "category", "output_node",
                "python_module"):
        assert ours[key] == reference[key], key
    for key in ("deprecated", "experimental"):
        assert ours[key] == reference.get(key, False), key
    assert ours["display_name"] == (reference["display_name"] or cls.node_type)


def test_attention_patches_compose_with_unet_patches_and_sdxl(engine):
    # ToMe first: it merges the full-resolution tokens, so HyperTile (after it) tiles only the depth-1 maps
    chain = [("TomePatchModel", PATCHES["TomePatchModel"]), ("HyperTile", PATCHES["HyperTile"]),
             ("FreeU_V2", PATCHES["FreeU_V2"]), ("PerturbedAttentionGuidance", {"scale": 2.0})]
    out = latent(engine, patched(chain, size=128))
    assert torch.isfinite(out).all()
    for name in ("HyperTile", "TomePatchModel", "FreeU_V2"):  # dropping any one changes the result
        partial = latent(engine, patched([p for p in chain if p[0] != name], size=128))
        assert not torch.allclose(partial, out, atol=1e-4), name
    sdxl = latent(engine, patched([("SelfAttentionGuidance", PATCHES["SelfAttentionGuidance"]),
                                   ("PatchModelAddDownscale", {**PATCHES["PatchModelAddDownscale"],
                                                               "block_number": 2})], ckpt="sdxl.safetensors"))
    assert torch.isfinite(sdxl).all()


def test_differential_diffusion_through_ksampler(engine):
    def inpaint(patches):
        prompt = patched(patches)
        prompt["50"] = {"class_type": "SolidMask", "inputs": {"value": 0.6, "width": 64, "height": 64}}
        prompt["51"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["50", 0]}}
        prompt["3"]["inputs"]["latent_image"] = ["51", 0]
        return prompt

    plain = latent(engine, inpaint([]))
    full = latent(engine, inpaint([("DifferentialDiffusion", {})]))
    half = latent(engine, inpaint([("DifferentialDiffusion", {"strength": 0.5})]))
    # a soft mask is blended by plain inpainting; Differential Diffusion repaints whole pixels once the
    # threshold falls under 0.6, so its result differs, and so does strength 0.5 (half soft, half thresholded)
    assert not torch.allclose(full, plain, atol=1e-3) and not torch.allclose(half, full, atol=1e-3)
    assert torch.isfinite(half).all()


def test_sag_with_a_combined_negative_holding_an_area(engine):
    prompt = patched([("SelfAttentionGuidance", PATCHES["SelfAttentionGuidance"])], size=128)
    prompt["60"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["7", 0], "width": 64,
                                                                    "height": 64, "x": 0, "y": 0, "strength": 1.0}}
    prompt["61"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["7", 0],
                                                                    "conditioning_2": ["60", 0]}}
    prompt["3"]["inputs"]["negative"] = ["61", 0]
    assert torch.isfinite(latent(engine, prompt)).all()


def test_model_sampling_discrete_swaps_the_clone_only(engine):
    prompt = patched([("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": True})])
    clone = engine.outputs(prompt, "20")[0][0]
    original = engine.outputs(prompt, "4")[0][0]
    assert clone.model_sampling.prediction == "x0" and clone.model_sampling.sigma_max > 4000
    assert original.model_sampling.prediction == "eps" and original.model_sampling.sigma_max < 15
    assert clone.patcher.model is original.patcher.model  # the weights are shared, not copied
