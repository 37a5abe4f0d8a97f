"""Our CLIP text model (diffusion/models/clip_text.py) against transformers' CLIPTextModel and
CLIPTextModelWithProjection on the same random weights: every output in fp32 to 1e-5, embedding slots, batches,
bf16 on the CPU, layer streaming, and the parameter names that loading, LoRA and saving rely on."""

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion.checkpoints.clip_keys import from_transformers
from diffusion.memory import ModelManager
from diffusion.models.clip_text import ClipTextConfig, ClipTextModel, quick_gelu
from diffusion.models.text_encoders import ClipTextEncoder, TextEncoderConfig, build_clip_model
from diffusion.patches.lora import kohya_text_names
from diffusion.patches.patcher import ModelPatcher
from tests.diffusion.random_weights import randomize_, relative_error

BOS, EOS = 49406, 49407
HEADS, WIDTH, LAYERS = 4, 64, 3
TOLERANCE = 1e-5


def transformers_clip(act: str, projection: int | None, seed: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=2 * WIDTH + 3, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=77, hidden_act=act, projection_dim=projection or WIDTH,
        layer_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, attn_implementation="sdpa",
    )
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    return randomize_(model, seed).eval().requires_grad_(False)


def ours_from(theirs: torch.nn.Module, act: str) -> ClipTextModel:
    sd = {k: v.clone() for k, v in from_transformers(theirs.state_dict()).items()}
    return build_clip_model(sd, TextEncoderConfig.from_state_dict(sd, num_heads=HEADS, hidden_act=act))


def text_part(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "text_model", model)


def batch_ids() -> torch.Tensor:
    """Three rows: a short prompt padded with the end token, a longer one padded with 0 (OpenCLIP), and one
    whose end token comes late (every row pools at its first end token)."""
    gen = torch.Generator().manual_seed(5)
    words = torch.randint(1, 49000, (3, 60), generator=gen).tolist()
    rows = [[BOS, *words[0][:4], EOS, *[EOS] * 71], [BOS, *words[1][:20], EOS, *[0] * 55],
            [BOS, *words[2][:60], EOS, *[EOS] * 15]]
    return torch.tensor(rows)


CASES = [("quick_gelu", None), ("gelu", None), ("quick_gelu", 24), ("gelu", 40)]


@pytest.mark.parametrize(("act", "projection"), CASES)
def test_every_output_matches_transformers(act, projection):
    theirs = transformers_clip(act, projection, seed=len(act) + (projection or 0))
    ours = ours_from(theirs, act)
    ids = batch_ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids, output_hidden_states=True)
        expected_text = text_part(theirs)(input_ids=ids)  # the pooled state before the projection
        got = ours(ids, output_hidden_states=True)
    assert got.last_hidden_state.shape == (3, 77, WIDTH)
    assert relative_error(got.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
    assert len(got.hidden_states) == len(expected.hidden_states) == LAYERS + 1
    for mine, reference in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert relative_error(mine, reference) <= TOLERANCE
    assert relative_error(got.pooler_output, expected_text.pooler_output) <= TOLERANCE
    if projection is None:
        assert got.text_embeds is None
    else:
        assert got.text_embeds.shape == (3, projection)
        assert relative_error(got.text_embeds, expected.text_embeds) <= TOLERANCE
    # pooling reads each row's first end token
    firsts = [5, 21, 61]
    assert torch.equal(got.pooler_output, got.last_hidden_state[torch.arange(3), firsts])
    assert ours(ids).hidden_states is None


def test_activation_is_the_configured_one():
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    ids = batch_ids()[:1]
    gelu = ours_from(transformers_clip("gelu", None, seed=1), "gelu")
    quick = ours_from(transformers_clip("gelu", None, seed=1), "quick_gelu")  # same weights, other activation
    assert relative_error(quick(ids).last_hidden_state, gelu(ids).last_hidden_state) > 1e-3
    with pytest.raises(ValueError, match="activation"):
        ClipTextModel(ClipTextConfig(16, 1, 2, 32, hidden_act="relu"))


@pytest.mark.parametrize(("act", "projection"), [("quick_gelu", None), ("gelu", 24)])
def test_embedding_slot_in_a_batch_matches_a_patched_token_table(act, projection):
    """A ClipTextEncoder chunk with a tensor (an embedding file's vector) equals transformers run on a copy of the
    token table with that vector in a spare row; the other chunk of the batch is untouched."""
    theirs = transformers_clip(act, projection, seed=3)
    pad = EOS if projection is None else 0
    encoder = ClipTextEncoder(ours_from(theirs, act), pad_id=pad, layer=-2, layer_norm_hidden=True)
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(9))
    spare = 7
    patched = copy.deepcopy(theirs)
    with torch.no_grad():
        text_part(patched).embeddings.token_embedding.weight[spare] = vector
    plain = [BOS, 320, 1125, EOS, *[pad] * 73]
    chunks = [[(t, 1.0) for t in plain], [(t, 1.0) for t in [BOS, 320, spare, 1125, EOS, *[pad] * 72]]]
    chunks[1][2] = (vector, 1.0)
    ids = torch.tensor([plain, [BOS, 320, spare, 1125, EOS, *[pad] * 72]])
    with torch.no_grad():
        expected = patched(input_ids=ids, output_hidden_states=True)
        hidden, pooled = encoder.forward(chunks)
        norm = text_part(patched).final_layer_norm
        assert relative_error(hidden, norm(expected.hidden_states[-2])) <= TOLERANCE
        reference_pooled = expected.pooler_output if projection is None else expected.text_embeds
        assert relative_error(pooled, reference_pooled) <= TOLERANCE
        last, _ = encoder.with_layer(None).forward(chunks)
        assert relative_error(last, expected.last_hidden_state) <= TOLERANCE
    assert not encoder.model.text_model.embeddings.token_embedding._forward_hooks  # the hook is removed


