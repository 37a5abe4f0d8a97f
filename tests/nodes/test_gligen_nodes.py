"""GLIGENLoader and GLIGENTextBoxApply end to end on the tiny random SD1 checkpoint and random GLIGEN files."""

from __future__ import annotations

import torch

from diffusion.checkpoints.random_checkpoints import checkpoint_spec
from diffusion.models.gligen import write_random_gligen
from diffusion.models.unet import UNetModel
from diffusion.patches.gligen_patch import GLIGENHandle
from graph.validation import validate_prompt

PHRASE = 16  # pooled width of the tiny SD1 CLIP


def write_gligen(engine, name: str, alpha: float = 0.5, seed: int = 0) -> None:
    with torch.device("meta"):
        unet = UNetModel(checkpoint_spec("sd1").unet)
    write_random_gligen(engine.env.models_dir / "gligen" / name, unet, PHRASE, seed=seed, alpha=alpha)


def grounded(gligen="g.safetensors", ckpt="sd1.safetensors", boxes=2, seed=3):
    """txt2img whose positive prompt is grounded by `boxes` chained GLIGENTextBoxApply nodes (0: none)."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bottle and a sun", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "10": {"class_type": "GLIGENLoader", "inputs": {"gligen_name": gligen}},
    }
    positive = ["6", 0]
    for k, (text, w, h, x, y) in enumerate([("purple bottle", 24, 32, 8, 8), ("sun", 16, 16, 40, 0)][:boxes]):
        node = str(20 + k)
        prompt[node] = {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": positive, "clip": ["4", 1], "gligen_textbox_model": ["10", 0], "text": text,
            "width": w, "height": h, "x": x, "y": y}}
        positive = [node, 0]
    prompt["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    prompt["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "gligen"}}
    if not boxes:  # keep the loader an ancestor of an output only when it is used
        del prompt["10"]
    return prompt


def test_boxes_chain_onto_the_conditioning(engine):
    write_gligen(engine, "g.safetensors")
    conditioning = engine.outputs(grounded(), "21")[0][0]
    (tensor, options), = conditioning
    kind, handle, boxes = options["gligen"]
    assert kind == "position" and isinstance(handle, GLIGENHandle) and handle.name == "g.safetensors"
    assert [b[1:] for b in boxes] == [(4.0, 3.0, 1.0, 1.0), (2.0, 2.0, 0.0, 5.0)]  # (h, w, y, x) in latent units
    assert all(b[0].shape == (1, PHRASE) for b in boxes) and not torch.equal(boxes[0][0], boxes[1][0])
    assert "pooled_output" in options and tensor.shape[-1] == 16
    first = engine.outputs(grounded(), "20")[0][0]
    assert len(first[0][1]["gligen"][2]) == 1  # the earlier node's output is not changed by the later one


def test_grounding_changes_the_sample_and_zero_gates_do_not(engine):
    write_gligen(engine, "g.safetensors", alpha=0.5)
    write_gligen(engine, "zero.safetensors", alpha=0.0)
    plain = engine.outputs(grounded(boxes=0), "3")[0][0]["samples"]
    with_boxes = engine.outputs(grounded(), "3")[0][0]["samples"]
    with_zero = engine.outputs(grounded("zero.safetensors"), "3")[0][0]["samples"]
    assert plain.shape == with_boxes.shape == (1, 4, 6, 8)
    assert torch.isfinite(with_boxes).all()
    assert (with_boxes - plain).abs().max() > 1e-3
    assert torch.allclose(with_zero, plain, atol=1e-5, rtol=0)
    one_box = engine.outputs(grounded(boxes=1), "3")[0][0]["samples"]
    assert (one_box - with_boxes).abs().max() > 1e-4


def test_sdxl_or_sd2_clip_with_an_sd1_gligen_names_both(engine):
    write_gligen(engine, "gligen_sd14_textbox_pruned.safetensors")
    for ckpt, family in (("sdxl.safetensors", "SDXL"), ("sd2-v.safetensors", "SD2.x")):
        error = engine.failure(grounded("gligen_sd14_textbox_pruned.safetensors", ckpt=ckpt, boxes=1))
        message = error["exception_message"]
        assert error["node_id"] == "20", message
        assert "gligen_sd14_textbox_pruned.safetensors" in message and f"{family} checkpoint" in message, message


def test_loader_rejects_a_file_that_is_not_gligen(engine):
    folder = engine.env.models_dir / "gligen"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    error = engine.failure(grounded("notes.safetensors", boxes=1))
    assert error["node_id"] == "10" and "notes.safetensors" in error["exception_message"], error
    assert "not a GLIGEN" in error["exception_message"], error["exception_message"]
    validation = validate_prompt(grounded("../checkpoints/sd1.safetensors", boxes=1), engine.registry, engine.env)
    assert not validation.ok and "gligen_name" in str(validation.response())


def with_attention_guidance(prompt: dict, patch: str, **inputs) -> dict:
    """The grounded txt2img with `patch` (PAG or SAG) between the checkpoint and the KSampler."""
    prompt["30"] = {"class_type": patch, "inputs": {"model": ["4", 0], **inputs}}
    prompt["3"]["inputs"]["model"] = ["30", 0]
    return prompt


def test_grounding_survives_the_extra_evaluation_of_attention_guidance(engine):
    """PAG and SAG evaluate the model once more with their own UNet patches; GLIGEN's grounding patches must
    stay on that call (they used to collide: 'multiple values for keyword argument unet_patches')."""
    write_gligen(engine, "g.safetensors")
    for patch, inputs in (("PerturbedAttentionGuidance", {"scale": 3.0}),
                          ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})):
        grounded_run = engine.outputs(with_attention_guidance(grounded(), patch, **inputs), "3")[0][0]["samples"]
        plain_run = engine.outputs(with_attention_guidance(grounded(boxes=0), patch, **inputs), "3")[0][0]["samples"]
        assert torch.isfinite(grounded_run).all(), patch
        assert (grounded_run - plain_run).abs().max() > 1e-3, patch
