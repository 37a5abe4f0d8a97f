"""A ComfyUI V1 pack (tests/packs/patch_pack) patching a MODEL through every hook family of model_options and a
CLIP through add_patches, on a tiny random SD1 checkpoint. Each patch is checked against a result it must
reproduce exactly (a cfg function returning the positive prediction is cfg 1; an attn2 patch zeroing the context is
an attn2 replacement returning zeros; ...) and against the unpatched result it must change."""

from __future__ import annotations

import sys

import pytest
import torch

from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.patches.lora import kohya_text_names, kohya_unet_names, save_lora
from diffusion.patches.patcher import LoraDelta
from nodes import image, latent, loaders, mask, merging, model_patches, sampling, text, vae
from tests.graph.test_comfy_v1_nodes import PackEngine


class PatchPackEngine(PackEngine):
    core_modules = (image, latent, loaders, mask, merging, model_patches, sampling, text, vae)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    data = tmp_path_factory.mktemp("patchdata")
    (data / "models" / "checkpoints").mkdir(parents=True)
    write_random_checkpoint(data / "models" / "checkpoints" / "sd1.safetensors", "sd1", seed=4)
    write_random_checkpoint(data / "models" / "checkpoints" / "other.safetensors", "sd1", seed=5)
    write_lora(data / "models" / "loras" / "tiny.safetensors", data / "models" / "checkpoints" / "sd1.safetensors")
    return PatchPackEngine(data, ("model_pack", "patch_pack"))


def write_lora(path, checkpoint) -> None:
    """A LoRA on one cross-attention query of the tiny UNet and one text encoder projection, in kohya's names."""
    loaded = load_checkpoint(checkpoint)
    params = dict(loaded.unet.named_parameters())
    unet_names = kohya_unet_names(loaded.family.unet, params)
    text_names = kohya_text_names(loaded.text)["l"]
    gen = torch.Generator().manual_seed(11)
    unet_module = "middle_block.1.transformer_blocks.0.attn2.to_q"
    out_features, in_features = params[unet_module + ".weight"].shape
    text_module = next(m for m in text_names if m.endswith("self_attn.out_proj"))
    width = dict(loaded.text.encoders["l"].model.named_parameters())[text_module + ".weight"].shape[0]
    layers = {unet_names[unet_module]: LoraDelta(torch.randn(out_features, 2, generator=gen),
                                                 torch.randn(2, in_features, generator=gen)),
              text_names[text_module]: LoraDelta(torch.randn(width, 2, generator=gen),
                                                 torch.randn(2, width, generator=gen))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, layers)


@pytest.fixture
def log():
    entries = sys.modules["latentloom_custom_nodes.patch_pack"].LOG
    entries.clear()
    return entries


def prompt(kind: str | None = None, value: float = 1.0, cfg: float = 5.0, steps: int = 2, size: int = 64) -> dict:
    """txt2img whose KSampler takes the checkpoint's model patched by PatchModel(kind, value) if given."""
    graph = {
        "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["c", 1]}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["c", 1]}},
        "e": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0] if kind else ["c", 0], "seed": 7, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["p", 0], "negative": ["n", 0], "latent_image": ["e", 0],
            "denoise": 1.0}},
        "out": {"class_type": "Sink", "inputs": {"value": ["k", 0]}},
    }
    if kind:
        graph["m"] = {"class_type": "PatchModel", "inputs": {"model": ["c", 0], "kind": kind, "value": value}}
    return graph


def run(engine, kind=None, value=1.0, cfg=5.0, steps=2, size=64) -> torch.Tensor:
    return engine.value(prompt(kind, value, cfg, steps, size), "k")[0]["samples"]


