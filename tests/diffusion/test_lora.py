"""LoRA files in kohya and diffusers/PEFT spellings applied to tiny UNets and CLIPs: hand-computed weights,
unmatched keys, clones, save/load round trips, and the key table checked against diffusers' own converter."""

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file

from diffusion.models.text_encoders import ClipTextEncoder
from diffusion.models.unet import UNetConfig, UNetModel
from diffusion.patches.lora import (
    kohya_text_names,
    kohya_unet_names,
    load_lora,
    lora_patches,
    lora_patches_for_text,
    lora_patches_for_unet,
    save_lora,
    unet_aliases,
)
from diffusion.patches.patcher import LoraDelta, ModelPatcher, WeightDiff
from tests.diffusion.random_weights import relative_error
from tests.diffusion.tiny_models import TINY_SD1, TINY_SDXL, clip_ids, tiny_clip, tiny_unet, unet_inputs

MODEL_STRENGTH, CLIP_STRENGTH = 0.7, 1.3


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.1


def add_lora(sd, name, weight_shape, rank, gen, *, alpha=None, kernel=None, mid=False):
    """Random kohya tensors for layer `name` whose weight has `weight_shape`; conv layers get a k×k down
    (LoCon), or 1×1 down/up around a k×k core with `mid`."""
    out, inp = weight_shape[:2]
    if len(weight_shape) == 2:
        up, down = rand(out, rank, gen=gen), rand(rank, inp, gen=gen)
    elif mid:
        up, down = rand(out, rank, 1, 1, gen=gen), rand(rank, inp, 1, 1, gen=gen)
        sd[f"{name}.lora_mid.weight"] = rand(rank, rank, *weight_shape[2:], gen=gen)
    else:
        k = kernel or weight_shape[2:]
        up, down = rand(out, rank, 1, 1, gen=gen), rand(rank, inp, *k, gen=gen)
    sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)


def expected_delta(sd, name, weight_shape):
    """scale · up @ down (through the core when there is one), computed here with tensordot."""
    up, down = sd[f"{name}.lora_up.weight"].flatten(1), sd[f"{name}.lora_down.weight"].flatten(1)
    rank = down.shape[0]
    scale = sd[f"{name}.alpha"].item() / rank if f"{name}.alpha" in sd else 1.0
    if f"{name}.lora_mid.weight" in sd:
        core = torch.tensordot(sd[f"{name}.lora_mid.weight"], down, dims=([1], [0]))  # [a, h, w, i]
        product = torch.tensordot(up, core, dims=([1], [0])).permute(0, 3, 1, 2)  # [o, i, h, w]
    else:
        product = up @ down
    return scale * product.reshape(weight_shape)


# kohya layer name → our parameter, written out by hand from the tiny layouts (see tiny_models). transformers 5's
# CLIPTextModel has no `text_model.` level; LoRA files spell the layout of transformers 4, which had one.
SD1_UNET_TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k":
        "output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_attentions_0_proj_out": "middle_block.1.proj_out.weight",
    "lora_unet_input_blocks_3_1_proj_in": "input_blocks.3.1.proj_in.weight",  # original-layout spelling
    "lora_unet_down_blocks_1_resnets_0_conv1": "input_blocks.3.0.in_layers.2.weight",  # 3×3 LoCon
    "lora_unet_up_blocks_1_resnets_0_conv2": "output_blocks.2.0.out_layers.3.weight",  # 3×3 with a core
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.1.2.conv.weight",
    "lora_unet_up_blocks_1_resnets_1_conv_shortcut": "output_blocks.3.0.skip_connection.weight",  # 1×1
    "lora_unet_time_embedding_linear_1": "time_embed.0.weight",
}
TEXT_TARGETS = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "encoder.layers.1.mlp.fc1.weight",
}
NOWHERE = {  # keys no layer has: a level the UNet lacks, a layer the 2-layer CLIP lacks, an unknown scheme
    "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
    "lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
    "lora_unet_down_blocks_5_attentions_0_proj_in.alpha": torch.tensor(1.0),
    "lora_te_text_model_encoder_layers_7_mlp_fc2.lora_up.weight": torch.zeros(4, 2),
    "lora_te_text_model_encoder_layers_7_mlp_fc2.lora_down.weight": torch.zeros(2, 4),
    "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 2),
}


