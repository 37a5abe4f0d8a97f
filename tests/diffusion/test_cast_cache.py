"""The cast-weights cache (diffusion/checkpoints/cast_cache.py): a second load of a file that had to be cast maps
the stored casts instead of casting (the first image of a process no longer pays for the fp16 -> bf16 copy), with
the same weights bit for bit; a changed source file, a damaged cache file, a load that casts nothing and the
folder's size limit are each handled."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from diffusion.checkpoints import loader
from diffusion.checkpoints.cast_cache import SUFFIX
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint


@pytest.fixture(scope="module")
def fp16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cast-cache") / "tiny-sd1.safetensors"
    write_random_checkpoint(path, "sd1", dtype=torch.float16, seed=3)
    return path


def weights(loaded) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in loaded.unet.state_dict().items()}
    out |= {f"vae.{k}": v for k, v in loaded.vae.state_dict().items()}
    for name, encoder in loaded.text.encoders.items():
        out |= {f"text.{name}.{k}": v for k, v in encoder.model.state_dict().items()}
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype.is_floating_point else a[key],
                           b[key].view(torch.uint8) if b[key].dtype.is_floating_point else b[key]), key


def no_casting(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was cast although the cache holds it")

    monkeypatch.setattr(loader, "_cast_half", refuse)


def test_second_load_maps_the_cast_weights_bit_for_bit(tmp_path, fp16_file, monkeypatch):
    reference = weights(loader.load_checkpoint(fp16_file, dtype=torch.bfloat16))
    first = loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path)
    files = list(tmp_path.glob(f"*{SUFFIX}"))
    assert len(files) == 1 and files[0].name.startswith("tiny-sd1.")
    assert_same(weights(first), reference)
    no_casting(monkeypatch)
    second = weights(loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path))
    assert_same(second, reference)
    assert all(v.dtype == torch.bfloat16 for k, v in second.items() if v.dtype.is_floating_point)


def test_other_dtypes_join_the_same_file(tmp_path, fp16_file, monkeypatch):
    loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path)
    fp32_vae = weights(loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, autoencoder_dtype=torch.float32))
    loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, autoencoder_dtype=torch.float32, cast_cache=tmp_path)
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1
    no_casting(monkeypatch)  # bf16 UNet/text casts go through _cast_half; the fp32 VAE is a plain .to
    again = weights(loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, autoencoder_dtype=torch.float32,
                                           cast_cache=tmp_path))
    assert_same(again, fp32_vae)


def test_a_load_that_casts_nothing_writes_nothing(tmp_path, fp16_file):
    loader.load_checkpoint(fp16_file, dtype=torch.float16, autoencoder_dtype=torch.float16, cast_cache=tmp_path)
    assert not list(tmp_path.glob(f"*{SUFFIX}"))


def test_a_changed_source_gets_a_new_cache_file(tmp_path, fp16_file):
    source = tmp_path / "model.safetensors"
    source.write_bytes(fp16_file.read_bytes())
    folder = tmp_path / "cache"
    loader.load_checkpoint(source, dtype=torch.bfloat16, cast_cache=folder)
    (before,) = folder.glob(f"*{SUFFIX}")
    write_random_checkpoint(source, "sd1", dtype=torch.float16, seed=4)  # other weights under the same name
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    loaded = weights(loader.load_checkpoint(source, dtype=torch.bfloat16, cast_cache=folder))
    (after,) = folder.glob(f"*{SUFFIX}")
    assert after != before  # the stale file is gone, not served
    assert_same(loaded, weights(loader.load_checkpoint(source, dtype=torch.bfloat16)))


def test_a_damaged_cache_file_costs_only_the_cache(tmp_path, fp16_file, caplog):
    loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path)
    (cached,) = tmp_path.glob(f"*{SUFFIX}")
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated, as after a crash mid-write by another tool
    with caplog.at_level(logging.WARNING):
        loaded = weights(loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path))
    assert "unreadable" in caplog.text
    assert_same(loaded, weights(loader.load_checkpoint(fp16_file, dtype=torch.bfloat16)))
    assert cached.stat().st_size > 10_000  # written again whole


def test_the_folder_keeps_within_its_limit(tmp_path, fp16_file, monkeypatch):
    from diffusion.checkpoints import cast_cache

    size = None
    for i in range(3):
        source = tmp_path / f"m{i}.safetensors"
        source.write_bytes(fp16_file.read_bytes())
        loader.load_checkpoint(source, dtype=torch.bfloat16, cast_cache=tmp_path / "cache")
        if size is None:
            size = next((tmp_path / "cache").glob(f"*{SUFFIX}")).stat().st_size
            monkeypatch.setattr(cast_cache, "LIMIT", int(size * 2.5))  # room for two
    names = sorted(p.name.split(".")[0] for p in (tmp_path / "cache").glob(f"*{SUFFIX}"))
    assert names == ["m1", "m2"]  # the least recently used went


def test_a_file_over_the_limit_alone_is_not_cached(tmp_path, fp16_file):
    loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path / "cache", cast_cache_limit=1000)
    assert not list((tmp_path / "cache").glob(f"*{SUFFIX}"))
    loader.load_checkpoint(fp16_file, dtype=torch.bfloat16, cast_cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 1
