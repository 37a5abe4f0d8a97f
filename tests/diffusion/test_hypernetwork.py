"""Hypernetworks: files in A1111's pickled layout (written here with torch.save of plain dicts and tensors), the
MLPs they hold, attention computed by hand with the patch, composition, and what is refused."""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.checkpoints.files import CheckpointError
from diffusion.models.unet import UNetModel
from diffusion.models.unet_blocks import BasicTransformerBlock
from diffusion.patches.hypernetwork import (
    attention_input_widths,
    check_hypernetwork_fits,
    hypernetwork_patches,
    load_hypernetwork,
)
from diffusion.patches.unet_patches import Site
from tests.diffusion.random_weights import randomize_
from tests.diffusion.tiny_models import TINY_SD1, tiny_unet, unet_inputs

SITE = Site(block=("input", 1), latent_shape=(1, 4, 8, 8), timesteps=torch.zeros(1))


def layers(width: int, structure=(1, 2, 1), layer_norm=False, activation=True, dropout=False, seed=0):
    """One MLP's state dict as A1111 numbers it: Linear, [activation], [LayerNorm], [Dropout] per step."""
    gen = torch.Generator().manual_seed(seed)
    state, index = collections.OrderedDict(), 0
    for i in range(len(structure) - 1):
        n_in, n_out = int(width * structure[i]), int(width * structure[i + 1])
        state[f"linear.{index}.weight"] = torch.randn(n_out, n_in, generator=gen) * 0.2
        state[f"linear.{index}.bias"] = torch.randn(n_out, generator=gen) * 0.1
        index += 1
        if activation and i < len(structure) - 2:
            index += 1  # the activation module has no parameters
        if layer_norm:
            state[f"linear.{index}.weight"] = 1 + torch.randn(n_out, generator=gen) * 0.1
            state[f"linear.{index}.bias"] = torch.randn(n_out, generator=gen) * 0.1
            index += 1
        if dropout and i < len(structure) - 2:
            index += 1
    return state


def write_hypernetwork(path, widths=(16,), activation="relu", layer_norm=False, seed=0, **extra):
    data = {w: [layers(w, layer_norm=layer_norm, activation=activation != "linear", seed=seed + 2 * k),
                layers(w, layer_norm=layer_norm, activation=activation != "linear", seed=seed + 2 * k + 1)]
            for k, w in enumerate(widths)}
    data.update({"layer_structure": [1, 2, 1], "activation_func": activation, "is_layer_norm": layer_norm,
                 "weight_initialization": "Normal", "use_dropout": False, "activate_output": False,
                 "name": path.stem, "step": 1234, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"})
    data.update(extra)
    torch.save(data, path)
    return data


def by_hand(state, x, activation=torch.relu, layer_norm=False):
    """The MLP of `layers()` evaluated from its tensors: Linear, activation (not after the last), LayerNorm."""
    weights = sorted(((int(k.split(".")[1]), v) for k, v in state.items() if k.endswith("weight")))
    bias = {int(k.split(".")[1]): v for k, v in state.items() if k.endswith("bias")}
    linears = [i for i, w in weights if w.ndim == 2]
    for i, w in weights:
        if w.ndim == 2:
            x = x @ w.T + bias[i]
            if i != linears[-1]:
                x = activation(x)
        else:
            mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5) * w + bias[i]
    return x


def test_a_file_in_the_real_layout_loads_and_its_mlps_compute_by_hand(tmp_path):
    path = tmp_path / "style.pt"
    data = write_hypernetwork(path, widths=(16, 24), layer_norm=True)
    hn = load_hypernetwork(path)
    assert hn.name == "style" and hn.widths == [16, 24]
    assert hn.metadata["step"] == 1234 and hn.metadata["activation_func"] == "relu"
    x = torch.randn(3, 5, 24)
    for which in (0, 1):
        expected = by_hand(data[24][which], x, layer_norm=True)
        torch.testing.assert_close(hn.mlps[24][which](x), expected, rtol=1e-5, atol=1e-5)


def test_novelai_layer_names_and_string_widths_load(tmp_path):
    gen = torch.Generator().manual_seed(3)

    def pair():
        return {"linear1.weight": torch.randn(32, 16, generator=gen), "linear1.bias": torch.randn(32, generator=gen),
                "linear2.weight": torch.randn(16, 32, generator=gen), "linear2.bias": torch.randn(16, generator=gen)}

    k, v = pair(), pair()
    torch.save({"16": [k, v]}, tmp_path / "nai.pt")
    hn = load_hypernetwork(tmp_path / "nai.pt")
    x = torch.randn(2, 16)
    # no activation_func: linear, two Linears in a row
    torch.testing.assert_close(hn.mlps[16][0](x), (x @ k["linear1.weight"].T + k["linear1.bias"])
                               @ k["linear2.weight"].T + k["linear2.bias"], rtol=1e-5, atol=1e-5)


def attention_by_hand(attn, x, k_in, v_in):
    heads = attn.heads
    q, k, v = x @ attn.to_q.weight.T, k_in @ attn.to_k.weight.T, v_in @ attn.to_v.weight.T
    b, n, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(b, t.shape[1], heads, d).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, inner)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


