"""IPAdapterModelLoader, IPAdapterUnifiedLoader, IPAdapter, IPAdapterAdvanced, IPAdapterEncoder and IPAdapterEmbeds
end to end on tiny random models: the reference image changes the result, weight 0 does not, the input MODEL
stays unpatched, embeddings and images agree, and bad inputs get errors naming node, value and file."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoints.loader import load_checkpoint
from diffusion.models.clip_vision import write_random_clip_vision
from diffusion.models.ip_adapter import write_random_ip_adapter
from diffusion.patches.ip_adapter_patch import IPAdapterHandle
from graph.validation import validate_prompt

VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def setup_files(engine, model_dir) -> dict:
    models = engine.env.models_dir
    vision = write_random_clip_vision(models / "clip_vision" / VISION, seed=1, projection_dim=24)
    unet = load_checkpoint(model_dir / "sd1.safetensors").unet
    xl_unet = load_checkpoint(model_dir / "sdxl.safetensors").unet
    folder = models / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    write_random_ip_adapter(folder / "ip-adapter_sd15.safetensors", unet, "plain", clip_dim=24, seed=2)
    write_random_ip_adapter(folder / "plus.bin", unet, "plus", clip_dim=vision.hidden_size, width=64, depth=2,
                            seed=3)
    write_random_ip_adapter(folder / "xl.safetensors", xl_unet, "plain", clip_dim=24, seed=4)
    (folder / "notes.safetensors").write_bytes(b"not a model at all")
    for i, (r, g) in enumerate([(255, 0), (0, 200)]):
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[..., 0], pixels[8:40, 16:48, 1] = r, g
        Image.fromarray(pixels).save(engine.env.input_dir / f"ref{i}.png")
    return {"hidden": vision.hidden_size}


def base_prompt(ckpt: str = "sd1.safetensors", model: list | None = None) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a car", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "30": {"class_type": "LoadImage", "inputs": {"image": "ref0.png"}},
        "31": {"class_type": "LoadImage", "inputs": {"image": "ref1.png"}},
        "32": {"class_type": "ImageBatch", "inputs": {"image1": ["30", 0], "image2": ["31", 0]}},
        "40": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": model or ["4", 0], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "ip"}},
    }


def advanced(file: str = "ip-adapter_sd15.safetensors", image: list | None = None, **inputs) -> dict:
    values = {"weight": 1.0, "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
              "embeds_scaling": "V only", **inputs}
    return {
        "20": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": file}},
        "21": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["4", 0], "ipadapter": ["20", 0], "image": image or ["30", 0], "clip_vision": ["40", 0],
            **values}},
    }


def samples(engine, prompt) -> torch.Tensor:
    return engine.outputs(prompt, "3")[0][0]["samples"]


def with_adapter(nodes: dict, node: str = "21", **base) -> dict:
    return {**base_prompt(model=[node, 0], **base), **nodes}


def test_the_reference_image_changes_the_result_and_weight_zero_does_not(engine, model_dir):
    setup_files(engine, model_dir)
    plain = samples(engine, base_prompt())
    loaded = engine.outputs(with_adapter(advanced()), "20")[0][0]
    assert isinstance(loaded, IPAdapterHandle) and loaded.model.info.variant == "plain"
    guided = samples(engine, with_adapter(advanced()))
    assert (guided - plain).abs().max() > 1e-3
    other = samples(engine, with_adapter(advanced(image=["31", 0])))
    assert (other - guided).abs().max() > 1e-3  # the image matters, not only the adapter
    assert torch.equal(samples(engine, with_adapter(advanced(weight=0.0))), plain)
    assert torch.equal(samples(engine, base_prompt()), plain)  # the loader's MODEL is not patched
    # active only on the second half of 2 steps: differs from both the full range and no adapter
    late = samples(engine, with_adapter(advanced(start_at=0.6)))
    assert (late - plain).abs().max() > 1e-4 and (late - guided).abs().max() > 1e-4


def test_plus_bin_with_two_images_combined(engine, model_dir):
    setup_files(engine, model_dir)
    plain = samples(engine, base_prompt())
    results = {}
    for method in ("concat", "average", "subtract"):
        prompt = with_adapter(advanced("plus.bin", image=["32", 0], combine_embeds=method))
        results[method] = samples(engine, prompt)
        assert (results[method] - plain).abs().max() > 1e-3
    assert (results["concat"] - results["average"]).abs().max() > 1e-4
    assert (results["average"] - results["subtract"]).abs().max() > 1e-4


def test_encoder_and_embeds_equal_the_advanced_node(engine, model_dir):
    setup_files(engine, model_dir)
    for file in ("ip-adapter_sd15.safetensors", "plus.bin"):
        nodes = advanced(file)
        nodes["22"] = {"class_type": "IPAdapterEncoder", "inputs": {
            "ipadapter": ["20", 0], "image": ["30", 0], "weight": 1.0, "clip_vision": ["40", 0]}}
        nodes["23"] = {"class_type": "IPAdapterEmbeds", "inputs": {
            "model": ["4", 0], "ipadapter": ["20", 0], "pos_embed": ["22", 0], "neg_embed": ["22", 1],
            "weight": 1.0, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}}
        assert torch.equal(samples(engine, with_adapter(nodes, "23")), samples(engine, with_adapter(nodes, "21")))
        doubled = dict(nodes, **{"22": {**nodes["22"], "inputs": {**nodes["22"]["inputs"], "weight": 2.0}}})
        pos = engine.outputs(with_adapter(doubled, "23"), "22")[0]
        single = engine.outputs(with_adapter(nodes, "23"), "22")[0]
        torch.testing.assert_close(pos[0], single[0] * 2)


def test_unified_loader_and_simple_node(engine, model_dir):
    setup_files(engine, model_dir)
    nodes = {
        "24": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["4", 0],
                                                                  "preset": "STANDARD (medium strength)"}},
        "25": {"class_type": "IPAdapter", "inputs": {"model": ["24", 0], "ipadapter": ["24", 1], "image": ["30", 0],
                                                     "weight": 1.0, "start_at": 0.0, "end_at": 1.0,
                                                     "weight_type": "standard"}},
    }
    simple = samples(engine, with_adapter({**nodes, **advanced()}, "25"))
    torch.testing.assert_close(simple, samples(engine, with_adapter(advanced())))
    plus = dict(nodes, **{"24": {**nodes["24"], "inputs": {**nodes["24"]["inputs"], "preset": "PLUS (high strength)"}}})
    message = engine.error(with_adapter(plus, "25"))
    assert "PLUS (high strength)" in message and "ip-adapter-plus_sd15.safetensors" in message


def test_errors_name_node_value_and_file(engine, model_dir):
    setup_files(engine, model_dir)
    message = engine.error(with_adapter(advanced("xl.safetensors")))
    assert "IPAdapterAdvanced" in message and "'xl.safetensors'" in message and "this model is SD1.x" in message
    message = engine.error(with_adapter(advanced("notes.safetensors")))
    assert "IPAdapterModelLoader" in message and "notes.safetensors" in message
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"image_proj": {"proj.weight": torch.ones(1)}, "ip_adapter": Evil()},
               engine.env.models_dir / "ipadapter" / "evil.bin")
    message = engine.error(with_adapter(advanced("evil.bin")))
    assert "IPAdapterModelLoader" in message and "evil.bin" in message and "refused" in message
    assert str(engine.env.models_dir) not in message  # named relative to the data directory
    traversal = validate_prompt(with_adapter(advanced("../checkpoints/x.safetensors")), engine.registry, engine.env)
    assert not traversal.ok and "ipadapter_file" in str(traversal.response())
    message = engine.error(with_adapter(advanced(embeds_scaling="K+V")))
    assert "'K+V'" in message
    nodes = advanced()
    nodes["21"]["inputs"].pop("clip_vision")
    assert "no CLIP vision model" in engine.error(with_adapter(nodes))
    nodes = advanced()
    nodes["25"] = {"class_type": "IPAdapter", "inputs": {"model": ["4", 0], "ipadapter": ["20", 0],
                                                         "image": ["30", 0], "weight": 1.0, "start_at": 0.0,
                                                         "end_at": 1.0, "weight_type": "standard"}}
    assert "IPAdapterUnifiedLoader" in engine.error(with_adapter(nodes, "25"))


def has(config: dict, expected: dict) -> bool:
    return all(config.get(k) == v for k, v in expected.items())


def test_interfaces_match_the_node_pack(engine):
    """The declarations as ComfyUI_IPAdapter_plus's nodes declare them (names, order, defaults, ranges, outputs)."""
    info = engine.registry.object_info(engine.env)
    adv = info["IPAdapterAdvanced"]
    assert list(adv["input"]["required"]) == ["model", "ipadapter", "image", "weight", "weight_type",
                                              "combine_embeds", "start_at", "end_at", "embeds_scaling"]
    assert list(adv["input"]["optional"]) == ["image_negative", "attn_mask", "clip_vision"]
    assert has(adv["input"]["required"]["weight"][1], {"default": 1.0, "min": -1, "max": 5, "step": 0.05})
    assert adv["input"]["required"]["combine_embeds"][0] == ["concat", "add", "subtract", "average", "norm average"]
    assert adv["input"]["required"]["weight_type"][0][:3] == ["linear", "ease in", "ease out"]
    assert has(adv["input"]["required"]["end_at"][1], {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})
    assert adv["category"] == "ipadapter" and adv["display_name"] == "IPAdapter Advanced"
    simple = info["IPAdapter"]
    assert list(simple["input"]["required"]) == ["model", "ipadapter", "image", "weight", "start_at", "end_at",
                                                 "weight_type"]
    assert simple["input"]["required"]["weight"][1]["max"] == 3
    assert simple["input"]["required"]["weight_type"][0] == ["standard", "prompt is more important", "style transfer"]
    enc = info["IPAdapterEncoder"]
    assert enc["output"] == ["EMBEDS", "EMBEDS"] and enc["output_name"] == ["pos_embed", "neg_embed"]
    assert enc["category"] == "ipadapter/embeds"
    emb = info["IPAdapterEmbeds"]
    assert list(emb["input"]["required"]) == ["model", "ipadapter", "pos_embed", "weight", "weight_type", "start_at",
                                              "end_at", "embeds_scaling"]
    assert list(emb["input"]["optional"]) == ["neg_embed", "attn_mask", "clip_vision"]
    unified = info["IPAdapterUnifiedLoader"]
    assert unified["output"] == ["MODEL", "IPADAPTER"] and unified["output_name"] == ["model", "ipadapter"]
    assert unified["input"]["required"]["preset"][0][0] == "LIGHT - SD1.5 only (low strength)"
    combine = info["IPAdapterCombineEmbeds"]
    assert list(combine["input"]["required"]) == ["embed1", "method"]
    assert combine["input"]["required"]["method"][0] == ["concat", "add", "subtract", "average", "norm average",
                                                         "max", "min"]
    assert list(combine["input"]["optional"]) == ["embed2", "embed3", "embed4", "embed5"]
    assert combine["output"] == ["EMBEDS"] and combine["category"] == "ipadapter/embeds"
    loader = info["IPAdapterModelLoader"]
    assert list(loader["input"]["required"]) == ["ipadapter_file"] and loader["category"] == "ipadapter/loaders"