def sd1_lora(unet, clip, seed):
    gen = torch.Generator().manual_seed(seed)
    params, clip_params = dict(unet.named_parameters()), dict(clip.named_parameters())
    sd = {}
    for i, (name, target) in enumerate(SD1_UNET_TARGETS.items()):
        alpha = None if i == 0 else float(i)  # the first has no alpha: scale 1
        add_lora(sd, name, params[target].shape, rank=2 + i % 3, gen=gen, alpha=alpha, mid="conv2" in name)
    for name, target in TEXT_TARGETS.items():
        add_lora(sd, name, clip_params[target].shape, rank=3, gen=gen, alpha=2.0)
    sd["lora_unet_conv_in.diff"] = rand(*params["input_blocks.0.0.weight"].shape, gen=gen)
    sd["lora_unet_conv_in.diff_b"] = rand(*params["input_blocks.0.0.bias"].shape, gen=gen)
    return sd


def expected_weights(sd, unet, clip):
    params, clip_params = dict(unet.named_parameters()), dict(clip.named_parameters())
    unet_w = {t: params[t] + MODEL_STRENGTH * expected_delta(sd, n, params[t].shape)
              for n, t in SD1_UNET_TARGETS.items()}
    for kind, part in (("weight", "diff"), ("bias", "diff_b")):
        target = f"input_blocks.0.0.{kind}"
        unet_w[target] = params[target] + MODEL_STRENGTH * sd[f"lora_unet_conv_in.{part}"]
    clip_w = {t: clip_params[t] + CLIP_STRENGTH * expected_delta(sd, n, clip_params[t].shape)
              for n, t in TEXT_TARGETS.items()}
    return unet_w, clip_w


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def check_weights(module, original, expected):
    for key, value in module.state_dict().items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(value, original[key]), f"{key} changed"


@pytest.fixture(scope="module")
def sd1():
    return tiny_unet(TINY_SD1, seed=0), tiny_clip(1)


def apply(lora, unet, clip, strengths=(MODEL_STRENGTH, CLIP_STRENGTH)):
    found = lora_patches(lora, unet_config=TINY_SD1, unet_param_names=[n for n, _ in unet.named_parameters()],
                         text_encoders={"l": clip}, name="test lora")
    model = ModelPatcher(unet, "cpu", "cpu")
    clip_patcher = ModelPatcher(clip, "cpu", "cpu")
    assert model.add_patches(found.unet, strengths[0]) == set(found.unet)
    assert clip_patcher.add_patches(found.text["l"], strengths[1]) == set(found.text["l"])
    return model, clip_patcher, found


def test_kohya_sd1_lora_gives_hand_computed_weights(sd1, tmp_path, caplog):
    unet, clip = sd1
    lora = sd1_lora(unet, clip, seed=2)
    path = tmp_path / "test.safetensors"
    save_file({**lora, **NOWHERE}, str(path))
    original, original_clip = snapshot(unet), snapshot(clip)
    unet_w, clip_w = expected_weights(lora, unet, clip)
    inputs = unet_inputs(TINY_SD1)
    with torch.no_grad():
        plain_out, plain_text = unet(*inputs), clip(input_ids=clip_ids()).last_hidden_state
    with caplog.at_level(logging.WARNING, logger="diffusion.patches.lora"):
        model, clip_patcher, found = apply(load_lora(path), unet, clip)
    assert found.unmatched == sorted(NOWHERE)
    assert "test lora: 6 keys matched nothing" in caplog.text
    assert len(caplog.records) == 1
    assert set(found.unet) == set(unet_w) and set(found.text["l"]) == set(clip_w)
    model.patch()
    clip_patcher.patch()
    try:
        check_weights(unet, original, unet_w)
        check_weights(clip, original_clip, clip_w)
        with torch.no_grad():
            assert relative_error(unet(*inputs), plain_out) > 1e-3
            assert relative_error(clip(input_ids=clip_ids()).last_hidden_state, plain_text) > 1e-3
    finally:
        model.unpatch()
        clip_patcher.unpatch()
    check_weights(unet, original, {})
    check_weights(clip, original_clip, {})


def test_two_clones_with_different_loras_alternate(sd1):
    unet, clip = sd1
    original = snapshot(unet)
    lora_a, lora_b = sd1_lora(unet, clip, seed=3), sd1_lora(unet, clip, seed=4)
    a, _, _ = apply(lora_a, unet, clip)
    base = ModelPatcher(unet, "cpu", "cpu")
    b = base.clone()
    b.add_patches(lora_patches_for_unet(lora_b, TINY_SD1, original)[0], MODEL_STRENGTH)
    expected_a, _ = expected_weights(lora_a, unet, clip)
    expected_b, _ = expected_weights(lora_b, unet, clip)
    for _ in range(2):
        a.patch()
        check_weights(unet, original, expected_a)
        b.patch()
        check_weights(unet, original, expected_b)
        base.patch()
        check_weights(unet, original, {})