@pytest.mark.parametrize("width", [24, 16])  # 24: the text context (cross-attention); 16: the block (self)
def test_a_transformer_block_with_the_patch_matches_attention_by_hand(tmp_path, width):
    torch.manual_seed(0)
    block = randomize_(BasicTransformerBlock(16, heads=2, dim_head=8, context_dim=24), 5).eval()
    data = write_hypernetwork(tmp_path / "h.pt", widths=(width,), activation="tanh")
    hn = load_hypernetwork(tmp_path / "h.pt")
    strength = 0.7
    x, context = torch.randn(2, 6, 16), torch.randn(2, 4, 24)
    with torch.no_grad():
        out = block(x, context, kv=hypernetwork_patches(hn, strength).kv_inputs(SITE))

        def shifted(source, which):
            return source + by_hand(data[width][which], source, activation=torch.tanh) * strength

        n = block.norm1(x)
        self_k, self_v = (shifted(n, 0), shifted(n, 1)) if width == 16 else (n, n)
        h = x + attention_by_hand(block.attn1, n, self_k, self_v)
        n = block.norm2(h)
        cross_k, cross_v = (shifted(context, 0), shifted(context, 1)) if width == 24 else (context, context)
        h = h + attention_by_hand(block.attn2, n, cross_k, cross_v)
        expected = h + block.ff(block.norm3(h))
        plain = block(x, context)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_two_hypernetworks_chain(tmp_path):
    write_hypernetwork(tmp_path / "a.pt", widths=(16,), seed=0)
    write_hypernetwork(tmp_path / "b.pt", widths=(16,), seed=10)
    a, b = load_hypernetwork(tmp_path / "a.pt"), load_hypernetwork(tmp_path / "b.pt")
    both = hypernetwork_patches(a, 0.5).merged(hypernetwork_patches(b, 2.0))
    source = torch.randn(1, 7, 16)
    with torch.no_grad():
        k, v = both.run_kv(source, source, SITE)
        k1, v1 = source + a.mlps[16][0](source) * 0.5, source + a.mlps[16][1](source) * 0.5
        torch.testing.assert_close(k, k1 + b.mlps[16][0](k1) * 2.0)
        torch.testing.assert_close(v, v1 + b.mlps[16][1](v1) * 2.0)


def test_strength_zero_and_other_widths_leave_the_unet_bit_for_bit(tmp_path):
    unet: UNetModel = tiny_unet(TINY_SD1)
    widths = attention_input_widths(unet)
    assert widths == {32, 64}  # the tiny SD1 UNet's blocks (32, 64) and its 32-wide context
    write_hypernetwork(tmp_path / "h.pt", widths=(32, 64))
    hn = load_hypernetwork(tmp_path / "h.pt")
    x, t, context = unet_inputs(TINY_SD1)
    with torch.no_grad():
        plain = unet(x, t, context)
        assert not hypernetwork_patches(hn, 0.0)
        torch.testing.assert_close(unet(x, t, context, patches=hypernetwork_patches(hn, 0.0)), plain, rtol=0, atol=0)
        patched = unet(x, t, context, patches=hypernetwork_patches(hn, 1.0))
        assert not torch.allclose(patched, plain, atol=1e-4)
        torch.testing.assert_close(unet(x, t, context), plain, rtol=0, atol=0)  # nothing left on the module
    write_hypernetwork(tmp_path / "other.pt", widths=(48,))
    other = hypernetwork_patches(load_hypernetwork(tmp_path / "other.pt"), 1.0)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context, patches=other), plain, rtol=0, atol=0)


