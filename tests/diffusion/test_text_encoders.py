"""Text encoders: key conversions and outputs against transformers (and diffusers' OpenCLIP converter) on
tiny random CLIPs, clip skip, prompt weighting and embedding slots."""

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion.checkpoints.clip_keys import (
    KeyLayoutError,
    from_open_clip,
    text_encoder_state_dict,
    to_hf_checkpoint,
    to_open_clip,
)
from diffusion.models.text_encoders import TextEncoderConfig, TextEncoders
from diffusion.text.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
CAT, DOG = 2368, 1929
HEADS = 4


def tiny_clip(seed, hidden=32, projection=None, act="quick_gelu", layers=2):
    """A transformers CLIP text model with seeded random weights (norms and biases included)."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 3,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        attn_implementation="sdpa",
    )
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # layer-norm scales around 1, biases around 0
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model.eval()


def ours(model):
    """A transformers model's state dict in our layout (`text_model.` level always present)."""
    sd = model.state_dict()
    if not hasattr(model, "text_model"):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return {k: v.clone() for k, v in sd.items() if not k.endswith("position_ids")}


def reference(model, ids):
    """(outputs, pooled or text_embeds, the final layer norm) of a transformers model or of ours."""
    text = getattr(model, "text_model", model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), output_hidden_states=True)
    pooled = out.pooler_output if getattr(out, "text_embeds", None) is None else out.text_embeds
    return out, pooled, text.final_layer_norm


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def chunk_ids(tokens, pad):
    return [BOS, *tokens, EOS, *[pad] * (75 - len(tokens))]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def clip_l():
    return tiny_clip(1)


@pytest.fixture(scope="module")
def clip_h():
    return tiny_clip(2, hidden=32, projection=16, act="gelu")


@pytest.fixture(scope="module")
def clip_g():
    return tiny_clip(3, hidden=48, projection=24, act="gelu")


@pytest.fixture(scope="module")
def sd1(clip_l, tokenizer):
    return TextEncoders.from_state_dict(
        to_hf_checkpoint(ours(clip_l), "cond_stage_model.transformer."),
        "sd1",
        tokenizer=tokenizer,
        num_heads=HEADS,
    )


def test_config_from_state_dict(clip_g):
    config = TextEncoderConfig.from_state_dict(ours(clip_g), num_heads=HEADS, hidden_act="gelu")
    assert (config.hidden_size, config.num_layers, config.intermediate_size, config.num_heads) == (
        48,
        2,
        99,
        4,
    )
    assert (config.vocab_size, config.max_positions, config.projection_dim) == (49408, 77, 24)
    assert TextEncoderConfig.from_state_dict(ours(clip_g)).num_heads == 1  # 48 // 64 → at least one
    with pytest.raises(KeyError, match="token_embedding"):
        TextEncoderConfig.from_state_dict({})


def test_sd1_hf_layout_matches_transformers(sd1, clip_l, tokenizer):
    cond, pooled = sd1.encode("a photo of a cat")
    out, ref_pooled, _ = reference(clip_l, [chunk_ids([320, 1125, 539, 320, CAT], EOS)])
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 32)
    assert close(cond, out.last_hidden_state) and close(pooled, ref_pooled)


def test_weights_are_assigned_not_copied(clip_l):
    sd = to_hf_checkpoint(ours(clip_l), "cond_stage_model.transformer.")
    model = TextEncoders.from_state_dict(sd, "sd1", num_heads=HEADS).encoders["l"].model
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert model.text_model.embeddings.token_embedding.weight.data_ptr() == sd[key].data_ptr()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_hf_layout_without_text_model_level(sd1, clip_l):
    flat = {k.removeprefix("text_model."): v for k, v in ours(clip_l).items()}
    flat["embeddings.position_ids"] = torch.arange(77)[None]
    old = TextEncoders.from_state_dict(
        {"cond_stage_model.transformer." + k: v for k, v in flat.items()}, "sd1", num_heads=HEADS
    )
    # the same weights bit for bit (two copies of them, so outputs are compared up to float32 rounding)
    theirs, mine = old.encoders["l"].model.state_dict(), sd1.encoders["l"].model.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert close(old.encode("cat dog")[0], sd1.encode("cat dog")[0], tol=1e-6)


def test_open_clip_layout_round_trip_and_diffusers(clip_h):
    convert_open_clip_checkpoint = pytest.importorskip(
        "diffusers.loaders.single_file_utils"
    ).convert_open_clip_checkpoint
    prefix = "cond_stage_model.model."
    written = to_open_clip(ours(clip_h), prefix)
    assert (
        f"{prefix}transformer.resblocks.1.attn.in_proj_weight" in written
        and f"{prefix}logit_scale" in written
    )
    assert written[f"{prefix}text_projection"].shape == (32, 16)
    # our reading back gives the original tensors exactly
    back, unexpected = from_open_clip(written, prefix)
    assert not unexpected and back.keys() == ours(clip_h).keys()
    assert all(torch.equal(back[k], v) for k, v in ours(clip_h).items())
    # diffusers' converter reads our OpenCLIP layout into a model that behaves like the original
    theirs = copy.deepcopy(clip_h)
    theirs.load_state_dict(convert_open_clip_checkpoint(theirs, written, prefix), strict=False)
    ids = [chunk_ids([CAT, DOG], 0)]
    (a, pa, _), (b, pb, _) = reference(theirs, ids), reference(clip_h, ids)
    assert close(a.last_hidden_state, b.last_hidden_state) and close(pa, pb)