def test_each_side_reports_the_other_sides_keys_as_unmatched(sd1):
    unet, clip = sd1
    lora = sd1_lora(unet, clip, seed=5)
    _, unet_missed = lora_patches_for_unet(lora, TINY_SD1, [n for n, _ in unet.named_parameters()])
    _, text_missed = lora_patches_for_text(lora, {"l": clip})
    assert unet_missed == sorted(k for k in lora if k.startswith("lora_te_"))
    assert set(text_missed) == set(lora) - {k for k in lora if k.startswith("lora_te_")}


def test_sdxl_te1_te2_and_linear_proj():
    unet = tiny_unet(TINY_SDXL, seed=6)
    clip_l, clip_g = tiny_clip(7, hidden=32), tiny_clip(8, hidden=48, projection=24)
    gen = torch.Generator().manual_seed(9)
    params = dict(unet.named_parameters())
    targets = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v":
            ("unet", "input_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"),
        "lora_unet_input_blocks_5_1_proj_in": ("unet", "input_blocks.5.1.proj_in.weight"),
        "lora_unet_add_embedding_linear_2": ("unet", "label_emb.0.2.weight"),
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": ("l", "encoder.layers.0.self_attn.k_proj.weight"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("g", "text_model.encoder.layers.1.mlp.fc2.weight"),
        "lora_te2_text_projection": ("g", "text_projection.weight"),
    }
    models = {"unet": unet, "l": clip_l, "g": clip_g}
    lora = {}
    for name, (where, target) in targets.items():
        add_lora(lora, name, dict(models[where].named_parameters())[target].shape, rank=2, gen=gen, alpha=3.0)
    add_lora(lora, "lora_te_text_model_encoder_layers_0_self_attn_k_proj", (32, 32), rank=2, gen=gen)  # SD1 form
    found = lora_patches(lora, unet_config=TINY_SDXL, unet_param_names=params, text_encoders={"l": clip_l, "g": clip_g})
    assert found.unmatched == ["lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight",
                               "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"]
    patched = {"unet": found.unet, **found.text}
    for where, model in models.items():
        original = snapshot(model)
        mine = {t: n for n, (w, t) in targets.items() if w == where}
        strength = MODEL_STRENGTH if where == "unet" else CLIP_STRENGTH
        patcher = ModelPatcher(model, "cpu", "cpu")
        assert patcher.add_patches(patched[where], strength) == set(mine)
        patcher.patch()
        expected = {t: original[t] + strength * expected_delta(lora, n, original[t].shape) for t, n in mine.items()}
        check_weights(model, original, expected)
        patcher.unpatch()
        check_weights(model, original, {})


def diffusers_twin(unet: UNetModel, config: UNetConfig) -> UNet2DConditionModel:
    """diffusers' UNet for the tiny SD1 layout, loaded through diffusers' own checkpoint converter."""
    dconfig = {
        "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2,
        "cross_attention_dim": config.context_dim, "attention_head_dim": [2, 2], "norm_num_groups": 8,
    }
    theirs = UNet2DConditionModel(**dconfig).eval()
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dconfig), strict=True)
    return theirs


def test_every_diffusers_layer_maps_to_the_weight_diffusers_converts_it_from(sd1):
    unet, _ = sd1
    theirs = diffusers_twin(unet, TINY_SD1)
    ours = dict(unet.named_parameters())
    table = unet_aliases(TINY_SD1, ours)
    checked = 0
    for name, weight in theirs.named_parameters():
        module, kind = name.rsplit(".", 1)
        for alias in ("lora_unet_" + module.replace(".", "_"), "unet." + module, module):
            target = ours[f"{table[alias]}.{kind}"]
            assert torch.equal(target.flatten(), weight.detach().flatten()), (alias, name)
        checked += 1
    assert checked == len(ours)


