"""IP-Adapter weight types (diffusion/patches/ip_adapter_weights.py): the per-layer tables, hand-computed for the
real SD1 and SDXL layouts (16 and 11 SpatialTransformers); linear is the plain hook bit for bit; a style-transfer
UNet call changes only the style block's cross-attention; a precise type's flipped layer acts on the negative rows
only."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoints.random_checkpoints import checkpoint_spec
from diffusion.models.ip_adapter import random_ip_adapter
from diffusion.models.unet import UNetModel
from diffusion.patches.ip_adapter_patch import (
    IPAdapterHandle,
    IPAttentionHook,
    check_fits,
    image_tokens,
)
from diffusion.patches.ip_adapter_weights import (
    WEIGHT_TYPES,
    LayerWeight,
    block_weights,
    layer_weights,
    transformer_layers,
)
from diffusion.patches.unet_patches import UNetPatches, batch_roles
from tests.diffusion.random_weights import randomize_

SD1_KINDS = ["input"] * 6 + ["middle"] + ["output"] * 9
SDXL_KINDS = ["input"] * 4 + ["middle"] + ["output"] * 6
W = 2.0  # not 1, so that a multiplier of w and one of 1 differ


def _unet(family: str, device: str = "meta") -> UNetModel:
    with torch.device(device):
        return UNetModel(checkpoint_spec(family).unet)


def _table(weight_type: str, kinds: list[str], sdxl: bool) -> dict[int, tuple[float, bool]]:
    return {t: (r.scale, r.flipped) for t, r in layer_weights(weight_type, W, kinds, sdxl).items()}


def test_layers_are_numbered_as_comfyui_counts_its_transformers() -> None:
    sd1 = transformer_layers(_unet("sd1"))
    assert [b for b, _ in sd1] == [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [
        ("output", i) for i in range(3, 12)]
    assert [k for _, k in sd1] == SD1_KINDS
    sdxl = transformer_layers(_unet("sdxl"))
    assert [b for b, _ in sdxl] == [("input", i) for i in (4, 5, 7, 8)] + [("middle", 0)] + [
        ("output", i) for i in range(6)]
    # the style layer (6) is output block 1, the composition layer (3) input block 8, as InstantStyle names them
    rules = block_weights(_unet("sdxl"), "style and composition", W, sdxl=True)
    assert rules == {("output", 1): LayerWeight(W), ("input", 8): LayerWeight(1.0)}


def test_curves_and_weak_parts_hand_computed() -> None:
    sd1 = _table("ease in", SD1_KINDS, False)
    for t, value in ((0, 1.0), (4, 0.7625), (8, 0.525), (15, 0.109375)):
        assert sd1[t][0] == pytest.approx(W * value)
    out = _table("ease out", SD1_KINDS, False)
    assert [out[t][0] for t in (0, 4, 8)] == pytest.approx([W * 0.05, W * 0.2875, W * 0.525])
    inout = _table("ease in-out", SD1_KINDS, False)
    assert [inout[t][0] for t in (0, 4, 8, 12)] == pytest.approx([W * 0.05, W * 0.525, W * 1.0, W * 0.525])
    reverse = _table("reverse in-out", SD1_KINDS, False)
    assert [reverse[t][0] for t in (0, 4, 8, 12)] == pytest.approx([W * 1.0, W * 0.525, W * 0.05, W * 0.525])
    xl = _table("ease out", SDXL_KINDS, True)
    assert len(xl) == 11 and xl[10][0] == pytest.approx(W * (0.05 + 0.95 * 10 / 11))
    assert _table("ease in-out", SDXL_KINDS, True)[5][0] == pytest.approx(W * (0.05 + 0.95 * (1 - 0.5 / 5.5)))
    weak = {name: [s for s, _ in _table(name, SDXL_KINDS, True).values()]
            for name in ("weak input", "weak output", "weak middle", "strong middle")}
    low = W * 0.2
    assert weak["weak input"] == pytest.approx([low] * 4 + [W] * 7)
    assert weak["weak output"] == pytest.approx([W] * 5 + [low] * 6)
    assert weak["weak middle"] == pytest.approx([W] * 4 + [low] + [W] * 6)
    assert weak["strong middle"] == pytest.approx([low] * 4 + [W] + [low] * 6)
    assert _table("linear", SD1_KINDS, False) == {t: (W, False) for t in range(16)}


def _same(layers, scale, flipped=False):
    return {t: (scale, flipped) for t in layers}


SD1_STYLE = [0, 1, 2, 3, *range(9, 16)]
EXPECTED = {  # (sd1 table, sdxl table), w = W, composition weight 1.0
    "style transfer": (_same(SD1_STYLE, W), {6: (W, False)}),
    "composition": ({4: (0.5, False), 5: (W, False)}, {3: (W, False)}),
    "strong style transfer": (_same([0, 1, 2, 3, *range(6, 16)], W), _same([0, 1, 2, *range(4, 11)], W)),
    "style and composition": ({**_same(SD1_STYLE, W), 4: (0.25, False), 5: (1.0, False)},
                              {3: (1.0, False), 6: (W, False)}),
    "style transfer precise": ({**_same(SD1_STYLE, W), 4: (0.5, True), 5: (W, True)}, {3: (W, True), 6: (W, False)}),
    "composition precise": ({**_same(SD1_STYLE, W, True), 4: (0.5, False), 5: (W, False),
                             **_same([6, 7, 8], 0.2, True)},
                            {**_same([0, 1, 2, 4, 5, 7, 8, 9, 10], 0.2, True), 3: (W, False), 6: (W, True)}),
}


@pytest.mark.parametrize("weight_type", list(EXPECTED))
def test_block_selecting_types_hand_computed(weight_type: str) -> None:
    sd1, sdxl = EXPECTED[weight_type]
    got = _table(weight_type, SD1_KINDS, False)
    assert got.keys() == sd1.keys() and all(got[t] == pytest.approx(sd1[t]) for t in sd1)
    got = _table(weight_type, SDXL_KINDS, True)
    assert got.keys() == sdxl.keys() and all(got[t] == pytest.approx(sdxl[t]) for t in sdxl)


def test_every_type_has_a_rule_and_unknown_ones_are_refused() -> None:
    for name in WEIGHT_TYPES:
        assert layer_weights(name, 1.0, SDXL_KINDS, True)
    with pytest.raises(ValueError, match="'sideways'"):
        layer_weights("sideways", 1.0, SDXL_KINDS, True)


def _recorder(log: dict) -> object:
    def record(out, x, site):
        log.setdefault(site.block, []).append(out.clone())
        return out
    return record


@torch.no_grad()
def _run(weight_type: str | None, roles=(False,)):
    """Tiny real-layout SDXL UNet with the adapter hook between two recorders: each block's cross-attention
    outputs before and after the hook; and the UNet's output."""
    unet = randomize_(_unet("sdxl", "cpu"), 0).eval()
    spec = checkpoint_spec("sdxl").unet
    adapter = random_ip_adapter(unet, "plain", clip_dim=16, seed=3)
    handle = IPAdapterHandle(adapter, "random.safetensors")
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 16, generator=gen)
    blocks = None if weight_type is None else block_weights(unet, weight_type, 0.7, sdxl=True)
    hook = IPAttentionHook(handle, check_fits(handle, unet, "SDXL"), image_tokens(adapter, embeds),
                           image_tokens(adapter, torch.zeros_like(embeds)), 0.7, float("inf"), 0.0, lambda t: t,
                           None, blocks)
    before, after = {}, {}
    rows = len(roles)
    x = torch.randn(1, 4, 8, 8, generator=gen).repeat(rows, 1, 1, 1)
    context = torch.randn(1, 5, spec.context_dim, generator=gen).repeat(rows, 1, 1)
    y = torch.randn(1, spec.adm_in_channels, generator=gen).repeat(rows, 1)
    patches = UNetPatches(cross_attention_out=(_recorder(before), hook, _recorder(after)))
    with batch_roles(tuple(roles)):
        out = unet(x, torch.tensor([400.0] * rows), context, y, patches=patches)
    return before, after, out