def test_bf16_on_the_cpu_matches_transformers_in_bf16():
    theirs = transformers_clip("gelu", 24, seed=4)
    ours = ours_from(theirs, "gelu")
    ids = batch_ids()
    with torch.no_grad():
        full = ours(ids)
        theirs_bf16, ours_bf16 = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
        expected, got = theirs_bf16(input_ids=ids), ours_bf16(ids)
    assert got.last_hidden_state.dtype == torch.bfloat16 and ours_bf16.dtype == torch.bfloat16
    for mine, reference in ((got.last_hidden_state, expected.last_hidden_state),
                            (got.text_embeds, expected.text_embeds)):
        assert relative_error(mine.float(), reference.float()) <= 2e-2  # bf16 has 8 bits of mantissa
    assert relative_error(got.last_hidden_state.float(), full.last_hidden_state) <= 5e-2


def test_names_and_config_are_what_loading_lora_and_saving_read():
    theirs = transformers_clip("quick_gelu", 24, seed=6)
    ours = ours_from(theirs, "quick_gelu")
    layout = from_transformers(theirs.state_dict())
    assert list(ours.state_dict()) == list(layout)  # our layout, in transformers' order
    assert "text_projection.weight" in layout and "text_projection.bias" not in layout
    assert kohya_text_names({"g": ours}) == kohya_text_names({"g": theirs})  # LoRA files name the same layers
    flat = transformers_clip("quick_gelu", None, seed=6)  # transformers 5's CLIPTextModel has no text_model level
    mine, its = kohya_text_names({"l": ours_from(flat, "quick_gelu")})["l"], kohya_text_names({"l": flat})["l"]
    assert mine == {"text_model." + module: kohya for module, kohya in its.items()}
    config = ours.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (WIDTH, LAYERS, HEADS)
    assert (config.intermediate_size, config.projection_dim, config.eos_token_id) == (2 * WIDTH + 3, 24, EOS)
    assert not any(t.is_meta or t.requires_grad for t in ours.parameters()) and not ours.training


def test_streamed_layer_by_layer_matches_the_loaded_model():
    ours = ours_from(transformers_clip("gelu", 24, seed=8), "gelu")
    ids = batch_ids()
    with torch.no_grad():
        reference = ours(ids, output_hidden_states=True)
    manager = ModelManager("cpu", "cpu", budget_bytes=0, low_memory=True)
    (module,) = manager.load([ModelPatcher(ours, "cpu", "cpu")])
    with torch.no_grad():
        out = module(ids, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.hidden_states[-2], reference.hidden_states[-2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, reference.text_embeds, rtol=1e-5, atol=1e-6)
    manager.unload_all()


def test_too_many_tokens_is_an_error():
    model = ours_from(transformers_clip("gelu", None, seed=2), "gelu")
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.full((1, 78), EOS))