def test_weighted_embeds_combined(engine, model_dir):
    """Two encoders with their own weights, averaged by IPAdapterCombineEmbeds, into IPAdapterEmbeds (the pack's
    weighted-embeds recipe): the average of the weighted embeddings."""
    setup_files(engine, model_dir)
    nodes = advanced("plus.bin")
    for node, image, weight in (("22", "30", 1.5), ("26", "31", 0.6)):
        nodes[node] = {"class_type": "IPAdapterEncoder", "inputs": {
            "ipadapter": ["20", 0], "image": [image, 0], "weight": weight, "clip_vision": ["40", 0]}}
    nodes["27"] = {"class_type": "IPAdapterCombineEmbeds", "inputs": {"embed1": ["22", 0], "method": "average",
                                                                      "embed2": ["26", 0]}}
    nodes["23"] = {"class_type": "IPAdapterEmbeds", "inputs": {
        "model": ["4", 0], "ipadapter": ["20", 0], "pos_embed": ["27", 0], "neg_embed": ["22", 1],
        "weight": 0.8, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}}
    prompt = with_adapter(nodes, "23")
    a, b = engine.outputs(prompt, "22")[0][0], engine.outputs(prompt, "26")[0][0]
    combined = engine.outputs(prompt, "27")[0][0]
    torch.testing.assert_close(combined, (a + b) / 2)
    assert (samples(engine, prompt) - samples(engine, base_prompt())).abs().max() > 1e-3
    nodes["27"]["inputs"]["method"] = "max"
    torch.testing.assert_close(engine.outputs(with_adapter(nodes, "23"), "27")[0][0], torch.maximum(a, b))
    nodes["27"]["inputs"]["embed2"] = ["22", 1]  # [1, tokens, width] besides [1, tokens, width]: same shape, fine
    nodes["28"] = {"class_type": "IPAdapterEncoder", "inputs": {
        "ipadapter": ["29", 0], "image": ["31", 0], "weight": 1.0, "clip_vision": ["40", 0]}}
    nodes["29"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}}
    nodes["27"]["inputs"]["embed3"] = ["28", 0]  # image embeds [1, 24] among hidden states
    assert "differ in shape" in engine.error(with_adapter(nodes, "23"))