def test_style_transfer_changes_only_the_style_blocks_attention() -> None:
    before, after, _ = _run("style transfer")
    changed = {b for b in before if any(not torch.equal(p, q) for p, q in zip(before[b], after[b], strict=True))}
    assert changed == {("output", 1)}
    # and every one of that block's transformer blocks (2 in the tiny model) gets it
    assert all(not torch.allclose(p, q) for p, q in zip(before[("output", 1)], after[("output", 1)], strict=True))


def test_linear_rules_equal_the_plain_hook_bit_for_bit() -> None:
    assert torch.equal(_run(None)[2], _run("linear")[2])
    assert not torch.equal(_run("linear")[2], _run("style transfer")[2])


def test_precise_flipped_layer_acts_on_the_negative_rows_only() -> None:
    before, after, _ = _run("style transfer precise", roles=(False, True))
    for p, q in zip(before[("input", 8)], after[("input", 8)], strict=True):  # flipped: composition layer
        assert torch.equal(p[0], q[0]) and not torch.allclose(p[1], q[1])
    for p, q in zip(before[("output", 1)], after[("output", 1)], strict=True):  # style layer: both rows
        assert not torch.allclose(p[0], q[0]) and not torch.allclose(p[1], q[1])
    assert all(torch.equal(p, q) for b in before if b not in (("input", 8), ("output", 1))
               for p, q in zip(before[b], after[b], strict=True))
    # without a negative row (cfg 1) a flipped layer adds nothing
    before, after, _ = _run("style transfer precise", roles=(False,))
    assert all(torch.equal(p, q) for p, q in zip(before[("input", 8)], after[("input", 8)], strict=True))


def test_a_zero_weight_keeps_the_fixed_composition_weight() -> None:
    """As in the pack, "style and composition" at weight 0 still gives its composition layer 1.0."""
    rules = block_weights(_unet("sdxl"), "style and composition", 0.0, sdxl=True)
    assert rules == {("output", 1): LayerWeight(0.0), ("input", 8): LayerWeight(1.0)}
    unet = _unet("sdxl")
    adapter = random_ip_adapter(unet, "plain", clip_dim=16, seed=3)
    handle = IPAdapterHandle(adapter, "random.safetensors")
    tokens = torch.zeros(1, 4, checkpoint_spec("sdxl").unet.context_dim)
    args = (handle, {}, tokens, tokens, 0.0, 1.0, 0.0, lambda t: t, None)
    assert IPAttentionHook(*args, rules).silent is False
    assert IPAttentionHook(*args).silent is True  # linear at 0: nothing anywhere
