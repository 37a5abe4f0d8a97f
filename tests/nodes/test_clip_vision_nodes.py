"""CLIPVisionLoader, CLIPVisionEncode, unCLIPCheckpointLoader, unCLIPConditioning, StyleModelLoader and
StyleModelApply end to end on tiny random models, and their errors for wrong files and wrong models."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.checkpoints.random_unclip import write_random_unclip_checkpoint
from diffusion.handles import ClipVisionModel
from diffusion.models.clip_vision import ClipVisionOutput, encode_image, load_clip_vision, write_random_clip_vision
from diffusion.models.style_model import StyleAdapterConfig, write_random_style_model
from graph.executor import Executor
from graph.node import Node, Socket
from graph.validation import validate_prompt

TEXT = 16  # hidden and pooled width of the tiny text encoders


class Sink(Node):
    """An output node taking anything, so a prompt can end at a CLIP_VISION or a CLIP_VISION_OUTPUT."""

    output_node = True
    inputs = [Socket("source", "*")]
    outputs = []

    def execute(self, source):
        return ()


def setup_files(engine) -> None:
    if "Sink" not in engine.registry:
        engine.registry.register(Sink)
    models = engine.env.models_dir
    write_random_clip_vision(models / "clip_vision" / "vision.safetensors", seed=1, projection_dim=TEXT)
    write_random_clip_vision(models / "clip_vision" / "vision_oc.safetensors", layout="open_clip", seed=2)
    write_random_checkpoint(models / "clip_vision" / "not_vision.safetensors", "sd1")
    write_random_unclip_checkpoint(models / "checkpoints" / "unclip.safetensors", seed=4)
    write_random_style_model(models / "style_models" / "style.safetensors", StyleAdapterConfig(32, TEXT, 2, 2, 4))
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:, :, 0] = np.linspace(0, 255, 64, dtype=np.uint8)  # a ramp: cropping and squeezing differ
    pixels[10:30, 20:40, 1] = 200
    Image.fromarray(pixels).save(engine.env.input_dir / "reference.png")


def image_node() -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": "reference.png"}}


def encode_prompt(clip_name="vision.safetensors", crop="center") -> dict:
    return {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}},
            "2": image_node(),
            "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 0], "image": ["2", 0],
                                                               "crop": crop}},
            "9": {"class_type": "Sink", "inputs": {"source": ["3", 0]}}}


def sample_prompt(ckpt: str, vision: list, positive_extra: dict, seed: int = 1) -> dict:
    """txt2img whose positive prompt goes through `positive_extra` nodes (their last one is "20")."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a car", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "2": image_node(),
        "11": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": vision, "image": ["2", 0],
                                                            "crop": "center"}},
        **positive_extra,
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["20", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "vision"}},
    }
    return prompt


def unclip_node(strength=1.0, augmentation=0.0, conditioning=("6", 0)) -> dict:
    return {"class_type": "unCLIPConditioning", "inputs": {
        "conditioning": list(conditioning), "clip_vision_output": ["11", 0], "strength": strength,
        "noise_augmentation": augmentation}}


def test_clip_vision_loader_and_encode(engine):
    setup_files(engine)
    vision = engine.outputs(encode_prompt(), "1")[0][0]
    assert isinstance(vision, ClipVisionModel)
    output = engine.outputs(encode_prompt(), "3")[0][0]
    assert isinstance(output, ClipVisionOutput)
    assert output.image_embeds.shape == (1, TEXT) and output.last_hidden_state.shape == (1, 50, 32)
    assert output.penultimate_hidden_states.shape == (1, 50, 32)
    image = engine.outputs(encode_prompt(), "2")[0][0]
    direct = encode_image(load_clip_vision(engine.env.models_dir / "clip_vision" / "vision.safetensors"), image)
    assert torch.allclose(output.image_embeds, direct.image_embeds, rtol=2e-2, atol=2e-2)  # bf16 on some CPUs
    squeezed = engine.outputs(encode_prompt(crop="none"), "3")[0][0]
    assert not torch.allclose(squeezed.last_hidden_state, output.last_hidden_state)
    open_clip = engine.outputs(encode_prompt("vision_oc.safetensors"), "3")[0][0]
    assert open_clip.image_embeds.shape == (1, 16)


def test_clip_vision_loader_refuses_a_checkpoint(engine):
    setup_files(engine)
    message = engine.error(encode_prompt("not_vision.safetensors"))
    assert "clip_vision/not_vision.safetensors" in message and "not a CLIP vision model" in message
    assert "Stable Diffusion checkpoint" in message


def test_unclip_conditioning_adds_to_every_entry(engine):
    setup_files(engine)
    prompt = sample_prompt("sdxl.safetensors", ["1", 0], {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vision.safetensors"}},
        "12": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                "conditioning_2": ["7", 0]}},
        "13": unclip_node(0.75, 0.2, ("12", 0)),
        "20": unclip_node(-1.5, 0.0, ("13", 0)),
    })
    first = engine.outputs(prompt, "13")[0][0]
    chained = engine.outputs(prompt, "20")[0][0]
    assert len(first) == len(chained) == 2
    for (_, opts), (_, opts2) in zip(first, chained, strict=True):
        assert [(u["strength"], u["noise_augmentation"]) for u in opts["unclip_conditioning"]] == [(0.75, 0.2)]
        assert [(u["strength"], u["noise_augmentation"]) for u in opts2["unclip_conditioning"]] == [(0.75, 0.2),
                                                                                                     (-1.5, 0.0)]
        assert isinstance(opts2["unclip_conditioning"][1]["clip_vision_output"], ClipVisionOutput)
    zero = dict(prompt, **{"20": unclip_node(0.0, 0.5, ("12", 0))})
    assert engine.outputs(zero, "20")[0][0] == engine.outputs(zero, "12")[0][0]  # strength 0: unchanged


