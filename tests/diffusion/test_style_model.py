"""The T2I-Adapter style model against a forward written here over the file's own tensors, and its loader's
errors for files that are not style models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion.checkpoints.files import CheckpointError, read_state_dict
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.models.clip_vision import write_random_clip_vision
from diffusion.models.style_model import StyleAdapterConfig, load_style_model, write_random_style_model


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    width = sd["style_embedding"].shape[-1]
    tokens = sd["style_embedding"].shape[1]
    h = torch.cat([x, sd["style_embedding"].expand(x.shape[0], -1, -1)], 1)
    h = F.layer_norm(h, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"]).transpose(0, 1)  # [L, N, D]
    i = 0
    while f"transformer_layes.{i}.ln_1.weight" in sd:
        p = f"transformer_layes.{i}."
        a = F.layer_norm(h, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        a, _ = F.multi_head_attention_forward(a, a, a, width, heads, sd[p + "attn.in_proj_weight"],
                                              sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
                                              sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
                                              need_weights=False)
        h = h + a
        m = F.linear(F.layer_norm(h, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]), sd[p + "mlp.c_fc.weight"],
                     sd[p + "mlp.c_fc.bias"])
        h = h + F.linear(m * torch.sigmoid(1.702 * m), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    h = h.transpose(0, 1)[:, -tokens:]
    return F.layer_norm(h, (width,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]


def test_style_model_matches_a_hand_written_forward(tmp_path):
    path = tmp_path / "style.safetensors"
    config = write_random_style_model(path, StyleAdapterConfig(32, 24, 4, 2, 3), seed=2)
    model = load_style_model(path)
    x = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(read_state_dict(path), x, config.num_heads)
    assert ours.shape == (2, 3, 24)
    assert float((ours - ref).norm() / ref.norm()) <= 1e-5
    with pytest.raises(ValueError, match=r"hidden states \[N, tokens, 32\], got \[2, 50, 16\]"):
        model(torch.randn(2, 50, 16))


def test_released_shapes_are_read_from_the_file(tmp_path):
    path = tmp_path / "style.safetensors"
    write_random_style_model(path, StyleAdapterConfig(64, 48, 8, 3, 8))
    assert load_style_model(path).config == StyleAdapterConfig(64, 48, 8, 3, 8)


@pytest.mark.parametrize("kind", ["checkpoint", "clip_vision"])
def test_other_files_are_not_style_models(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "checkpoint":
        write_random_checkpoint(path, "sd1")
    else:
        write_random_clip_vision(path)
    with pytest.raises(CheckpointError, match="not a T2I-Adapter style model") as info:
        load_style_model(path)
    assert str(path) in str(info.value)
