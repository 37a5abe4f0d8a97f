"""Checkpoint file reading: our safetensors reader against safetensors' own, header validation, refusal of
pickles that would run code, and clear errors for files that are not checkpoints."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.checkpoints.files import (
    DTYPE_CODES,
    CheckpointError,
    read_metadata,
    read_state_dict,
    write_safetensors,
)


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", sorted(DTYPE_CODES, key=str), ids=lambda d: DTYPE_CODES[d])
def test_reader_matches_safetensors_bit_for_bit(tmp_path, dtype):
    tensors = {
        "matrix": sample_tensor(dtype, (5, 7), 0),
        "vector": sample_tensor(dtype, (3,), 1),
        "scalar": sample_tensor(dtype, (), 2),
        "empty": sample_tensor(dtype, (0, 4), 3),
        "nested.name.weight": sample_tensor(dtype, (2, 3, 1, 2), 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"note": "hello"})
    ours, reference = read_state_dict(path), load_file(path)
    assert ours.keys() == reference.keys()
    for key in reference:
        assert same_bits(ours[key], reference[key]), key
    assert read_metadata(path) == {"note": "hello"}


def test_tensors_are_views_into_one_copy_on_write_mapping(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(16, dtype=torch.float32), "b": torch.ones(8, dtype=torch.float32)}, path)
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    sd = read_state_dict(path)
    # zero-copy: the distance between the tensors' memory equals the distance of their bytes in the file
    gap = header["b"]["data_offsets"][0] - header["a"]["data_offsets"][0]
    assert sd["b"].data_ptr() - sd["a"].data_ptr() == gap
    before = path.read_bytes()
    sd["a"].add_(100)  # private to this process: the file never changes
    assert path.read_bytes() == before
    assert torch.equal(read_state_dict(path)["a"], torch.arange(16, dtype=torch.float32))
    assert sd["a"][0].item() == 100


def test_streaming_writer_output_loads_in_safetensors(tmp_path):
    values = {"w": torch.randn(4, 3), "ids": torch.arange(5), "h": torch.randn(2).half(), "z": torch.empty(0)}
    path = tmp_path / "w.safetensors"
    produced = []

    def produce(key):
        produced.append(key)
        return values[key]

    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in values.items()}, produce, {"m": "1"})
    assert produced == list(values)
    loaded = load_file(path)
    for key, value in values.items():
        assert same_bits(loaded[key], value)
    assert read_metadata(path) == {"m": "1"}
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(tmp_path / "bad.safetensors", {"w": (torch.float32, (4, 3))}, lambda k: torch.zeros(3))


def raw_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_truncated_file_names_the_tensor_and_byte_range(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    expected = r"cut\.safetensors: truncated: tensor 'b' needs bytes 16\.\.416, file data has 376"
    with pytest.raises(CheckpointError, match=expected):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16 bytes"),
        ({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "dtype 'Q7'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}}, b"\0" * 16, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [4]}}, b"\0" * 16, "corrupt safetensors header entry"),
        ({"__metadata__": {"k": 3}}, b"", "__metadata__ must map strings"),
    ],
)
def test_corrupt_headers_are_explained(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_safetensors(header, data))
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: corrupt safetensors header"):
        read_state_dict(path)


def test_header_longer_than_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="claims 1000000 bytes but the file has 2"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.safetensors", b"these are not weights\n" * 3),
        ("empty.ckpt", b""),
        ("text.ckpt", b"hello world"),
        ("noise.safetensors", bytes(range(256)) * 4),
        ("noise.pt", os.urandom(0) + bytes((i * 37) % 256 for i in range(999))),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nothing.safetensors")


EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
zipped = sys.argv[3] == "zip"
torch.save({"weights": torch.ones(2), "payload": Evil()}, sys.argv[1], _use_new_zipfile_serialization=zipped)
"""


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused_and_never_run(tmp_path, fmt):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "marker"
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker), fmt], check=True)
    assert not marker.exists(), "writing the pickle must not have created the marker"
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused: this pickle needs code to load"):
        read_state_dict(path)
    assert not marker.exists()
    # the payload is live: an unsafe load (in a throwaway process) does create the marker
    unsafe = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe, str(path)], check=True)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_plain_pickled_state_dicts_load(tmp_path, fmt):
    weights = {"model.w": torch.randn(3, 2), "model.ids": torch.arange(4)}
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": weights, "global_step": 7}, wrapped, _use_new_zipfile_serialization=fmt == "zip")
    bare = tmp_path / "bare.pt"
    torch.save(weights, bare, _use_new_zipfile_serialization=fmt == "zip")
    for path in (wrapped, bare):
        loaded = read_state_dict(path)
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)
        assert read_metadata(path) == {}


def test_pickle_without_tensors_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        read_state_dict(path)