def test_a_hypernetwork_for_another_family_is_refused_clearly(tmp_path):
    write_hypernetwork(tmp_path / "sd2.pt", widths=(320, 640, 1024, 1280))
    hn = load_hypernetwork(tmp_path / "sd2.pt")
    with pytest.raises(ValueError, match=r"SD1\.x has no attention input of width 1024") as caught:
        check_hypernetwork_fits(hn, {320, 640, 768, 1280}, "SD1.x")
    assert "'sd2'" in str(caught.value) and "another model family" in str(caught.value)
    check_hypernetwork_fits(hn, {320, 640, 1024, 1280}, "SD2.x")


class Payload:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_pickle_with_code_is_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({16: [Payload(), {}], "activation_func": "relu"}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: this pickle needs code"):
        load_hypernetwork(path)
    assert "ran code" not in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(activation_func="prelu"), "activation_func 'prelu' is not supported"),
    (lambda d: d[16][0].update({"linear.0.weight": torch.zeros(32, 15)}), "width 16, keys: linear.0 maps 15 -> 32"),
    (lambda d: d[16][1].pop("linear.2.bias"), "width 16, values: layer linear.2 lacks its bias"),
    (lambda d: d[16][0].update({"other.weight": torch.zeros(2)}), "unexpected key 'other.weight'"),
    (lambda d: d.update(layer_structure=[1, 4, 1]), r"layer_structure \[1, 4, 1\] means output widths \[64, 16\]"),
    (lambda d: d.pop(16), "no integer \\(attention width\\) keys"),
])
def test_malformed_files_name_the_file_and_the_fault(tmp_path, change, message):
    path = tmp_path / "bad.pt"
    data = write_hypernetwork(path, widths=(16,))
    change(data)
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_hypernetwork(path)
    assert "bad.pt" in str(caught.value)


def test_mlps_run_in_float32_for_a_half_precision_unet(tmp_path):
    write_hypernetwork(tmp_path / "h.pt", widths=(16,))
    hn = load_hypernetwork(tmp_path / "h.pt")
    source = torch.randn(1, 3, 16)
    k, _ = hypernetwork_patches(hn, 1.0).run_kv(source.bfloat16(), source.bfloat16(), SITE)
    assert k.dtype == torch.bfloat16
    with torch.no_grad():
        expected = source.bfloat16().float() + hn.mlps[16][0](source.bfloat16().float())
    torch.testing.assert_close(k.float(), expected, rtol=1e-2, atol=1e-2)
    assert F.mse_loss(k.float(), source) > 1e-4


def test_the_patch_reaches_self_attention_under_an_attention_wrapper(tmp_path):
    """With another patch wrapping the self-attention, its inner call still gets the hypernetwork's inputs."""
    from diffusion.patches.unet_patches import UNetPatches

    unet: UNetModel = tiny_unet(TINY_SD1)
    write_hypernetwork(tmp_path / "h.pt", widths=(64,))  # 64: self-attention of the second level only
    hn = hypernetwork_patches(load_hypernetwork(tmp_path / "h.pt"), 1.0)
    calls = []

    def passthrough(x, kv, inner, site):
        calls.append(site.block)
        return inner(x, kv)

    wrapped = UNetPatches(self_attention=(passthrough,)).merged(hn)
    x, t, context = unet_inputs(TINY_SD1)
    with torch.no_grad():
        alone, plain = unet(x, t, context, patches=hn), unet(x, t, context)
        torch.testing.assert_close(unet(x, t, context, patches=wrapped), alone, rtol=1e-6, atol=1e-6)
    assert calls and not torch.allclose(alone, plain, atol=1e-4)