def close(a, b):
    """Equal up to float noise. The two runs batch the cond and uncond rows differently, so their kernels round
    differently (7e-5 apart on one CPU); a random model's latents reach ~100, so the noise scales with them."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def differs(a, b):
    assert (a - b).abs().max() > 1e-3


@pytest.fixture(scope="module")
def plain(engine):
    return run(engine)


@pytest.fixture(scope="module")
def cfg1(engine):
    return run(engine, cfg=1.0)


def test_cfg_function_returning_the_positive_is_cfg_1(engine, plain, cfg1, log):
    patched = run(engine, "cfg_returns_cond")
    close(patched, cfg1)
    differs(patched, plain)
    assert len(log) == 2 and log[0] == ("cfg", sorted(["cond", "uncond", "cond_scale", "timestep", "input", "sigma",
                                                       "cond_denoised", "uncond_denoised", "model", "model_options",
                                                       "input_cond", "input_uncond"]))


def test_pre_cfg_function_replacing_the_negative_by_the_positive_is_cfg_1(engine, plain, cfg1, log):
    close(run(engine, "pre_cfg_uncond_is_cond"), cfg1)
    assert [entry[2:] for entry in log] == [(2, 2)] * 2
    assert log[0][1] == sorted(["conds", "conds_out", "cond_scale", "timestep", "input", "sigma", "model",
                                "model_options"])


def test_post_cfg_function_sees_the_lists_and_its_result_is_final(engine, cfg1, log):
    close(run(engine, "post_cfg_returns_cond"), cfg1)
    assert log[0][2] == "list"  # "cond"/"uncond" of a post-cfg function are the conditioning lists, as in ComfyUI
    assert "denoised" in log[0][1] and "cond_denoised" in log[0][1]


def test_disable_cfg1_optimization_evaluates_the_negative_at_cfg_1(engine, cfg1, log):
    close(run(engine, "post_cfg_cfg1_record", 0.0, cfg=1.0), cfg1)
    assert [entry[1] for entry in log] == [False, False]  # negative skipped: uncond is the positive
    log.clear()
    close(run(engine, "post_cfg_cfg1_record", 1.0, cfg=1.0), cfg1)  # at cfg 1 the negative does not count
    assert [entry[1] for entry in log] == [True, True]


def test_attn1_patch_runs_in_every_transformer_block_with_comfy_extra_options(engine, plain, log):
    close(run(engine, "attn1_patch_identity", steps=1), run(engine, steps=1))
    blocks = {entry[1] for entry in log}
    assert blocks == {("input", i) for i in (1, 2, 4, 5, 7, 8)} | {("middle", 0)} | {("output", i)
                                                                                      for i in range(3, 12)}
    _, block_index, heads, dim_head, cond_or_uncond = log[0][1:]
    assert block_index == 0 and heads == 2 and dim_head * heads == 16 and cond_or_uncond == [1, 0]


def test_attn1_replace_with_optimized_attention_reproduces_the_model(engine, plain, log):
    close(run(engine, "attn1_replace_standard"), plain)
    assert len(log) == 16 * 2  # 16 transformer blocks, 2 steps (one batched call each)


def test_attn1_output_patch(engine, plain, log):
    close(run(engine, "attn1_output_scale", 1.0), plain)
    assert len(log) == 32
    differs(run(engine, "attn1_output_scale", 0.5), plain)


def test_attn2_patch_zeroing_the_context_equals_a_replacement_returning_zeros(engine, plain, log):
    zero_context = run(engine, "attn2_patch_zero_context")
    assert log and log[0][1][1:] == (77, 16)
    close(zero_context, run(engine, "attn2_replace_zero"))
    differs(zero_context, plain)


def test_attn2_replace_keyed_by_block_only_replaces_that_block(engine, plain, log):
    differs(run(engine, "attn2_replace_one_block"), plain)
    assert set(log) == {("attn2_replace", ("middle", 0), 0)}


def test_middle_patch_input_and_output_block_patches(engine, plain, log):
    for kind, count in (("middle_patch_scale", 32), ("input_block_scale", 24), ("output_block_scale", 24)):
        log.clear()
        close(run(engine, kind, 1.0), plain)
        assert len(log) == count, kind
        differs(run(engine, kind, 0.9), plain)


def test_unet_function_wrapper_wraps_every_model_call(engine, plain, log):
    close(run(engine, "wrapper_count", 1.0), plain)
    assert len(log) == 2  # one batched call (positive and negative) per step
    assert log[0][1] == ["c", "cond_or_uncond", "input", "timestep"] and log[0][2] == [1, 0]
    assert log[0][3] == (2, 77, 16)
    differs(run(engine, "wrapper_count", 0.9), plain)


def test_cond_or_uncond_labels_the_chunks_negative_first(engine, plain, cfg1):
    close(run(engine, "wrapper_uncond_is_cond"), cfg1)


def test_transformer_options_a_wrapper_passes_reach_the_patches(engine, plain, log):
    close(run(engine, "wrapper_sets_option", 1.0), plain)
    assert log and set(log) == {("scaled_by_option", 1.0)}
    differs(run(engine, "wrapper_sets_option", 0.5), plain)


def test_patches_written_into_model_options_directly_run(engine, plain, log):
    close(run(engine, "direct_dict_output_scale", 1.0), plain)
    assert len(log) == 32
    differs(run(engine, "direct_dict_output_scale", 0.5), plain)


def test_model_sampling_object_and_object_patch(engine, plain, log):
    close(run(engine, "object_patch_model_sampling"), plain)
    _, sigma_min, sigma_max, middle, top = log[0]
    assert sigma_min == pytest.approx(0.0292, abs=1e-3) and sigma_max == pytest.approx(14.6146, abs=1e-3)
    assert sigma_min < middle < sigma_max and top == pytest.approx(999, abs=0.5)


def test_calc_cond_batch_reevaluates_the_step_and_model_is_a_base_model(engine, plain, log):
    close(run(engine, "post_cfg_recompute"), plain)
    assert len(log) == 2
    for _, cond_diff, uncond_diff, zero, base, sd15, sdxl, eps, has_blocks in log:
        assert cond_diff < 1e-5 and uncond_diff < 1e-5 and zero == 0
        assert base and sd15 and not sdxl and eps and has_blocks


def test_pag_written_as_packs_write_it_equals_our_perturbed_attention_guidance(engine):
    """At 128 px the tiny UNet's middle block has 2x2 tokens (at 64 px one token, where attention is its value)."""
    graph = prompt("post_cfg_pag", 3.0, size=128)
    pack = engine.value(graph, "k")[0]["samples"]
    graph["m"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["c", 0], "scale": 3.0}}
    ours = engine.value(graph, "k")[0]["samples"]
    close(pack, ours)
    differs(pack, run(engine, size=128))