def diffusers_forms(module: str, up: torch.Tensor, down: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    forms = [
        {f"unet.{module}.lora.up.weight": up, f"unet.{module}.lora.down.weight": down},
        {f"unet.{module}.lora_linear_layer.up.weight": up, f"unet.{module}.lora_linear_layer.down.weight": down},
        {f"unet.{module}.lora_B.weight": up, f"unet.{module}.lora_A.weight": down},
        {f"base_model.model.{module}.lora_B.weight": up, f"base_model.model.{module}.lora_A.weight": down},
    ]
    parent, _, leaf = module.rpartition(".")
    if leaf in ("to_q", "to_k", "to_v", "0"):
        if leaf == "0":  # to_out.0
            proc = parent.rpartition(".")[0] + ".processor.to_out_lora"
        else:
            proc = f"{parent}.processor.{leaf}_lora"
        forms.append({f"{proc}.up.weight": up, f"{proc}.down.weight": down})
    return forms


def test_diffusers_and_peft_spellings_match_kohya_and_diffusers_itself(sd1):
    unet, _ = sd1
    theirs = diffusers_twin(unet, TINY_SD1)
    names = [n for n, _ in unet.named_parameters()]
    gen = torch.Generator().manual_seed(10)
    modules = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "up_blocks.0.resnets.1.time_emb_proj",
    ]
    kohya = {}
    for module in modules:
        out, inp = theirs.get_parameter(module + ".weight").shape
        up, down = rand(out, 3, gen=gen), rand(3, inp, gen=gen)
        kohya["lora_unet_" + module.replace(".", "_") + ".lora_up.weight"] = up
        kohya["lora_unet_" + module.replace(".", "_") + ".lora_down.weight"] = down
        with torch.no_grad():  # diffusers' model gets the update directly, on its own parameter
            theirs.get_parameter(module + ".weight").add_(MODEL_STRENGTH * (up @ down))
        for form in diffusers_forms(module, up, down):
            patches, unmatched = lora_patches_for_unet(form, TINY_SD1, names)
            assert unmatched == [], form.keys()
            assert len(patches) == 1
            ((target, patch),) = patches.items()
            ((kohya_target, kohya_patch),) = lora_patches_for_unet(
                {k: v for k, v in kohya.items() if module.replace(".", "_") + ".lora" in k}, TINY_SD1, names
            )[0].items()
            assert target == kohya_target
            assert torch.equal(patch.up, kohya_patch.up) and torch.equal(patch.down, kohya_patch.down)
    patches, unmatched = lora_patches_for_unet(kohya, TINY_SD1, names)
    assert unmatched == [] and len(patches) == len(modules)
    patcher = ModelPatcher(unet, "cpu", "cpu")
    patcher.add_patches(patches, MODEL_STRENGTH)
    x, t, context = unet_inputs(TINY_SD1)
    with torch.no_grad():
        patcher.patch()
        try:
            ours = unet(x, t, context)
        finally:
            patcher.unpatch()
        reference = theirs(x, t, context).sample
        assert relative_error(unet(x, t, context), reference) > 1e-3, "the LoRA must change the output"
    assert relative_error(ours, reference) < 1e-4


def test_text_encoder_diffusers_spellings():
    clip_l, clip_g = tiny_clip(11), tiny_clip(12, hidden=48, projection=24)
    gen = torch.Generator().manual_seed(13)
    up, down = rand(32, 2, gen=gen), rand(2, 32, gen=gen)
    up_g, down_g = rand(96, 2, gen=gen), rand(2, 48, gen=gen)
    lora = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight": up_g,
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight": down_g,
    }
    patches, unmatched = lora_patches_for_text(lora, {"l": clip_l, "g": clip_g})
    assert unmatched == []
    assert list(patches["l"]) == ["encoder.layers.0.self_attn.q_proj.weight"]
    assert list(patches["g"]) == ["text_model.encoder.layers.1.mlp.fc1.weight"]
    assert torch.equal(patches["g"]["text_model.encoder.layers.1.mlp.fc1.weight"].up, up_g)
    single, unmatched = lora_patches_for_text(lora, {"l": ClipTextEncoder(clip_l, pad_id=999)})  # SD1
    assert list(single["l"]) == ["encoder.layers.0.self_attn.q_proj.weight"]
    assert unmatched == sorted(k for k in lora if k.startswith("text_encoder_2."))
    with pytest.raises(ValueError, match="one or two text encoders"):
        lora_patches_for_text(lora, {"l": clip_l, "g": clip_g, "h": clip_l})
    with pytest.raises(TypeError, match="text encoders"):
        lora_patches_for_text(lora, [clip_l])


