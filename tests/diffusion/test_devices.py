"""Device and dtype choice with injected capabilities; memory readings."""

import pytest
import torch

from diffusion.devices import (
    cpu_has_fast_bf16,
    free_memory,
    meminfo,
    pick_device,
    pick_dtype,
    read_cpu_flags,
    total_memory,
)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_best_device_order(cuda, mps, expected):
    assert pick_device(None, cuda=cuda, mps=mps) == torch.device(expected)


def test_preference_overrides_best():
    assert pick_device("cpu", cuda=True, mps=True) == torch.device("cpu")
    assert pick_device("cuda:1", cuda=True, mps=False) == torch.device("cuda", 1)
    assert pick_device("mps", cuda=True, mps=True) == torch.device("mps")


@pytest.mark.parametrize(("preference", "message"), [("cuda", "CUDA"), ("cuda:0", "CUDA"), ("mps", "MPS")])
def test_missing_device_is_an_error(preference, message):
    with pytest.raises(ValueError, match=message):
        pick_device(preference, cuda=False, mps=False)


@pytest.mark.parametrize("preference", ["tpu", "gpu0", "meta"])
def test_unknown_device_is_an_error(preference):
    with pytest.raises(ValueError, match=repr(preference)):
        pick_device(preference, cuda=True, mps=True)


def test_real_machine_default_is_the_best_device_present_and_computes():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = pick_device()
    assert device == torch.device(expected)
    x = torch.arange(6.0).reshape(2, 3)
    product = x.to(device) @ x.T.to(device)
    assert product.device.type == expected
    torch.testing.assert_close(product.cpu(), torch.tensor([[5.0, 14.0], [14.0, 50.0]]))


@pytest.mark.parametrize(
    ("device", "caps", "model", "vae"),
    [
        ("cuda", {"cuda_bf16": True}, torch.bfloat16, torch.bfloat16),
        ("cuda:1", {"cuda_bf16": False}, torch.float16, torch.float32),
        ("mps", {}, torch.float16, torch.float32),
        ("cpu", {"cpu_flags": {"fpu", "amx_bf16", "avx2"}}, torch.bfloat16, torch.bfloat16),
        ("cpu", {"cpu_flags": {"avx512f", "avx512_bf16"}}, torch.bfloat16, torch.bfloat16),
        ("cpu", {"cpu_flags": {"avx512f", "avx2", "f16c"}}, torch.float32, torch.float32),
        ("cpu", {"cpu_flags": set()}, torch.float32, torch.float32),
    ],
)
def test_dtype_rules(device, caps, model, vae):
    assert pick_dtype(device, **caps) == model
    assert pick_dtype(torch.device(device), for_vae=True, **caps) == vae


def test_vae_never_fp16():
    for device, caps in [("cuda", {"cuda_bf16": False}), ("mps", {}), ("cpu", {"cpu_flags": {"amx_bf16"}})]:
        assert pick_dtype(device, for_vae=True, **caps) != torch.float16


def test_dtype_for_unknown_device_type():
    with pytest.raises(ValueError, match="meta"):
        pick_dtype("meta")


def test_cpu_flags_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    flags = read_cpu_flags(str(cpuinfo))
    assert flags == {"fpu", "sse", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu_has_fast_bf16(flags)
    assert not cpu_has_fast_bf16({"fpu", "avx512f", "amx_tile"})
    assert read_cpu_flags(str(tmp_path / "absent")) == set()


def test_meminfo_parsing(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(
        "MemTotal:       16000 kB\nMemFree:         1000 kB\nMemAvailable:    8000 kB\nHugePages_Total: 0\n"
    )
    info = meminfo(str(path))
    assert info["MemTotal"] == 16000 * 1024
    assert info["MemAvailable"] == 8000 * 1024
    assert info["HugePages_Total"] == 0
    assert meminfo(str(tmp_path / "absent")) == {}


def test_cpu_memory_readings():
    free, total = free_memory("cpu"), total_memory(torch.device("cpu"))
    assert 0 < free <= total
    with pytest.raises(ValueError, match="meta"):
        free_memory("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_readings():
    device = torch.device("cuda")
    before = free_memory(device)
    assert 0 < before <= total_memory(device)
    assert pick_dtype(device) in (torch.bfloat16, torch.float16)