@pytest.mark.parametrize(("kind", "words"), [
    ("missing_module_name", ["'comfy.samplers'", "'sampling_function'", "PatchModel", "patch_pack"]),
    ("missing_model_method", ["MODEL.set_model_noise_refiner", "PatchModel", "patch_pack", "'model'"])])
def test_what_is_not_offered_is_named_with_the_node_and_the_pack(engine, kind, words):
    result = engine.run(prompt(kind), ok=False)
    assert result.status != "success"
    message = result.error["exception_message"]
    assert all(word in message for word in words), message


def test_denoise_mask_function_equals_our_differential_diffusion(engine, log):
    """An inpainting run with a half-strength mask (repainted from the middle of the run on): the pack's mask
    function and our node agree."""
    def inpaint(model: dict) -> torch.Tensor:
        graph = prompt()
        graph["ramp"] = {"class_type": "ImageToMask", "inputs": {"image": ["grad", 0], "channel": "red"}}
        graph["grad"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                "color": 0x808080}}
        graph["noisy"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["e", 0], "mask": ["ramp", 0]}}
        graph["k"]["inputs"]["latent_image"] = ["noisy", 0]
        graph["k"]["inputs"]["steps"] = 4
        graph["m"] = model
        graph["k"]["inputs"]["model"] = ["m", 0]
        return engine.value(graph, "k")[0]["samples"]

    pack = inpaint({"class_type": "PatchModel", "inputs": {"model": ["c", 0], "kind": "differential_mask",
                                                           "value": 1.0}})
    assert len(log) >= 4
    ours = inpaint({"class_type": "DifferentialDiffusion", "inputs": {"model": ["c", 0], "strength": 1.0}})
    close(pack, ours)
    plain_inpaint = inpaint({"class_type": "PatchModel", "inputs": {"model": ["c", 0], "kind": "attn1_output_scale",
                                                                    "value": 1.0}})
    differs(pack, plain_inpaint)


def test_patches_stay_on_the_clone(engine, plain):
    run(engine, "attn1_output_scale", 0.5)
    close(run(engine), plain)


