"""Loading: modules built by the loader hold exactly (bit for bit) the weights of modules built directly from
the written file, and compute what those compute; dtypes; legacy pickles; standalone VAEs; errors; and no
second copy of the weights.

Weights are compared bit for bit: reading a file is exact. Outputs are compared with a float32 tolerance: the
same weights in differently aligned memory (a file's memory map, a freshly allocated copy, a pickle's storage)
may take different vectorised kernels, which sum in a different order (a 1.2e-6 difference was seen)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.checkpoints.families import detect_family
from diffusion.checkpoints.files import CheckpointError, read_metadata, read_state_dict
from diffusion.checkpoints.loader import build_modules, load_checkpoint, load_vae
from diffusion.checkpoints.random_checkpoints import checkpoint_spec, write_random_checkpoint, write_random_vae
from diffusion.models.text_encoders import TextEncoders
from diffusion.models.unet import UNetModel, sdxl_adm, sdxl_refiner_adm
from diffusion.models.vae import AutoencoderKL

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl_refiner"]
PROMPT = "a (red:1.2) fox in the snow"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loader")
    out = {}
    for family in FAMILIES:
        out[family] = folder / f"{family}.safetensors"
        write_random_checkpoint(out[family], family, seed=11)
    out["inpaint"] = folder / "inpaint.safetensors"
    write_random_checkpoint(out["inpaint"], "sd1", inpaint=True, seed=12)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every parameter and buffer, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert same_bits(sa[key], sb[key]), key


def assert_same_text_weights(a: TextEncoders, b: TextEncoders) -> None:
    assert a.encoders.keys() == b.encoders.keys()
    for name in a.encoders:
        assert_same_weights(a.encoders[name].model, b.encoders[name].model)


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same weights, same code, other memory: float32 summation-order differences only (seen: 1.2e-6)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def adm(family: str, pooled: torch.Tensor, channels: int | None) -> torch.Tensor | None:
    if family == "sdxl":
        return sdxl_adm(pooled, 64, 48, adm_in_channels=channels)
    if family == "sdxl_refiner":
        return sdxl_refiner_adm(pooled, 64, 48, 6.0, adm_in_channels=channels)
    return None


def direct_modules(path, family: str, inpaint: bool = False):
    """The reference: modules constructed normally, then loaded (copied) from safetensors' own reader."""
    sd = load_file(path)
    spec = checkpoint_spec(family, "tiny", inpaint=inpaint)
    unet, vae = UNetModel(spec.unet), AutoencoderKL(spec.vae)
    unet.load_state_dict(under(sd, "model.diffusion_model."), strict=True)
    vae.load_state_dict(under(sd, "first_stage_model."), strict=True)
    text = TextEncoders.from_state_dict(sd, family, num_heads=spec.clip_heads)
    return unet.eval(), vae.eval(), text


@pytest.mark.parametrize("family", [*FAMILIES, "inpaint"])
@torch.no_grad()
def test_loaded_modules_compute_what_directly_built_ones_do(files, family):
    name, inpaint = ("sd1", True) if family == "inpaint" else (family, False)
    loaded = load_checkpoint(files[family])
    unet, vae, text = direct_modules(files[family], name, inpaint)
    assert loaded.family.name == name and loaded.family.inpaint == inpaint
    assert_same_weights(loaded.unet, unet)
    assert_same_weights(loaded.vae, vae)
    assert_same_text_weights(loaded.text, text)

    cond, pooled = loaded.text.encode(PROMPT)
    ref_cond, ref_pooled = text.encode(PROMPT)
    assert_outputs_close(cond, ref_cond)
    assert_outputs_close(pooled, ref_pooled)
    assert cond.std() > 0.1

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, loaded.family.unet.in_channels, 16, 16, generator=gen)
    t = torch.tensor([999.0, 10.0])
    context = cond.expand(2, -1, -1)
    y = adm(name, pooled.expand(2, -1), loaded.family.unet.adm_in_channels)
    out = loaded.unet(x, t, context, y)
    assert_outputs_close(out, unet(x, t, context, y))
    assert out.std() > 0.1, "random weights must give a non-degenerate output"

    latent = torch.randn(1, 4, 8, 8, generator=gen)
    image = loaded.vae.decode(latent)
    assert_outputs_close(image, vae.decode(latent))
    assert image.std() > 0.1
    assert_outputs_close(loaded.vae.encode(image), vae.encode(image))