def test_sd2_penultimate_with_final_norm(clip_h):
    sd = to_open_clip(ours(clip_h), "cond_stage_model.model.")
    sd["cond_stage_model.model.visual.proj"] = torch.zeros(2, 2)  # vision tower keys are ignored
    encoders = TextEncoders.from_state_dict(sd, "sd2", num_heads=HEADS)
    cond, pooled = encoders.encode("cat dog")
    out, ref_pooled, final_norm = reference(clip_h, [chunk_ids([CAT, DOG], 0)])
    with torch.no_grad():
        expected = final_norm(out.hidden_states[-2])
    assert close(cond, expected) and close(pooled, ref_pooled) and pooled.shape == (1, 16)


def sdxl_checkpoint(clip_l, clip_g):
    return {
        **to_hf_checkpoint(ours(clip_l), "conditioner.embedders.0.transformer."),
        **to_open_clip(ours(clip_g), "conditioner.embedders.1.model."),
    }


def test_sdxl_concatenates_penultimate_without_norm(clip_l, clip_g):
    encoders = TextEncoders.from_state_dict(sdxl_checkpoint(clip_l, clip_g), "sdxl", num_heads=HEADS)
    for clip_skip, index in ((None, -2), (-2, -2), (-1, -1)):
        cond, pooled = encoders.encode("cat dog", clip_skip=clip_skip)
        l_out, _, _ = reference(clip_l, [chunk_ids([CAT, DOG], EOS)])
        g_out, g_pooled, _ = reference(clip_g, [chunk_ids([CAT, DOG], 0)])
        expected = torch.cat([l_out.hidden_states[index], g_out.hidden_states[index]], dim=-1)
        assert cond.shape == (1, 77, 80) and close(cond, expected)
        assert pooled.shape == (1, 24) and close(pooled, g_pooled)


def test_sdxl_refiner_is_bigg_only(clip_g):
    encoders = TextEncoders.from_state_dict(
        to_open_clip(ours(clip_g), "conditioner.embedders.0.model."), "sdxl_refiner", num_heads=HEADS
    )
    assert list(encoders.encoders) == ["g"]
    cond, pooled = encoders.encode("cat")
    out, ref_pooled, _ = reference(clip_g, [chunk_ids([CAT], 0)])
    assert close(cond, out.hidden_states[-2]) and close(pooled, ref_pooled)


def test_sd1_clip_skip_picks_layer(clip_l, tokenizer):
    encoders = TextEncoders.from_state_dict(
        to_hf_checkpoint(ours(tiny_clip(4, layers=3)), "cond_stage_model.transformer."),
        "sd1",
        num_heads=HEADS,
    )
    model = encoders.encoders["l"].model
    out, _, final_norm = reference(model, [chunk_ids([CAT], EOS)])
    with torch.no_grad():
        for clip_skip in (-1, -2, -3):
            expected = final_norm(out.hidden_states[clip_skip])
            assert close(encoders.encode("cat", clip_skip=clip_skip)[0], expected)
        assert not close(final_norm(out.hidden_states[-2]), final_norm(out.hidden_states[-3]))
    assert close(encoders.encode("cat")[0], out.last_hidden_state)


def test_clip_skip_beyond_layers_falls_back_to_last(sd1, clip_l, caplog):
    with caplog.at_level(logging.WARNING):
        cond, _ = sd1.encode("cat", clip_skip=-24)
    assert "beyond" in caplog.text
    assert torch.equal(cond, sd1.encode("cat")[0])
    with pytest.raises(ValueError, match="negative"):
        sd1.encode("cat", clip_skip=1)


def test_clone_shares_models_and_keeps_options_apart(sd1):
    clone = sd1.clone()
    clone.clip_skip = -2
    assert clone.encoders["l"].model is sd1.encoders["l"].model and sd1.clip_skip is None
    assert not torch.equal(clone.encode("cat")[0], sd1.encode("cat")[0])
    assert torch.equal(clone.encode("cat")[0], sd1.encode("cat", clip_skip=-2)[0])


def test_weight_one_equals_plain(sd1):
    assert torch.equal(sd1.encode("(cat:1.0) dog")[0], sd1.encode("cat dog")[0])


