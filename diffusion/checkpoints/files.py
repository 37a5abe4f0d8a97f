"""Reading checkpoint files into state dicts without executing code and without copying weights.

`.safetensors` files are parsed here (an 8-byte little-endian header length, a JSON header, then the raw
data) and memory-mapped copy-on-write: every tensor is a zero-copy view into the mapping, so nothing is
read from disk until a tensor is used, and a module built from these views (with `assign=True`) holds the
only copy of its weights. Legacy pickled files (`.ckpt`, `.pt`, `.pth`, `.bin`) go through
`torch.load(weights_only=True)`, which refuses any pickle that would need to run code.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Tensor = torch.Tensor

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):  # present in recent torch versions only
        DTYPES[_code] = getattr(torch, _name)
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint, or a checkpoint that is not what was expected."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint file, by key. Safetensors tensors are lazy views into a memory map."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if _looks_like_safetensors(path):
        return _read_safetensors(path)[0]
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # named .safetensors but its header is wrong
        _read_safetensors(path)
    return _read_pickle(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file; {} for other formats or when absent."""
    path = Path(path)
    if not _looks_like_safetensors(path) and path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    header, _ = _read_header(path)
    return dict(header.get("__metadata__") or {})


# --- safetensors -----------------------------------------------------------------------------------


def _looks_like_safetensors(path: Path) -> bool:
    """True if the file starts with a plausible header length followed by '{' (sniffed, not trusted)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8)


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data area)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a checkpoint ({size} bytes, too short for a safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: corrupt safetensors header: it claims {length} bytes but the file has {size - 8} after "
                "the length field"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    return header, 8 + length


def _tensor_entry(path: Path, key: str, entry: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    """Validated (dtype, shape, begin, end) of one header entry; offsets relative to the data area."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {code!r}, not supported here ({sorted(DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        raise CheckpointError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    dtype = DTYPES[code]
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != needed:
        raise CheckpointError(
            f"{path}: tensor {key!r} of shape {shape} ({code}) needs {needed} bytes, but its data_offsets "
            f"{begin}..{end} span {end - begin}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {key!r} needs bytes {begin}..{end}, file data has {data_size}"
        )
    return dtype, shape, begin, end


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    header, data_start = _read_header(path)
    metadata = dict(header.pop("__metadata__", None) or {})
    data_size = path.stat().st_size - data_start
    entries = {key: _tensor_entry(path, key, entry, data_size) for key, entry in header.items()}
    if not entries:
        return {}, metadata
    with open(path, "rb") as f:
        # Copy-on-write: tensors are writable (in-place patches stay private to this process) and pages
        # are read from disk only when touched.
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for key, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        # frombuffer keeps a reference to the mapping, which stays open as long as any view lives.
        flat = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=data_start + begin)
        tensors[key] = flat.view(shape)
    return tensors, metadata


# --- legacy pickles --------------------------------------------------------------------------------


def read_pickle(path: str | os.PathLike) -> object:
    """Whatever a legacy torch pickle holds, as long as it is only tensors and plain containers (dicts with any
    keys, lists, numbers, strings): for files that are not flat state dicts, such as A1111 hypernetworks
    (integer keys, per-layer dicts, metadata). Pickles that need code are refused as `read_state_dict` does."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    return _load_pickle(path)


def _read_pickle(path: Path) -> dict[str, Tensor]:
    return _unwrap_state_dict(path, _load_pickle(path))


def _load_pickle(path: Path) -> object:
    zipped = zipfile.is_zipfile(path)  # torch.save's format since 1.6; only it can be memory-mapped
    if not zipped and not _starts_like_pickle(path):
        size = path.stat().st_size
        raise CheckpointError(f"{path}: not a checkpoint ({size} bytes, neither safetensors nor a torch pickle)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: this pickle needs code to load (it references objects other than tensors and "
            f"plain containers), and checkpoints are never allowed to run code ({_unpickler_reason(e)})"
        ) from None
    except Exception as e:  # a damaged pickle can fail anywhere inside the unpickler
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    return loaded


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # the PROTO opcode every protocol >= 2 pickle begins with


def _unpickler_reason(e: BaseException) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return specific[0] if specific else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unwrap_state_dict(path: Path, loaded: object) -> dict[str, Tensor]:
    """The tensor dict inside a loaded pickle: Lightning checkpoints keep it under "state_dict", BasicSR's
    (ESRGAN, Real-ESRGAN, SwinIR upscalers) under "params_ema" (the EMA weights, used for inference) or "params"."""
    for wrapper in ("state_dict", "params_ema", "params"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a checkpoint: the pickle holds a {type(loaded).__name__}, not a dict")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint: the pickled dict holds no tensors")
    skipped = len(loaded) - len(tensors)
    if skipped:
        log.debug("%s: ignored %d non-tensor entries", path, skipped)
    return tensors


# --- shared helpers --------------------------------------------------------------------------------


def key_prefixes(keys: Iterable[str], depth: int = 1) -> dict[str, int]:
    """How many keys start with each dotted prefix of `depth` parts (for error messages)."""
    counts: dict[str, int] = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:depth])
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def write_safetensors(
    path: str | os.PathLike,
    shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time: the header is laid out from `shapes` (key -> dtype,
    shape) first, then `produce(key)` is called for each key in header order and its bytes appended, so
    at most one tensor is in memory whatever the file's size."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (dtype, shape) in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keeps the data area 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (dtype, shape) in shapes.items():
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{key}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
            if tensor.numel():
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