def test_sdxl_revision_samples_and_the_image_matters(engine):
    setup_files(engine)
    loader = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vision.safetensors"}}}
    plain = sample_prompt("sdxl.safetensors", ["1", 0], {**loader, "20": {
        "class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["6", 0]}}})
    revised = sample_prompt("sdxl.safetensors", ["1", 0], {**loader, "20": unclip_node(0.75)})
    a = engine.outputs(plain, "3")[0][0]["samples"]
    b = engine.outputs(revised, "3")[0][0]["samples"]
    engine.executor = Executor(env=engine.env)  # an empty output cache: the sampler runs again
    again = engine.outputs(revised, "3")[0][0]["samples"]
    assert again is not b and torch.isfinite(b).all() and (a - b).abs().max() > 1e-3
    assert torch.equal(again, b)  # the image embedding's noise is seeded: the same picture again


def test_unclip_checkpoint_loader_samples_with_its_own_image_encoder(engine):
    setup_files(engine)
    prompt = sample_prompt("unclip.safetensors", ["4", 3], {"20": unclip_node(1.0, 0.1)})
    prompt["4"] = {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "unclip.safetensors"}}
    outputs = engine.outputs(prompt, "4")
    assert isinstance(outputs[3][0], ClipVisionModel) and outputs[0][0].family.unclip
    with_image = engine.outputs(prompt, "3")[0][0]["samples"]
    weaker = engine.outputs(dict(prompt, **{"20": unclip_node(0.2, 0.1)}), "3")[0][0]["samples"]
    assert torch.isfinite(with_image).all() and (with_image - weaker).abs().max() > 1e-3


def test_unclip_loader_on_a_plain_checkpoint_and_unclip_on_sd1_are_clear_errors(engine):
    setup_files(engine)
    prompt = {"4": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "sd1.safetensors"}},
              "9": {"class_type": "Sink", "inputs": {"source": ["4", 3]}}}
    message = engine.error(prompt)
    assert "sd1.safetensors" in message and "not a unCLIP image encoder model" in message
    assert "SD1.x (eps-prediction)" in message
    sd1 = sample_prompt("sd1.safetensors", ["1", 0], {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vision.safetensors"}},
        "20": unclip_node()})
    assert "unCLIPConditioning does not apply to a SD1.x (eps-prediction) model" in engine.error(sd1)


def style_prompt(strength=1.0, strength_type="multiply", ckpt="sd1.safetensors") -> dict:
    return sample_prompt(ckpt, ["1", 0], {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vision_oc.safetensors"}},
        "13": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "style.safetensors"}},
        "20": {"class_type": "StyleModelApply", "inputs": {
            "conditioning": ["6", 0], "style_model": ["13", 0], "clip_vision_output": ["11", 0],
            "strength": strength, "strength_type": strength_type}}})


def test_style_model_appends_its_tokens(engine):
    setup_files(engine)
    text = engine.outputs(style_prompt(), "6")[0][0]
    styled = engine.outputs(style_prompt(), "20")[0][0]
    (t, _), (s, opts) = text[0], styled[0]
    assert s.shape == (1, t.shape[1] + 4, TEXT)
    assert torch.equal(s[:, :t.shape[1]], t) and "pooled_output" in opts
    half = engine.outputs(style_prompt(0.5), "20")[0][0][0][0]
    assert torch.allclose(half[:, t.shape[1]:], 0.5 * s[:, t.shape[1]:], atol=1e-6)
    bias_at_one = engine.outputs(style_prompt(1.0, "attn_bias"), "20")[0][0][0][0]
    assert torch.equal(bias_at_one, s)
    samples = engine.outputs(style_prompt(), "3")[0][0]["samples"]
    assert torch.isfinite(samples).all()


def test_style_model_errors(engine):
    setup_files(engine)
    write_random_style_model(engine.env.models_dir / "style_models" / "wide.safetensors",
                             StyleAdapterConfig(32, 24, 2, 1, 2))
    wide = style_prompt()
    wide["13"] = {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "wide.safetensors"}}
    assert "the style model makes 24-wide tokens but the conditioning is 16 wide" in engine.error(wide)
    vision = style_prompt()
    vision["13"] = {"class_type": "StyleModelLoader",
                    "inputs": {"style_model_name": "../clip_vision/vision.safetensors"}}
    assert not validate_prompt(vision, engine.registry, engine.env).ok  # names cannot leave their folder
    write_random_clip_vision(engine.env.models_dir / "style_models" / "vision.safetensors")
    vision["13"]["inputs"]["style_model_name"] = "vision.safetensors"
    message = engine.error(vision)
    assert "style_models/vision.safetensors" in message and "not a T2I-Adapter style model" in message