def test_a_pack_subclassing_comfy_extras_model_merge_blocks(engine, plain):
    def merged(node: dict) -> torch.Tensor:
        graph = prompt()
        graph["c2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
        graph["m"] = node
        graph["k"]["inputs"]["model"] = ["m", 0]
        return engine.value(graph, "k")[0]["samples"]

    def pack(time, inputs, rest):
        ratios = {"time_embed.": time, "label_emb.": time, "input_blocks.": inputs, "middle_block.": rest,
                  "output_blocks.": rest, "out.": rest}
        return merged({"class_type": "BlockMerge", "inputs": {"model1": ["c", 0], "model2": ["c2", 0], **ratios}})

    close(pack(1.0, 1.0, 1.0), plain)  # all of model1
    ours = merged({"class_type": "ModelMergeBlocks", "inputs": {"model1": ["c", 0], "model2": ["c2", 0],
                                                                "input": 0.3, "middle": 0.8, "out": 0.8}})
    close(pack(0.3, 0.3, 0.8), ours)  # our node gives keys no name covers (time_embed) the first ratio
    differs(pack(0.3, 0.3, 0.8), plain)


def test_load_lora_for_models_equals_lora_loader(engine, plain):
    def sampled(node: dict) -> torch.Tensor:
        graph = prompt()
        graph["l"] = node
        graph["k"]["inputs"]["model"] = ["l", 0]
        for encoder in ("p", "n"):
            graph[encoder]["inputs"]["clip"] = ["l", 1]
        return engine.value(graph, "k")[0]["samples"]

    inputs = {"model": ["c", 0], "clip": ["c", 1], "lora_name": "tiny.safetensors", "strength_model": 0.8,
              "strength_clip": 1.2}
    pack = sampled({"class_type": "LoraThroughComfySd", "inputs": inputs})
    close(pack, sampled({"class_type": "LoraLoader", "inputs": inputs}))
    differs(pack, plain)


def clip_prompt(strength: float) -> dict:
    return {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "ours": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["c", 1]}},
            "pack": {"class_type": "PatchClip", "inputs": {"clip": ["c", 1], "strength": strength, "width": 16,
                                                           "text": "a cat"}},
            "again": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["pack", 0]}},
            "o1": {"class_type": "Sink", "inputs": {"value": ["ours", 0]}},
            "o2": {"class_type": "Sink", "inputs": {"value": ["pack", 1]}},
            "o3": {"class_type": "Sink", "inputs": {"value": ["again", 0]}}}


def test_clip_add_patches(engine, log):
    graph = clip_prompt(1.0)
    (ours, _), = engine.value(graph, "ours")[0]
    (patched, options), = engine.value(graph, "pack", 1)[0]
    (again, _), = engine.value(graph, "again")[0]
    assert log[0] == ("clip", ["clip_l.transformer.text_model.final_layer_norm.bias"])
    # the last norm's bias: +0.25 everywhere (the tiny encoder runs in bf16 on the CPU: 8 bits of mantissa)
    torch.testing.assert_close(patched, ours + 0.25, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(again, patched)  # the patched CLIP, passed on, encodes patched
    assert "pooled_output" in options
    (half, _), = engine.value(clip_prompt(0.5), "pack", 1)[0]
    torch.testing.assert_close(half, ours + 0.125, atol=2e-2, rtol=1e-2)
    assert (patched - half).mean() == pytest.approx(0.125, abs=5e-3)
    (after, _), = engine.value(graph, "ours")[0]
    torch.testing.assert_close(after, ours)  # the checkpoint's CLIP is unchanged


def test_model_options_of_a_clone_are_its_own(engine):
    """ComfyUI's clone copies model_options: a pack patching a clone of a patched model leaves that model alone."""
    model = engine.value(prompt(), "c")[0]
    first = model.clone()
    first.set_model_attn1_patch(lambda n, c, v, o: (n, c, v))
    first.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    second = first.clone()
    second.set_model_attn1_patch(lambda n, c, v, o: (n, c, v))
    second.set_model_attn2_replace(lambda q, k, v, o: q, "middle", 0)
    second.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    assert model.model_options == {}
    assert len(first.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert "patches_replace" not in first.model_options["transformer_options"]
    assert len(first.model_options["sampler_post_cfg_function"]) == 1
    assert len(second.model_options["transformer_options"]["patches"]["attn1_patch"]) == 2
    assert list(second.model_options["transformer_options"]["patches_replace"]["attn2"]) == [("middle", 0)]
    assert len(second.model_options["sampler_post_cfg_function"]) == 2
    assert second.is_clone(model) and first.get_model_object("model_sampling") is model.model_sampling

    class Replace:  # a patch object packs update in place on their clone (IPAdapter's attn2 replacement does)
        def __init__(self):
            self.calls = []

        def __call__(self, q, k, v, extra_options):
            return q

    first.set_model_attn2_replace(Replace(), "input", 1)
    first.model_options["kept"] = model  # a handle a pack keeps in the options is never copied
    third = first.clone()
    third.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].calls.append("third")
    assert first.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].calls == []
    assert third.model_options["kept"] is model
    with pytest.raises(ValueError, match="model_sampling"):
        first.add_object_patch("model_sampling", object())
