"""GroupNorm32 on the CPU hands 16-bit inputs to torch's own kernel (float32 statistics inside) instead of
normalising a float32 copy: the same values within one rounding of the output (float32 cancellation aside), for
bf16 and fp16, weights in the input's dtype or in float32, with a large mean where statistics in 16 bits would
fail; float32 inputs and other devices keep the copy path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion.models import unet_blocks
from diffusion.models.unet_blocks import GroupNorm32, native_group_norm


def norm_and_input(shape: tuple[int, ...], groups: int, dtype: torch.dtype, weight_dtype: torch.dtype):
    gen = torch.Generator().manual_seed(shape[1])
    norm = GroupNorm32(groups, shape[1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=gen))
        norm.bias.copy_(torch.randn(shape[1], generator=gen))
    x = (torch.randn(shape, generator=gen) * 3 + 200).to(dtype)  # large mean, small spread
    return norm.to(weight_dtype), x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize(("shape", "groups"), [((2, 64, 16, 16), 8), ((1, 32, 9, 7), 8), ((3, 48, 5, 5), 3)])
def test_native_16_bit_norm_is_within_one_rounding_of_the_float32_copy(dtype, weight_dtype, shape, groups):
    norm, x = norm_and_input(shape, groups, dtype, dtype if weight_dtype == "same" else weight_dtype)
    expected = F.group_norm(x.float(), groups, norm.weight.float(), norm.bias.float(), 1e-6)
    got = norm(x)
    assert got.dtype == dtype and native_group_norm(x)
    # one unit in the last place (torch's kernel shifts and scales in one fused multiply-add: outputs near zero carry
    # float32 cancellation error, ~1e-5 absolute, far below the 16-bit rounding of outputs near 1)
    torch.testing.assert_close(got.float(), expected, rtol=torch.finfo(dtype).eps, atol=1e-4)
    assert float(expected.std()) > 0.5  # a normalised output, not a constant any rounding would match


def test_the_cpu_16_bit_path_makes_no_float32_copy(monkeypatch):
    seen = []
    real = F.group_norm

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(unet_blocks.F, "group_norm", spy)
    norm, x = norm_and_input((1, 32, 8, 8), 8, torch.bfloat16, torch.bfloat16)
    norm(x)
    norm.float()(x.float())
    assert seen == [torch.bfloat16, torch.float32]


def test_other_devices_and_float32_keep_the_copy_path():
    assert not native_group_norm(torch.zeros(1, 4, 2, 2))
    assert not native_group_norm(torch.zeros(1, 4, 2, 2, dtype=torch.bfloat16, device="meta"))
    assert native_group_norm(torch.zeros(1, 4, 2, 2, dtype=torch.float16))
