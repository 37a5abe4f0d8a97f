"""Which device and dtype to compute on, and how much memory a device has.

Every decision takes its inputs as arguments (with the machine's own values as defaults), so callers and tests
can override any of them; nothing is read from environment variables or kept in module state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matmuls


def has_mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(
    preference: str | torch.device | None = None,
    *,
    cuda: bool | None = None,
    mps: bool | None = None,
    cuda_count: int | None = None,
) -> torch.device:
    """The compute device: `preference` ("cuda", "cuda:1", "mps", "cpu") when given, else CUDA, then MPS,
    then the CPU. Asking for a device that is not there (no CUDA, or `cuda:N` past the last GPU) is an error, not a
    silent fall back to the CPU."""
    if cuda_count is None and cuda is None:  # the machine's own GPUs (given `cuda`, the count is not checked)
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = has_mps() if mps is None else mps
    if preference is None:
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as e:
        raise ValueError(f"unknown device {preference!r}; use 'cuda', 'cuda:N', 'mps' or 'cpu'") from e
    if device.type == "cuda" and not cuda:
        raise ValueError(f"device {preference!r} asked for, but CUDA is not available")
    if device.type == "cuda" and cuda_count is not None and device.index is not None and device.index >= cuda_count:
        raise ValueError(f"device {preference!r} asked for, but this machine has {cuda_count} CUDA device(s) "
                         f"(cuda:0 to cuda:{cuda_count - 1})")
    if device.type == "mps" and not mps:
        raise ValueError(f"device {preference!r} asked for, but MPS is not available")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unsupported device {preference!r}; use 'cuda', 'cuda:N', 'mps' or 'cpu'")
    return device


def read_cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in `cpuinfo_path` (empty where there is no such file)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU: only with AMX-BF16 or AVX512-BF16 instructions; elsewhere
    bf16 is emulated and slower than fp32."""
    flags = read_cpu_flags() if flags is None else set(flags)
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def pick_dtype(
    device: torch.device | str,
    *,
    for_vae: bool = False,
    cuda_bf16: bool | None = None,
    cpu_flags: Iterable[str] | None = None,
) -> torch.dtype:
    """The weight dtype for a model on `device`.

    GPUs run in half precision: bf16 where supported (its fp32-sized exponent never overflows), else fp16.
    The VAE's activations overflow fp16's range on large images, so a VAE gets bf16 or fp32, never fp16.
    CPUs use bf16 only when they have native bf16 matmul instructions, fp32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_bf16 is None:
            with torch.cuda.device(device):
                cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return torch.bfloat16
        return torch.float32 if for_vae else torch.float16
    if device.type == "mps":
        return torch.float32 if for_vae else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16(cpu_flags) else torch.float32
    raise ValueError(f"no dtype rule for device type {device.type!r}")


# What --precision (and ComfyUI's --force-fp32/--force-fp16/--bf16-unet/--fp32-vae) may name.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Which models a dtype choice is made for: the diffusion model, text encoders, the VAE, image-space networks
# (upscalers: fp16 overflows there as in a VAE), and every other network (ControlNet, CLIP vision, GLIGEN, ...).
MODEL_ROLES = ("unet", "text", "vae", "image", "model")


def model_dtype(
    device: torch.device | str,
    role: str = "model",
    *,
    precision: str | None = None,
    unet_precision: str | None = None,
    vae_precision: str | None = None,
    cuda_bf16: bool | None = None,
    cpu_flags: Iterable[str] | None = None,
) -> torch.dtype:
    """The weight dtype of a model of `role` on `device`, honouring what the user forced.

    `precision` ("fp32", "bf16", "fp16"; None: pick_dtype's rule) is for every model; `unet_precision` and
    `vae_precision` override it for the diffusion model and the VAE alone. A VAE or an image-space network
    never runs in fp16 unless `vae_precision` says so (its activations overflow fp16's range): asked for fp16
    everywhere, it gets fp32. Passing the choice in, rather than reading a global, lets two environments in one
    process (tests, a planning host) differ."""
    if role not in MODEL_ROLES:
        raise ValueError(f"unknown model role {role!r}; one of {', '.join(MODEL_ROLES)}")
    for name in (precision, unet_precision, vae_precision):
        if name is not None and name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    if role == "unet" and unet_precision is not None:
        return PRECISIONS[unet_precision]
    if role == "vae" and vae_precision is not None:
        return PRECISIONS[vae_precision]
    pixels = role in ("vae", "image")
    if precision is not None:
        dtype = PRECISIONS[precision]
        return torch.float32 if pixels and dtype == torch.float16 else dtype
    return pick_dtype(device, for_vae=pixels, cuda_bf16=cuda_bf16, cpu_flags=cpu_flags)


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as bytes per field (empty where there is no such file)."""
    fields: dict[str, int] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                    fields[name.strip()] = int(parts[0]) * scale
    except OSError:
        pass
    return fields


def _sysconf_bytes(pages_name: str) -> int:
    try:
        return os.sysconf(pages_name) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def free_memory(device: torch.device | str) -> int:
    """Bytes that new tensors on `device` can still take. On CUDA this counts blocks that torch's caching
    allocator holds but does not use, since they are reused before new memory is asked for."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        info = meminfo()
        if "MemAvailable" in info:
            return info["MemAvailable"]
        return _sysconf_bytes("SC_AVPHYS_PAGES")
    raise ValueError(f"cannot measure memory of device type {device.type!r}")


def total_memory(device: torch.device | str) -> int:
    """Bytes of memory `device` has in all."""
    device = torch.device(device)
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    if device.type == "cpu":
        info = meminfo()
        if "MemTotal" in info:
            return info["MemTotal"]
        return _sysconf_bytes("SC_PHYS_PAGES")
    raise ValueError(f"cannot measure memory of device type {device.type!r}")
