"""Merge patches against hand-computed weights (LoRA-patched models, a model merged with itself, per-block ratios),
the inputs left unchanged; LoRA extraction by SVD; the diffusers → original UNet renaming."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoints.part_files import diffusers_unet_to_original
from diffusion.checkpoints.unet_keys import diffusers_to_original_unet_keys
from diffusion.patches.lora_extract import extract_layers, low_rank_factors
from diffusion.patches.merge import (
    MergeError,
    addition,
    block_interpolation,
    block_ratio,
    difference,
    interpolation,
    merge_patches,
)
from diffusion.patches.patcher import LoraDelta, ModelPatcher
from tests.diffusion.tiny_models import TINY_SD1, TINY_SDXL, tiny_unet


def params(patcher: ModelPatcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.named_parameters()}


def lora_on(patcher: ModelPatcher, key: str, seed: int, strength: float = 1.0) -> torch.Tensor:
    """Add a rank-2 LoRA on a linear or conv weight; returns its ΔW at that strength."""
    weight = dict(patcher.model.named_parameters())[key]
    gen = torch.Generator().manual_seed(seed)
    flat_in = weight[0].numel()
    up, down = torch.randn(weight.shape[0], 2, generator=gen), torch.randn(2, flat_in, generator=gen)
    patcher.add_patches({key: LoraDelta(up, down, alpha=1.0)}, strength)
    return strength * 0.5 * (up @ down).reshape(weight.shape)


LINEAR = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "input_blocks.1.0.in_layers.2.weight"


def test_interpolation_is_ratio_of_first_plus_rest_of_second_and_leaves_inputs_unchanged():
    a, b = ModelPatcher(tiny_unet(TINY_SD1, 1), "cpu"), ModelPatcher(tiny_unet(TINY_SD1, 2), "cpu")
    wa, wb = params(a), params(b)
    merged = a.clone()
    assert merge_patches(merged, b, interpolation(0.3)) == []
    assert not a.patches and not b.patches
    merged.patch()
    for key, value in merged.model.named_parameters():
        torch.testing.assert_close(value, 0.3 * wa[key] + 0.7 * wb[key], rtol=1e-6, atol=1e-6)
    merged.unpatch()
    for key, value in a.model.named_parameters():
        assert torch.equal(value, wa[key]), key


def test_lora_on_either_side_is_merged_with_its_model():
    a, b = ModelPatcher(tiny_unet(TINY_SD1, 1), "cpu"), ModelPatcher(tiny_unet(TINY_SD1, 2), "cpu")
    wa, wb = params(a), params(b)
    a_lora, b_lora = a.clone(), b.clone()
    delta_a = lora_on(a_lora, LINEAR, seed=3, strength=0.8)
    delta_b = lora_on(b_lora, CONV, seed=4)
    merged = a_lora.clone()
    merge_patches(merged, b_lora, interpolation(0.25))
    later = lora_on(merged, CONV, seed=5)  # a LoRA after the merge applies on top of it
    expected_linear = 0.25 * (wa[LINEAR] + delta_a) + 0.75 * wb[LINEAR]
    expected_conv = 0.25 * wa[CONV] + 0.75 * (wb[CONV] + delta_b) + later
    torch.testing.assert_close(merged.patched_weight(LINEAR), expected_linear, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.patched_weight(CONV), expected_conv, rtol=1e-5, atol=1e-5)
    merged.patch()  # the module's own weights, patched in place, agree with the lazy computation
    torch.testing.assert_close(dict(merged.model.named_parameters())[CONV], expected_conv, rtol=1e-5, atol=1e-5)
    merged.unpatch()
    assert torch.equal(dict(a.model.named_parameters())[CONV], wa[CONV])


def test_difference_of_a_model_with_its_own_lora_is_the_lora_even_on_one_shared_module():
    base = ModelPatcher(tiny_unet(TINY_SD1, 1), "cpu")
    original = params(base)
    tuned = base.clone()
    delta = lora_on(tuned, LINEAR, seed=7)
    diff = tuned.clone()
    merge_patches(diff, base, difference(1.0))  # both read the same module
    diff.patch()  # backups of the module's originals are taken while the difference is computed
    weights = dict(diff.model.named_parameters())
    torch.testing.assert_close(weights[LINEAR], delta, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(weights[CONV]) == 0
    # the sum puts the model back together: (tuned - base) + base
    rebuilt = diff.clone()
    merge_patches(rebuilt, base, addition())
    torch.testing.assert_close(rebuilt.patched_weight(LINEAR), original[LINEAR] + delta, rtol=1e-5, atol=1e-5)
    diff.unpatch()
    for key, value in base.model.named_parameters():
        assert torch.equal(value, original[key]), key


def test_block_ratio_takes_the_longest_prefix_and_the_first_ratio_as_default():
    ratios = {"input": 0.1, "middle": 0.2, "out": 0.3}
    assert block_ratio(ratios, "input_blocks.3.0.weight") == 0.1
    assert block_ratio(ratios, "output_blocks.0.0.weight") == 0.3 and block_ratio(ratios, "out.2.bias") == 0.3
    assert block_ratio(ratios, "time_embed.0.weight") == 0.1  # no prefix: the first ratio
    sd1 = {"input_blocks.1.": 0.5, "input_blocks.10.": 0.9}
    assert block_ratio(sd1, "input_blocks.10.0.weight") == 0.9 and block_ratio(sd1, "input_blocks.1.1.x") == 0.5
    with pytest.raises(MergeError):
        block_ratio({}, "out.0.weight")


@pytest.mark.parametrize(("config", "block"), [(TINY_SD1, "input_blocks.1."), (TINY_SDXL, "output_blocks.2")])
def test_per_block_ratio_changes_only_that_blocks_weights(config, block):
    a, b = ModelPatcher(tiny_unet(config, 1), "cpu"), ModelPatcher(tiny_unet(config, 2), "cpu")
    wa, wb = params(a), params(b)
    merged = a.clone()
    merge_patches(merged, b, block_interpolation({"time_embed.": 1.0, block: 0.0}))
    taken = [k for k in wa if k.startswith(block)]
    assert taken
    for key in wa:
        expected = wb[key] if key.startswith(block) else wa[key]
        torch.testing.assert_close(merged.patched_weight(key), expected, rtol=0, atol=1e-6)


def test_models_without_common_weights_are_refused_and_odd_shapes_left_out():
    sd1, sdxl = ModelPatcher(tiny_unet(TINY_SD1, 1), "cpu"), ModelPatcher(tiny_unet(TINY_SDXL, 2), "cpu")
    skipped = merge_patches(sd1.clone(), sdxl, interpolation(0.5))  # same widths here: some weights fit
    assert skipped and all(k in dict(sdxl.model.named_parameters()) for k in skipped)
    with pytest.raises(MergeError, match="no weight in common"):
        merge_patches(sd1.clone(), ModelPatcher(torch.nn.Linear(3, 3), "cpu"), interpolation(0.5))


def test_low_rank_factors_reproduce_a_low_rank_matrix_and_are_best_otherwise():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(12, 3, generator=gen) @ torch.randn(3, 20, generator=gen)
    up, down = low_rank_factors(exact, 3)
    torch.testing.assert_close(up @ down, exact, rtol=1e-4, atol=1e-4)
    full = torch.randn(12, 20, generator=gen)
    up, down = low_rank_factors(full, 4)
    s = torch.linalg.svdvals(full)
    # Eckart–Young: the error of the best rank-4 approximation is the norm of the other singular values
    assert float((full - up @ down).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-4)
    conv = torch.randn(6, 4, 3, 3, generator=gen)
    up, down = low_rank_factors(conv, 100)  # capped at the full rank, 6
    assert up.shape == (6, 6, 1, 1) and down.shape == (6, 4, 3, 3)
    torch.testing.assert_close((up.flatten(1) @ down.flatten(1)).reshape(conv.shape), conv, rtol=1e-4, atol=1e-4)


def test_extract_layers_writes_kohya_parts_for_what_changed():
    base = ModelPatcher(tiny_unet(TINY_SD1, 1), "cpu")
    tuned = base.clone()
    delta = lora_on(tuned, LINEAR, seed=9)
    bias = "input_blocks.1.0.in_layers.2.bias"
    tuned.add_patches({bias: LoraDelta(torch.ones(tuned.model.get_parameter(bias).shape[0], 1), torch.ones(1, 1))})
    diff = tuned.clone()
    merge_patches(diff, base, difference(1.0))
    names = {k.rsplit(".", 1)[0]: "lora_unet_" + k.rsplit(".", 1)[0].replace(".", "_") for k in params(base)}
    tensors = extract_layers(diff, names, rank=64, bias_diff=True, dtype=torch.float32)
    layer = names[LINEAR.rsplit(".", 1)[0]]
    conv_layer = names[bias.rsplit(".", 1)[0]]
    assert set(tensors) == {f"{layer}.lora_up.weight", f"{layer}.lora_down.weight", f"{layer}.alpha",
                            f"{conv_layer}.diff_b"}
    rebuilt = tensors[f"{layer}.lora_up.weight"] @ tensors[f"{layer}.lora_down.weight"]
    torch.testing.assert_close(rebuilt, delta, rtol=1e-4, atol=1e-4)
    rank = tensors[f"{layer}.lora_up.weight"].shape[1]
    assert rank == min(64, *delta.shape) and float(tensors[f"{layer}.alpha"]) == rank  # alpha / rank = 1
    without_bias = extract_layers(diff, names, rank=64, bias_diff=False)
    assert f"{conv_layer}.diff_b" not in without_bias
    full = extract_layers(diff, names, rank=1, lora_type="full_diff")
    torch.testing.assert_close(full[f"{layer}.diff"].float(), delta, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="lora_type"):
        extract_layers(diff, names, rank=4, lora_type="lokr")


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SDXL])
def test_diffusers_unet_names_are_renamed_back_to_the_original_layout(config):
    unet = tiny_unet(config, 3)
    ours = unet.state_dict()
    to_ours = diffusers_to_original_unet_keys(config)
    diffusers = {theirs: ours[mine] for theirs, mine in to_ours.items()}
    back = diffusers_unet_to_original(diffusers)
    assert set(back) == set(ours)
    assert all(back[k] is ours[k] for k in ours)