def test_no_parameter_is_left_on_meta_and_nothing_trains(files):
    loaded = load_checkpoint(files["sdxl"])
    modules = [loaded.unet, loaded.vae, *(e.model for e in loaded.text.encoders.values())]
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert not tensor.is_meta, name
            assert not tensor.requires_grad, name
        assert not module.training


def test_dtype_choices(tmp_path):
    path = tmp_path / "half.safetensors"
    write_random_checkpoint(path, "sd1", dtype=torch.float16)
    stored = load_checkpoint(path)
    assert stored.unet.out[2].weight.dtype == torch.float16
    assert stored.text.encoders["l"].model.dtype == torch.float16
    assert stored.vae.decoder.conv_out.weight.dtype == torch.float32, "fp16 VAEs overflow: kept in fp32"
    bf16 = load_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.vae.parameters()} == {torch.bfloat16}
    full = load_checkpoint(path, dtype=torch.float32)
    assert torch.equal(full.unet.out[2].weight, stored.unet.out[2].weight.float())
    assert full.text.encoders["l"].model.dtype == torch.float32  # text encoders follow the UNet's dtype
    assert bf16.text.encoders["l"].model.dtype == torch.bfloat16


def test_loaded_weights_are_views_of_the_file(files):
    """At the stored dtype nothing is copied: parameters live inside the file's memory map, as far
    apart in memory as their bytes are in the file."""
    raw = files["sd1"].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    loaded = load_checkpoint(files["sd1"])
    pairs = [
        ("model.diffusion_model.input_blocks.0.0.weight", loaded.unet.input_blocks[0][0].weight),
        ("model.diffusion_model.out.2.weight", loaded.unet.out[2].weight),
        ("first_stage_model.decoder.conv_in.weight", loaded.vae.decoder.conv_in.weight),
    ]
    (key0, w0), *rest = pairs
    for key, weight in rest:
        in_file = header[key]["data_offsets"][0] - header[key0]["data_offsets"][0]
        assert weight.data_ptr() - w0.data_ptr() == in_file, key


def test_prediction_is_forced_through(files):
    assert load_checkpoint(files["sd2"]).family.prediction == "eps"
    assert load_checkpoint(files["sd2"], prediction="v").family.prediction == "v"


