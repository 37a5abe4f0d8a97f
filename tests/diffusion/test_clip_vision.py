"""CLIP vision towers: both file layouts against transformers and against a ViT forward written here over the
OpenCLIP tensors themselves (the key conversion is what could be wrong), preprocessing against hand-computed
values, detection of the real towers from their shapes, and the errors for files that are not towers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModelWithProjection

from diffusion.checkpoints.files import read_state_dict
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.handles import ClipVisionModel
from diffusion.memory import ModelManager
from diffusion.models.clip_vision import (
    PRESETS,
    ClipVisionError,
    clip_vision_layout,
    config_from_state_dict,
    encode_image,
    load_clip_vision,
    to_open_clip,
    to_transformers_layout,
    write_random_clip_vision,
)
from diffusion.models.clip_vision_preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from diffusion.patches.patcher import ModelPatcher, module_nbytes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def image(seed: int = 0, shape=(2, 40, 56, 3)) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def reference_transformers(path, config) -> CLIPVisionModelWithProjection:
    """transformers' own model, built normally and loaded with its own load_state_dict (no code of ours)."""
    model = CLIPVisionModelWithProjection(config.transformers_config()).eval()
    sd = {k: v.clone() for k, v in read_state_dict(path).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return model


def test_hf_layout_matches_transformers(tmp_path):
    path = tmp_path / "vision.safetensors"
    config = write_random_clip_vision(path, layout="hf", seed=1)
    ours = encode_image(load_clip_vision(path), image())
    ref = reference_transformers(path, config)
    with torch.no_grad():
        out = ref(pixel_values=clip_preprocess(image(), 224), output_hidden_states=True)
    assert rel(ours.image_embeds, out.image_embeds) <= 1e-5
    assert rel(ours.last_hidden_state, out.last_hidden_state) <= 1e-5
    assert rel(ours.penultimate_hidden_states, out.hidden_states[-2]) <= 1e-5
    assert ours.image_embeds.shape == (2, config.projection_dim)
    assert ours.last_hidden_state.shape == (2, (224 // config.patch_size) ** 2 + 1, config.hidden_size)
    assert ours["image_embeds"] is ours.image_embeds


def _act(name: str):
    return (lambda x: x * torch.sigmoid(1.702 * x)) if name == "quick_gelu" else F.gelu


def open_clip_forward(sd: dict[str, torch.Tensor], prefix: str, pixels: torch.Tensor, heads: int, act: str):
    """A ViT written from the OpenCLIP layout's own tensors (fused in-projection through torch's
    multi-head attention, x @ proj): (image embedding, last hidden state, penultimate hidden state)."""
    p = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    width = p["class_embedding"].shape[0]
    x = F.conv2d(pixels, p["conv1.weight"], stride=p["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([p["class_embedding"].expand(x.shape[0], 1, width), x], 1) + p["positional_embedding"]
    x = F.layer_norm(x, (width,), p["ln_pre.weight"], p["ln_pre.bias"])
    layers = 1 + max(int(k.split(".")[2]) for k in p if k.startswith("transformer.resblocks."))
    states = [x]
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), p[b + "ln_1.weight"], p[b + "ln_1.bias"]).transpose(0, 1)
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"], None, None, False,
            0.0, p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"], need_weights=False)
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (width,), p[b + "ln_2.weight"], p[b + "ln_2.bias"])
        h = F.linear(_act(act)(F.linear(h, p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"])),
                     p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
        x = x + h
        states.append(x)
    pooled = F.layer_norm(x[:, 0], (width,), p["ln_post.weight"], p["ln_post.bias"])
    return pooled @ p["proj"], x, states[-2]


@pytest.mark.parametrize("prefix, act", [("visual.", "gelu"), ("embedder.model.visual.", "quick_gelu")])
def test_open_clip_layout_matches_a_hand_written_vit(tmp_path, prefix, act):
    path = tmp_path / "open_clip.safetensors"
    config = write_random_clip_vision(path, layout="open_clip", prefix=prefix, seed=2, hidden_act=act)
    ours = encode_image(load_clip_vision(path), image(3))
    with torch.no_grad():
        embeds, last, penultimate = open_clip_forward(read_state_dict(path), prefix, clip_preprocess(image(3), 224),
                                                      config.num_heads, act)
    assert rel(ours.image_embeds, embeds) <= 1e-5
    assert rel(ours.last_hidden_state, last) <= 1e-5
    assert rel(ours.penultimate_hidden_states, penultimate) <= 1e-5


def test_the_same_weights_in_both_layouts_encode_alike(tmp_path):
    hf = tmp_path / "hf.safetensors"
    write_random_clip_vision(hf, layout="hf", seed=4)
    sd = read_state_dict(hf)
    converted = to_open_clip({k: v.clone() for k, v in sd.items()})
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in converted and "visual.proj" in converted
    back = to_transformers_layout(converted)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"tiny"}))
@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_real_towers_are_told_apart_by_their_shapes(preset, layout):
    found = config_from_state_dict(to_transformers_layout(clip_vision_layout(PRESETS[preset], layout)))
    assert found == PRESETS[preset]


def test_preprocess_hand_computed_values():
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    # already 224x224: no resampling, only the 8-bit rounding and the normalisation
    flat = torch.full((1, 224, 224, 3), 0.5)
    expected = (128 / 255 - mean) / std  # 127.5 rounds half to even: 128
    assert torch.allclose(clip_preprocess(flat)[0, :, 100, 100], expected, atol=1e-6)
    # 224 x 448, left half black, right half white: "center" keeps columns 112..335 unresampled
    split = torch.zeros(1, 224, 448, 3)
    split[:, :, 224:] = 1.0
    out = clip_preprocess(split, crop=True)
    assert out.shape == (1, 3, 224, 224)
    assert torch.allclose(out[0, :, :, :100], ((0 - mean) / std)[:, None, None].expand(3, 224, 100), atol=1e-5)
    assert torch.allclose(out[0, :, :, 124:], ((1 - mean) / std)[:, None, None].expand(3, 224, 100), atol=1e-5)
    # "none" squeezes the whole width: black and white halves of 112 columns each, the edge blurred
    none = clip_preprocess(split, crop=False)
    assert torch.allclose(none[0, :, :, :100], ((0 - mean) / std)[:, None, None].expand(3, 224, 100), atol=1e-5)
    assert torch.allclose(none[0, :, :, 124:], ((1 - mean) / std)[:, None, None].expand(3, 224, 100), atol=1e-5)
    # shrinking a flat 448x672 image keeps its value; alpha is dropped; 336-pixel towers get 336
    flat = torch.cat([torch.full((1, 448, 672, 3), 0.25), torch.zeros(1, 448, 672, 1)], -1)
    assert torch.allclose(clip_preprocess(flat, 336), ((64 / 255 - mean) / std)[None, :, None, None]
                          .expand(1, 3, 336, 336), atol=1e-5)


def test_preprocess_resizes_the_short_side_then_crops_the_middle():
    # 100 x 300 ramp along x: scaled by 2.24 to 224 x 672, the middle 224 columns are the middle third
    ramp = torch.linspace(0, 1, 300).view(1, 1, 300, 1).expand(1, 100, 300, 3)
    out = clip_preprocess(ramp) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert math.isclose(float(out[0, 0, 50, 112]), 1 / 2, abs_tol=2 / 255)  # the centre stays the centre
    assert math.isclose(float(out[0, 0, 50, 0]), 224 / 672, abs_tol=3 / 255)  # left edge: one third in
    with pytest.raises(ValueError, match=r"IMAGE \[B, H, W, 3\]"):
        clip_preprocess(torch.rand(2, 3, 32, 32)[..., :2])


def test_a_checkpoint_is_not_a_clip_vision_model(tmp_path):
    path = tmp_path / "sd1.safetensors"
    write_random_checkpoint(path, "sd1")
    with pytest.raises(ClipVisionError, match=r"not a CLIP vision model.*Stable Diffusion checkpoint") as info:
        load_clip_vision(path)
    assert str(path) in str(info.value)


def test_a_tower_without_projection_or_with_stray_keys_is_refused():
    layout = clip_vision_layout(PRESETS["tiny"], "open_clip")
    without = {k: v for k, v in layout.items() if k != "visual.proj"}
    with pytest.raises(ClipVisionError, match="no image projection"):
        to_transformers_layout(without)
    with pytest.raises(ClipVisionError, match="unexpected key"):
        to_transformers_layout({**layout, "visual.attnpool.c_proj.weight": torch.zeros(1)})


def test_the_model_manager_loads_and_evicts_clip_vision_like_any_model(tmp_path):
    models = []
    for seed in range(2):
        write_random_clip_vision(tmp_path / f"v{seed}.safetensors", seed=seed)
        models.append(load_clip_vision(tmp_path / f"v{seed}.safetensors"))
    size = module_nbytes(models[0])
    manager = ModelManager("cpu", "cpu", budget_bytes=size + size // 2)  # room for one tower
    handles = [ClipVisionModel(ModelPatcher(m, "cpu", "cpu", name=f"v{i}"), manager) for i, m in enumerate(models)]
    first = handles[0].encode(image())
    assert manager.loaded() == [("v0", size)]
    handles[1].encode(image())
    assert manager.loaded() == [("v1", size)]  # the first was evicted to make room
    assert torch.equal(handles[0].encode(image()).image_embeds, first.image_embeds)
    assert manager.loaded() == [("v0", size)]


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_the_tower_holds_the_files_tensors_without_a_copy(tmp_path, layout):
    from diffusion.models.clip_vision import clip_vision_from_state_dict

    path = tmp_path / "vision.safetensors"
    write_random_clip_vision(path, layout=layout)
    sd = read_state_dict(path)
    model = clip_vision_from_state_dict(sd)
    file_bytes = {t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size() for t in sd.values()}
    starts = {p.data_ptr() for p in model.parameters()}
    if layout == "hf":
        assert starts <= file_bytes  # every parameter is a file tensor itself
    weight = model.vision_model.encoder.layers[0].self_attn.q_proj.weight
    source = sd["vision_model.encoder.layers.0.self_attn.q_proj.weight" if layout == "hf"
                else "visual.transformer.resblocks.0.attn.in_proj_weight"]
    assert weight.data_ptr() == source.data_ptr()  # q is a view of the fused in-projection, not a copy
    assert model.visual_projection.weight.untyped_storage().data_ptr() == \
        sd["visual_projection.weight" if layout == "hf" else "visual.proj"].untyped_storage().data_ptr()


def test_a_pickled_tower_loads_through_the_safe_reader(tmp_path):
    """IP-Adapter's image encoders ship as pytorch_model.bin: read with weights_only, never running code."""
    path = tmp_path / "vision.safetensors"
    config = write_random_clip_vision(path, seed=5, num_heads=16)  # a pickle has no metadata: the real 16 heads
    torch.save({k: v.clone() for k, v in read_state_dict(path).items()}, tmp_path / "pytorch_model.bin")
    pickled = encode_image(load_clip_vision(tmp_path / "pytorch_model.bin"), image())
    assert pickled.image_embeds.shape == (2, config.projection_dim)
    assert torch.equal(pickled.image_embeds, encode_image(load_clip_vision(path), image()).image_embeds)
    (tmp_path / "evil.bin").write_bytes(b"\x80\x02cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(ValueError, match=r"evil\.bin: refused: this pickle needs code to load"):
        load_clip_vision(tmp_path / "evil.bin")
