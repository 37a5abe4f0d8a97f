"""A ComfyUI V1 pack (tests/packs/model_pack) that patches a MODEL, encodes with a CLIP and runs a VAE, on a tiny
random SD1 checkpoint: the handle methods packs call, against our own nodes' results."""

from __future__ import annotations

import sys

import pytest
import torch

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from nodes import latent, loaders, sampling, text, vae
from tests.graph.test_comfy_v1_nodes import PackEngine


class ModelPackEngine(PackEngine):
    core_modules = (latent, loaders, sampling, text, vae)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    data = tmp_path_factory.mktemp("modeldata")
    (data / "models" / "checkpoints").mkdir(parents=True)
    write_random_checkpoint(data / "models" / "checkpoints" / "sd1.safetensors", "sd1", seed=3)
    return ModelPackEngine(data, ("model_pack",))


def record_calls():
    return sys.modules["latentloom_custom_nodes.model_pack"].RecordCFG.CALLS


def sample(model_node: dict | None, steps: int = 2) -> dict:
    """A txt2img prompt whose KSampler takes node "m" (a pack's patch of the checkpoint's model) if given."""
    prompt = {
        "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["c", 1]}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["c", 1]}},
        "e": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0] if model_node else ["c", 0], "seed": 1, "steps": steps, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["p", 0], "negative": ["n", 0],
            "latent_image": ["e", 0], "denoise": 1.0}},
        "out": {"class_type": "Sink", "inputs": {"value": ["k", 0]}},
    }
    if model_node:
        prompt["m"] = model_node
    return prompt


def samples(engine, prompt) -> torch.Tensor:
    return engine.value(prompt, "k")[0]["samples"]


def test_post_cfg_function_runs_every_step_and_changes_the_result(engine):
    plain = samples(engine, sample(None))
    record_calls().clear()
    same = samples(engine, sample({"class_type": "RecordCFG", "inputs": {"model": ["c", 0], "scale": 1.0,
                                                                          "weight_shift": 0.0}}))
    assert len(record_calls()) == 2  # once per step
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    scaled = samples(engine, sample({"class_type": "RecordCFG", "inputs": {"model": ["c", 0], "scale": 0.5,
                                                                            "weight_shift": 0.0}}))
    assert (scaled - plain).abs().max() > 1e-3


def test_cfg_function_in_comfy_convention_equals_plain_cfg(engine):
    plain = samples(engine, sample(None))
    patched = samples(engine, sample({"class_type": "PlainCFG", "inputs": {"model": ["c", 0]}}))
    torch.testing.assert_close(patched, plain, atol=1e-4, rtol=1e-4)


def test_add_patches_changes_the_weight_of_the_clone_only(engine):
    plain = samples(engine, sample(None))
    shifted = samples(engine, sample({"class_type": "RecordCFG", "inputs": {"model": ["c", 0], "scale": 1.0,
                                                                             "weight_shift": 0.05}}))
    assert (shifted - plain).abs().max() > 1e-3
    torch.testing.assert_close(samples(engine, sample(None)), plain)  # the checkpoint's own model is unchanged


def test_output_block_patch_sees_each_output_block(engine):
    plain = samples(engine, sample(None, steps=1))
    blocks = sys.modules["latentloom_custom_nodes.model_pack"].ScaleBackbone.BLOCKS
    blocks.clear()
    same = samples(engine, sample({"class_type": "ScaleBackbone", "inputs": {"model": ["c", 0], "b": 1.0}}, steps=1))
    torch.testing.assert_close(same, plain)
    assert blocks and {kind for kind, _ in blocks} == {"output"}
    assert sorted({i for _, i in blocks}) == list(range(len(set(blocks))))
    scaled = samples(engine, sample({"class_type": "ScaleBackbone", "inputs": {"model": ["c", 0], "b": 1.3}}, steps=1))
    assert (scaled - plain).abs().max() > 1e-3


def test_clip_tokenize_and_encode_from_tokens_equal_clip_text_encode(engine):
    prompt = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
              "ours": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.2) fox", "clip": ["c", 1]}},
              "pack": {"class_type": "EncodeTokens", "inputs": {"text": "a (red:1.2) fox", "clip": ["c", 1]}},
              "o1": {"class_type": "Sink", "inputs": {"value": ["ours", 0]}},
              "o2": {"class_type": "Sink", "inputs": {"value": ["pack", 0]}},
              "o3": {"class_type": "Sink", "inputs": {"value": ["pack", 1]}}}
    (ours_cond, ours_options), = engine.value(prompt, "ours")[0]
    for slot in (0, 1):
        (cond, options), = engine.value(prompt, "pack", slot)[0]
        torch.testing.assert_close(cond, ours_cond)
        torch.testing.assert_close(options["pooled_output"], ours_options["pooled_output"])


def test_vae_decode_encode_and_compression(engine):
    prompt = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
              "e": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "ours": {"class_type": "VAEDecode", "inputs": {"samples": ["e", 0], "vae": ["c", 2]}},
              "pack": {"class_type": "VAERoundTrip", "inputs": {"samples": ["e", 0], "vae": ["c", 2]}},
              "o1": {"class_type": "Sink", "inputs": {"value": ["ours", 0]}},
              "o2": {"class_type": "Sink", "inputs": {"value": ["pack", 0]}}}
    torch.testing.assert_close(engine.value(prompt, "pack")[0], engine.value(prompt, "ours")[0])
    assert engine.value(prompt, "pack", 1) == [8]