def test_legacy_ckpt_loads_like_safetensors(files, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": load_file(files["sd1"]), "epoch": 3}, path)
    # A pickle carries no metadata, so a tiny model's heads and groups fall back to the real defaults
    # (32 groups), which cannot split its 16 channels: a clear error, not a crash.
    with pytest.raises(CheckpointError, match=r"old\.ckpt: .*cannot be built"):
        load_checkpoint(path)
    # With the hyper-parameters given, the pickle builds the same modules as the safetensors file.
    sd = read_state_dict(path)
    family = detect_family(sd, read_metadata(files["sd1"]))
    unet, vae, text = build_modules(sd, family)
    loaded = load_checkpoint(files["sd1"])
    assert_same_weights(unet, loaded.unet)
    assert_same_weights(vae, loaded.vae)
    assert_same_text_weights(text, loaded.text)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        cond, _ = text.encode(PROMPT)
        assert_outputs_close(cond, loaded.text.encode(PROMPT)[0])
        assert_outputs_close(unet(x, t, cond), loaded.unet(x, t, cond))
        assert_outputs_close(vae.decode(x), loaded.vae.decode(x))


def test_standalone_vae_with_and_without_prefix(tmp_path, files):
    for prefix in (True, False):
        path = tmp_path / f"vae-{prefix}.safetensors"
        config = write_random_vae(path, prefix=prefix, seed=4)
        vae = load_vae(path)
        assert vae.config == config
        reference = AutoencoderKL(config)
        sd = load_file(path)
        reference.load_state_dict(under(sd, "first_stage_model.") if prefix else sd)
        assert_same_weights(vae, reference)
        z = torch.randn(1, 4, 8, 8)
        with torch.no_grad():
            assert_outputs_close(vae.decode(z), reference.decode(z))
    # the VAE of a full checkpoint file can be loaded the same way
    full = load_vae(files["sd2"])
    assert full.config == checkpoint_spec("sd2", "tiny").vae


def test_standalone_vae_ignores_extra_entries(tmp_path):
    path = tmp_path / "vae.safetensors"
    write_random_vae(path, prefix=False)
    sd = load_file(path)
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["loss.logvar"] = torch.zeros(())
    save_file(sd, tmp_path / "vae2.safetensors", metadata={"latentloom.config": '{"vae": {"norm_groups": 8}}'})
    assert load_vae(tmp_path / "vae2.safetensors").config == load_vae(path).config


def test_errors_name_the_file_and_the_problem(tmp_path, files):
    text = tmp_path / "readme.safetensors"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=r"readme\.safetensors"):
        load_checkpoint(text)
    sd = load_file(files["sd1"])
    no_vae = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, no_vae)
    with pytest.raises(CheckpointError, match=r"novae\.safetensors: SD1\.x checkpoint without a VAE"):
        load_checkpoint(no_vae)
    with pytest.raises(CheckpointError, match=r"novae\.safetensors: not a VAE: found \d+ keys"):
        load_vae(no_vae)


def test_weights_that_do_not_fit_are_reported(tmp_path, files):
    sd = load_file(files["sd1"])
    meta = {"latentloom.config": json.dumps({"unet": {"num_heads": 2, "norm_groups": 8},
                                             "vae": {"norm_groups": 8}, "clip": {"num_heads": 2}})}
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "model.diffusion_model.time_embed.5.weight": torch.zeros(2)}, extra, metadata=meta)
    with pytest.raises(CheckpointError, match=r"UNet weights do not match .* 1 unexpected \['time_embed\.5\.weight'\]"):
        load_checkpoint(extra)
    wrong = tmp_path / "wrong.safetensors"
    save_file({**sd, "model.diffusion_model.time_embed.2.bias": torch.zeros(3)}, wrong, metadata=meta)
    with pytest.raises(CheckpointError, match=r"UNet weights do not fit .*time_embed\.2\.bias"):
        load_checkpoint(wrong)


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (here the
# whole pytest process), while VmHWM belongs to this process's own address space.
MEASURE = """
import gc, sys, torch
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
write_random_checkpoint(sys.argv[2], "sd1")  # warm-up: lazy imports and the tokenizer join the baseline
warm = load_checkpoint(sys.argv[2])
warm.text.encode("warm up")
del warm
gc.collect()
def peak_rss():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) * 1024
baseline = peak_rss()
loaded = load_checkpoint(sys.argv[1])
modules = [loaded.unet, loaded.vae, *(e.model for e in loaded.text.encoders.values())]
touched = sum(float(p.max()) for m in modules for p in m.parameters())  # read every weight, no copies
print(baseline, peak_rss(), touched)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_keeps_one_copy_of_the_weights(tmp_path):
    """Peak RSS of a fresh process that loads a ~110 MB bf16 file and reads every weight grows by at most
    1.3x the file size over the warmed-up interpreter. (bf16: every module keeps the stored dtype, so the
    file's pages are the only copy; an fp16 file adds the VAE's fp32 copy, measured in bench/models.py.)"""
    path = tmp_path / "small.safetensors"
    write_random_checkpoint(path, "sd1", size="small", dtype=torch.bfloat16)
    size = path.stat().st_size
    assert 80e6 < size < 200e6
    command = [sys.executable, "-c", MEASURE, str(path), str(tmp_path / "warm.safetensors")]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    baseline, peak, _ = (float(x) for x in result.stdout.split())
    growth = peak - baseline
    assert growth < 1.3 * size, f"loading grew RSS by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    assert growth > 0.7 * size, "the measurement must see the weights being read"