def test_attn_mask_on_the_apply_node(engine, model_dir):
    """A zero mask leaves the sampler's result exactly as without the adapter, a full one exactly as without a
    mask, a half mask in between; several masks are refused."""
    setup_files(engine, model_dir)
    plain = samples(engine, base_prompt())
    unmasked = samples(engine, with_adapter(advanced()))

    def masked(value: float) -> dict:
        nodes = advanced(attn_mask=["50", 0])
        nodes["50"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": 64, "height": 64}}
        return with_adapter(nodes)

    assert torch.equal(samples(engine, masked(0.0)), plain)
    assert torch.equal(samples(engine, masked(1.0)), unmasked)
    half = samples(engine, masked(0.5))
    assert (half - plain).abs().max() > 1e-4 and (half - unmasked).abs().max() > 1e-4
    three = masked(1.0)
    three["51"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    three["52"] = {"class_type": "MaskComposite", "inputs": {"destination": ["50", 0], "source": ["51", 0], "x": 0,
                                                             "y": 0, "operation": "add"}}
    three["53"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["54", 0], "amount": 3}}
    three["54"] = {"class_type": "MaskToImage", "inputs": {"mask": ["52", 0]}}
    three["55"] = {"class_type": "ImageToMask", "inputs": {"image": ["53", 0], "channel": "red"}}
    three["21"]["inputs"]["attn_mask"] = ["55", 0]
    message = engine.error(three)
    assert "IPAdapterAdvanced: attn_mask must be one MASK [1, H, W]" in message and "[3, 64, 64]" in message


def test_every_weight_type_runs_on_sd1_and_sdxl(engine, model_dir):
    """Each weight type of IPAdapterAdvanced and IPAdapterEmbeds samples on a tiny SD1 and SDXL model: finite,
    different from no adapter, and the layer-selecting types differ from linear; the simple node's types are the
    advanced node's "linear", "ease out" and "style transfer"."""
    from diffusion.patches.ip_adapter_weights import WEIGHT_TYPES

    setup_files(engine, model_dir)
    for ckpt, file in (("sd1.safetensors", "ip-adapter_sd15.safetensors"), ("sdxl.safetensors", "xl.safetensors")):
        plain = samples(engine, base_prompt(ckpt))
        results = {}
        for weight_type in WEIGHT_TYPES:
            out = samples(engine, with_adapter(advanced(file, weight=1.5, weight_type=weight_type), ckpt=ckpt))
            assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4, (ckpt, weight_type)
            results[weight_type] = out
        for weight_type in ("style transfer", "composition", "ease in", "weak middle", "composition precise"):
            assert (results[weight_type] - results["linear"]).abs().max() > 1e-4, (ckpt, weight_type)
        nodes = advanced(file)
        nodes["22"] = {"class_type": "IPAdapterEncoder", "inputs": {
            "ipadapter": ["20", 0], "image": ["30", 0], "weight": 1.0, "clip_vision": ["40", 0]}}
        nodes["23"] = {"class_type": "IPAdapterEmbeds", "inputs": {
            "model": ["4", 0], "ipadapter": ["20", 0], "pos_embed": ["22", 0], "neg_embed": ["22", 1],
            "weight": 1.5, "weight_type": "style transfer precise", "start_at": 0.0, "end_at": 1.0,
            "embeds_scaling": "V only"}}
        assert torch.equal(samples(engine, with_adapter(nodes, "23", ckpt=ckpt)), results["style transfer precise"])
    simple = {"24": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["4", 0],
                                                                        "preset": "STANDARD (medium strength)"}}}
    for simple_type, rule in (("standard", "linear"), ("prompt is more important", "ease out"),
                              ("style transfer", "style transfer")):
        simple["25"] = {"class_type": "IPAdapter", "inputs": {
            "model": ["24", 0], "ipadapter": ["24", 1], "image": ["30", 0], "weight": 0.8, "start_at": 0.0,
            "end_at": 1.0, "weight_type": simple_type}}
        ours = samples(engine, with_adapter({**simple, **advanced()}, "25"))
        assert torch.equal(ours, samples(engine, with_adapter(advanced(weight=0.8, weight_type=rule))))