def test_saved_lora_loads_back_onto_the_same_weights(sd1, tmp_path):
    unet, clip = sd1
    gen = torch.Generator().manual_seed(14)
    unet_names, text_names = kohya_unet_names(TINY_SD1, dict(unet.named_parameters())), kohya_text_names({"l": clip})
    params = dict(unet.named_parameters())
    ours = {  # our module → patch, as a training node would produce them
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v": LoraDelta(rand(32, 4, gen=gen), rand(4, 32, gen=gen), 2.0),
        "output_blocks.2.0.in_layers.2": LoraDelta(rand(32, 2, 1, 1, gen=gen), rand(2, 96, 3, 3, gen=gen), 1.0),
        "middle_block.0.in_layers.2": LoraDelta(rand(64, 2, 1, 1, gen=gen), rand(2, 64, 1, 1, gen=gen), 1.0,
                                                mid=rand(2, 2, 3, 3, gen=gen)),
        "out.2": WeightDiff(rand(*params["out.2.weight"].shape, gen=gen)),
    }
    text = {"encoder.layers.1.self_attn.out_proj": LoraDelta(rand(32, 2, gen=gen), rand(2, 32, gen=gen))}
    layers = {unet_names[m]: p for m, p in ours.items()} | {text_names["l"][m]: p for m, p in text.items()}
    path = tmp_path / "trained.safetensors"
    save_lora(path, layers, metadata={"ss_network_dim": "4"})
    assert all(name.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block",
                                "lora_unet_conv_out", "lora_te_")) for name in layers)
    found = lora_patches(load_lora(path), unet_config=TINY_SD1, unet_param_names=params, text_encoders={"l": clip})
    assert found.unmatched == []
    assert set(found.unet) == {m + ".weight" for m in ours}
    assert set(found.text["l"]) == {m + ".weight" for m in text}
    loaded = {**found.unet, **found.text["l"]}
    for module, patch in [*ours.items(), *text.items()]:
        back = loaded[module + ".weight"]
        assert type(back) is type(patch)
        if isinstance(patch, WeightDiff):
            assert torch.equal(back.diff, patch.diff)
            continue
        assert torch.equal(back.up, patch.up) and torch.equal(back.down, patch.down)
        assert back.alpha == patch.alpha
        assert (back.mid is None and patch.mid is None) or torch.equal(back.mid, patch.mid)
    pt = tmp_path / "trained.pt"
    torch.save({"state_dict": load_lora(path)}, pt)  # pickle-free .pt, one level down as some trainers write
    assert set(load_lora(pt)) == set(load_lora(path))
    unet_only = lora_patches(load_lora(pt), unet_config=TINY_SD1, unet_param_names=params)
    assert set(unet_only.unet) == set(found.unet)
    assert unet_only.unmatched == []  # the lora_te_ keys are for a part not given (LoraLoaderModelOnly): no mismatch
    assert ModelPatcher(unet, "cpu").add_patches(found.unet) == set(found.unet)  # the shapes fit the model
    assert ModelPatcher(clip, "cpu").add_patches(found.text["l"]) == set(found.text["l"])


def test_bad_files_and_broken_layers_raise_clear_errors(tmp_path, sd1):
    unet, _ = sd1
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        load_lora(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        load_lora(junk)
    pickled = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], pickled)
    with pytest.raises(ValueError, match="list"):
        load_lora(pickled)
    with pytest.raises(ValueError, match="not tensors"):
        load_lora({"a.alpha": 1.0})
    lonely = {"lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(ValueError, match=r"lora_unet_conv_in.*counterpart"):
        lora_patches_for_unet(lonely, TINY_SD1, [n for n, _ in unet.named_parameters()])
    wrong = {"lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2),
             "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5)}
    patches, _ = lora_patches_for_unet(wrong, TINY_SD1, [n for n, _ in unet.named_parameters()])
    with pytest.raises(ValueError, match=r"input_blocks\.0\.0\.weight"):
        ModelPatcher(unet, "cpu").add_patches(patches)


@pytest.mark.parametrize("config", [UNetConfig.sd1(), UNetConfig.sd2(), UNetConfig.sdxl(), UNetConfig.sdxl_refiner()])
def test_real_layouts_have_one_layer_per_spelling(config):
    with torch.device("meta"):
        names = [n for n, _ in UNetModel(config).named_parameters()]
    table = unet_aliases(config, names)  # raises if two layers shared a spelling
    kohya = kohya_unet_names(config, names)
    assert len(set(kohya.values())) == len(kohya) == len({n.rsplit(".", 1)[0] for n in names})
    assert all(table[k] == m for m, k in kohya.items())