def test_weight_moves_only_its_token(sd1, clip_l):
    plain, _ = sd1.encode("cat dog")
    weighted, pooled = sd1.encode("cat (dog:1.5)")
    empty, _, _ = reference(clip_l, [[BOS, EOS, *[EOS] * 75]])
    z_empty = empty.last_hidden_state[0]
    changed = (weighted != plain).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [2]
    assert close(weighted[0, 2], (plain[0, 2] - z_empty[2]) * 1.5 + z_empty[2])
    assert torch.equal(pooled, sd1.encode("cat dog")[1])


def test_long_prompt_is_concatenated_chunks(sd1, clip_l):
    cond, pooled = sd1.encode(" ".join(["cat"] * 100))
    assert cond.shape == (1, 154, 32)
    first, first_pooled, _ = reference(clip_l, [chunk_ids([CAT] * 75, EOS)])
    second, _, _ = reference(clip_l, [chunk_ids([CAT] * 25, EOS)])
    assert close(cond[:, :77], first.last_hidden_state) and close(cond[:, 77:], second.last_hidden_state)
    assert close(pooled, first_pooled)


def test_embedding_slots_are_placed(sd1, clip_l, tmp_path):
    token_table = clip_l.embeddings.token_embedding.weight.detach()
    vector = torch.randn(32, generator=torch.Generator().manual_seed(7))
    save_file({"emb_params": token_table[CAT][None].clone()}, tmp_path / "likecat.safetensors")
    save_file({"emb_params": vector[None].clone()}, tmp_path / "random.safetensors")
    encoders = sd1.clone()
    encoders.embedding_dirs = [tmp_path]
    assert close(encoders.encode("embedding:likecat dog")[0], sd1.encode("cat dog")[0], tol=1e-6)
    # reference: the same vector written into a spare row of a copy of the token table
    patched = copy.deepcopy(clip_l)
    with torch.no_grad():
        patched.embeddings.token_embedding.weight[5] = vector
    out, pooled, _ = reference(patched, [chunk_ids([CAT, 5, DOG], EOS)])
    cond, ours_pooled = encoders.encode("cat embedding:random dog")
    assert close(cond, out.last_hidden_state) and close(ours_pooled, pooled)


def test_missing_and_unexpected_keys_are_reported(clip_l, clip_g):
    sd = to_hf_checkpoint(ours(clip_l), "cond_stage_model.transformer.")
    broken = dict(sd)
    del broken["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing .*encoder\.layers\.1\.mlp\.fc2\.bias"):
        TextEncoders.from_state_dict(broken, "sd1", num_heads=HEADS)
    with pytest.raises(KeyLayoutError, match=r"unexpected key.*mystery"):
        text_encoder_state_dict(
            {**sd, "cond_stage_model.transformer.mystery": torch.zeros(1)}, "cond_stage_model.transformer."
        )
    open_clip = to_open_clip(ours(clip_g), "m.")
    with pytest.raises(KeyLayoutError, match=r"resblocks\.0\.attn\.weird"):
        text_encoder_state_dict({**open_clip, "m.transformer.resblocks.0.attn.weird": torch.zeros(1)}, "m.")
    with pytest.raises(KeyError, match="clip_g"):
        TextEncoders.from_state_dict(sd, "sdxl_refiner")
    with pytest.raises(ValueError, match="unknown model family"):
        TextEncoders.from_state_dict(sd, "sd9")


def test_inverse_conversions_accept_transformers_state_dicts(clip_l, clip_g):
    prefix = "cond_stage_model.transformer."
    written = to_hf_checkpoint(clip_l.state_dict(), prefix, with_position_ids=True)
    position_ids = prefix + "text_model.embeddings.position_ids"
    assert written.keys() == {prefix + k for k in ours(clip_l)} | {position_ids}
    assert torch.equal(written[position_ids], torch.arange(77)[None])
    loaded = TextEncoders.from_state_dict(written, "sd1", num_heads=HEADS)
    out, _, _ = reference(clip_l, [chunk_ids([CAT], EOS)])
    assert close(loaded.encode("cat")[0], out.last_hidden_state)
    from_model = to_open_clip(clip_g.state_dict(), "m.")
    assert all(torch.equal(v, from_model[k]) for k, v in to_open_clip(ours(clip_g), "m.").items())


def test_sdxl_embedding_file_gives_each_encoder_its_entry(clip_l, clip_g, tmp_path):
    l_row = clip_l.embeddings.token_embedding.weight[CAT].detach().clone()
    g_row = clip_g.text_model.embeddings.token_embedding.weight[DOG].detach().clone()
    save_file({"clip_l": l_row[None], "clip_g": g_row[None]}, tmp_path / "xl.safetensors")
    encoders = TextEncoders.from_state_dict(
        sdxl_checkpoint(clip_l, clip_g), "sdxl", num_heads=HEADS, embedding_dirs=[tmp_path]
    )
    cond, _ = encoders.encode("embedding:xl")
    assert close(cond[..., :32], encoders.encode("cat")[0][..., :32], tol=1e-6)
    assert close(cond[..., 32:], encoders.encode("dog")[0][..., 32:], tol=1e-6)
