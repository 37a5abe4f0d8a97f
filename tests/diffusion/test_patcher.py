"""ModelPatcher: LoRA and diff patches against hand-computed weights, bit-exact unpatch, clone semantics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.patches.patcher import LoraDelta, ModelPatcher, WeightDiff


def tiny_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(4, 6, 3, padding=1))
    net.add_module("proj", nn.Conv2d(6, 6, 1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6 * 5 * 5, 7))
    return net.to(dtype).eval().requires_grad_(False)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(module, weights):
    for k, v in module.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_linear_lora_is_w_plus_scaled_up_down():
    net = tiny_net()
    original = snapshot(net)
    up, down = randn(7, 3, seed=1), randn(3, 150, seed=2)
    patcher = ModelPatcher(net, "cpu")
    assert patcher.add_patches({"fc.weight": LoraDelta(up, down, alpha=1.5)}, strength=0.7) == {"fc.weight"}
    patcher.patch()
    expected = original["fc.weight"] + 0.7 * (1.5 / 3) * (up @ down)
    torch.testing.assert_close(net.fc.weight, expected, rtol=0, atol=1e-6)
    for key in original:
        if key != "fc.weight":
            assert torch.equal(net.state_dict()[key], original[key]), key
    patcher.unpatch()
    assert_same(net, original)


def test_missing_alpha_means_rank():
    net = tiny_net()
    w = net.fc.weight.clone()
    up, down = randn(7, 4, seed=3), randn(4, 150, seed=4)
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"fc.weight": LoraDelta(up, down)})
    patcher.patch()
    torch.testing.assert_close(net.fc.weight, w + up @ down, rtol=0, atol=1e-6)


def test_locon_kxk_acts_like_down_conv_then_up_conv():
    """A 3×3 down and 1×1 up are two convolutions in a row; patched into one 3×3 weight they must give the
    same output as running them one after the other."""
    net = tiny_net()
    w, b = net.conv.weight.clone(), net.conv.bias.clone()
    down, up = randn(2, 4, 3, 3, seed=5), randn(6, 2, 1, 1, seed=6)
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"conv.weight": LoraDelta(up, down, alpha=4.0)}, strength=0.5)
    patcher.patch()
    x = randn(1, 4, 5, 5, seed=7)
    expected = F.conv2d(x, w, b, padding=1) + 0.5 * (4.0 / 2) * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(net.conv(x), expected, rtol=1e-5, atol=1e-5)


def test_locon_tucker_core_acts_like_three_convs():
    net = tiny_net()
    w, b = net.conv.weight.clone(), net.conv.bias.clone()
    down, mid, up = randn(3, 4, 1, 1, seed=8), randn(3, 3, 3, 3, seed=9), randn(6, 3, 1, 1, seed=10)
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"conv.weight": LoraDelta(up, down, alpha=1.0, mid=mid)}, strength=1.2)
    patcher.patch()
    x = randn(2, 4, 5, 5, seed=11)
    lora_path = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    expected = F.conv2d(x, w, b, padding=1) + 1.2 * (1.0 / 3) * lora_path
    torch.testing.assert_close(net.conv(x), expected, rtol=1e-5, atol=1e-5)


def test_linear_lora_on_1x1_conv_is_reshaped():
    net = tiny_net()
    w = net.proj.weight.clone()
    up, down = randn(6, 2, seed=12), randn(2, 6, seed=13)
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"proj.weight": LoraDelta(up, down, alpha=2.0)})
    patcher.patch()
    torch.testing.assert_close(net.proj.weight, w + (up @ down)[:, :, None, None], rtol=0, atol=1e-6)


def test_patches_accumulate_and_diffs_apply():
    net = tiny_net()
    original = snapshot(net)
    d1 = LoraDelta(randn(7, 2, seed=14), randn(2, 150, seed=15), alpha=1.0)
    d2 = LoraDelta(randn(7, 5, seed=16), randn(5, 150, seed=17), alpha=10.0)
    bias_diff = WeightDiff(randn(7, seed=18))
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"fc.weight": d1}, 0.3)
    patcher.add_patches({"fc.weight": d2, "fc.bias": bias_diff}, -1.1)
    patcher.patch()
    expected = original["fc.weight"] + 0.3 * 0.5 * (d1.up @ d1.down) - 1.1 * 2.0 * (d2.up @ d2.down)
    torch.testing.assert_close(net.fc.weight, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(net.fc.bias, original["fc.bias"] - 1.1 * bias_diff.diff, rtol=0, atol=1e-6)
    patcher.unpatch()
    assert_same(net, original)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_patched_in_fp32_and_restored_bit_exactly(dtype):
    net = tiny_net(dtype=dtype)
    original = snapshot(net)
    up, down = randn(7, 3, seed=19), randn(3, 150, seed=20)
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"fc.weight": LoraDelta(up.to(dtype), down.to(dtype), alpha=3.0)}, 0.9)
    patcher.patch()
    assert net.fc.weight.dtype == dtype
    expected = (original["fc.weight"].float() + 0.9 * (up.to(dtype).float() @ down.to(dtype).float())).to(dtype)
    assert torch.equal(net.fc.weight, expected)
    patcher.unpatch()
    assert_same(net, original)


def test_unknown_names_are_left_out_and_wrong_shapes_rejected():
    net = tiny_net()
    patcher = ModelPatcher(net, "cpu")
    lora = LoraDelta(randn(7, 2, seed=21), randn(2, 150, seed=22))
    assert patcher.add_patches({"fc.weight": lora, "nothing.weight": lora}) == {"fc.weight"}
    assert set(patcher.patches) == {"fc.weight"}
    with pytest.raises(ValueError, match=r"proj\.weight.*another model"):
        patcher.add_patches({"proj.weight": lora})


def test_clones_share_the_module_and_carry_one_patch_set_at_a_time():
    net = tiny_net()
    original = snapshot(net)
    base = ModelPatcher(net, "cpu")
    a, b = base.clone(), base.clone()
    da = LoraDelta(randn(7, 2, seed=23), randn(2, 150, seed=24), alpha=2.0)
    db = LoraDelta(randn(6, 2, seed=25), randn(2, 36, seed=26).reshape(2, 4, 3, 3), alpha=1.0)
    a.add_patches({"fc.weight": da}, 0.7)
    b.add_patches({"conv.weight": db}, 1.3)
    assert a.model is b.model is net
    assert base.patches == {}, "a clone's patches must not leak into its source"
    a_fc = original["fc.weight"] + 0.7 * (da.up @ da.down)
    b_conv = original["conv.weight"] + 1.3 * 0.5 * (db.up @ db.down.flatten(1)).reshape(6, 4, 3, 3)
    for _ in range(2):  # alternate: each switch must first remove the other's patches
        a.patch()
        assert a.is_applied() and not b.is_applied()
        torch.testing.assert_close(net.fc.weight, a_fc, rtol=0, atol=1e-6)
        assert torch.equal(net.conv.weight, original["conv.weight"])
        b.patch()
        assert b.is_applied() and not a.is_applied()
        torch.testing.assert_close(net.conv.weight, b_conv, rtol=0, atol=1e-6)
        assert torch.equal(net.fc.weight, original["fc.weight"])
        base.patch()  # no patches: the original weights
        assert_same(net, original)


def test_clone_of_a_patched_patcher_keeps_and_extends_its_patches():
    net = tiny_net()
    original = snapshot(net)
    a = ModelPatcher(net, "cpu")
    da = LoraDelta(randn(7, 2, seed=27), randn(2, 150, seed=28))
    a.add_patches({"fc.weight": da}, 1.0)
    same = a.clone()
    a.patch()
    assert same.is_applied(), "an unchanged clone wants the same weights, so nothing is redone"
    more = a.clone()
    more.add_patches({"fc.weight": da}, 1.0)
    assert not more.is_applied()
    more.patch()
    torch.testing.assert_close(net.fc.weight, original["fc.weight"] + 2 * (da.up @ da.down), rtol=0, atol=1e-5)
    a.patch()
    torch.testing.assert_close(net.fc.weight, original["fc.weight"] + da.up @ da.down, rtol=0, atol=1e-5)
    more.unpatch()
    assert_same(net, original)


def test_patch_changes_the_output_and_model_nbytes_counts_everything():
    net = tiny_net()
    x = randn(1, 4, 5, 5, seed=29)
    before = net(x)
    patcher = ModelPatcher(net, "cpu")
    patcher.add_patches({"proj.weight": LoraDelta(randn(6, 1, seed=30), randn(1, 6, seed=31))})
    patcher.patch()
    assert not torch.allclose(net(x), before)
    patcher.unpatch()
    assert torch.equal(net(x), before)
    assert patcher.model_nbytes() == sum(p.numel() * 4 for p in net.parameters())
