"""Control-LoRA: random files in Stability's layout (marker, full ControlNet layers, `.up`/`.down` factors for the
encoder copy, norms and biases in full) composed with a model equal a full ControlNet whose encoder weights are the
model's + up @ down; composition follows the model's own patches and is kept per model; family detection from real
shapes; bad files and mismatched models give clear errors; end to end through the nodes."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion.checkpoints.control_lora import (
    MARKER,
    compose_control_lora,
    control_lora_state_dict,
    is_control_lora_file,
    read_control_lora,
)
from diffusion.checkpoints.controlnet_files import (
    build_controlnet,
    load_controlnet,
    random_controlnet,
    write_controlnet_file,
)
from diffusion.checkpoints.files import CheckpointError, read_state_dict, strip_prefix, write_safetensors
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.handles import wrap_checkpoint
from diffusion.memory import ModelManager
from diffusion.patches.control_lora_handle import ControlLoraHandle
from diffusion.patches.patcher import WeightDiff
from tests.diffusion.random_weights import relative_error

OWN = ("input_hint_block.", "zero_convs.", "middle_block_out.")
RANK = 3
UNET = "model.diffusion_model."


def control_lora_of(base: dict[str, torch.Tensor], family: str, seed: int = 0, rank: int = RANK):
    """(a Control-LoRA state dict in Stability's layout, the full ControlNet weights it means on `base`). Its own
    layers, norms and biases are random and stored in full, conv/linear weights of the encoder as random factors;
    time_embed is left out (the model's own)."""
    full, info = random_controlnet(family, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    lora: dict[str, torch.Tensor] = {MARKER: torch.zeros(0)}
    expected: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        if key.startswith(OWN) or (value.ndim == 1 and not key.startswith("time_embed.")):
            lora[key] = expected[key] = value
        elif key.startswith("time_embed."):
            expected[key] = base[key]
        else:
            layer = key.removesuffix(".weight")
            out, rest = value.shape[0], value.shape[1:]
            up = torch.randn(out, rank, *([1] * (len(rest) - 1)), generator=gen) * 0.1
            down = torch.randn(rank, *rest, generator=gen) * 0.1
            lora[layer + ".up"], lora[layer + ".down"] = up, down
            expected[key] = base[key] + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
    return lora, expected, info


def write_lora(path, lora, family: str) -> None:
    metadata = {"latentloom.config": json.dumps({"family": family})}
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in lora.items()}, lambda k: lora[k].contiguous(),
                      metadata)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("sd1", "sdxl"):
        write_random_checkpoint(root / f"{family}.safetensors", family, seed=3)
    return root


@pytest.fixture(scope="module")
def sd1(model_dir):
    loaded = load_checkpoint(model_dir / "sd1.safetensors", dtype=torch.float32)
    model, _, _ = wrap_checkpoint(loaded, ModelManager("cpu"))
    base = strip_prefix(read_state_dict(model_dir / "sd1.safetensors"), UNET)
    return model, {k: v.float() for k, v in base.items()}


def inputs(config, batch: int = 2):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, 6, 5, generator=gen)
    hint = torch.rand(batch, 3, 48, 40, generator=gen)
    context = torch.randn(batch, 7, config.unet.context_dim, generator=gen)
    return x, hint, torch.tensor([500.0, 20.0])[:batch], context


@torch.no_grad()
def test_composed_controlnet_equals_the_full_one(tmp_path, sd1) -> None:
    model, base = sd1
    lora, expected, info = control_lora_of(base, "sd1")
    path = tmp_path / "control-lora.safetensors"
    write_lora(path, lora, "sd1")
    sd, lora_info = read_control_lora(path)
    assert (lora_info.family, lora_info.rank, lora_info.hint.hint_channels) == ("sd1", RANK, 3)
    composed = compose_control_lora(sd, lora_info, model.family.unet, base.get)
    reference = build_controlnet(expected, info, dtype=torch.float32)
    mine = composed.state_dict()
    assert mine.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)
    x, hint, t, context = inputs(info.config)
    for ours, theirs in zip(composed(x, hint, t, context), reference(x, hint, t, context), strict=True):
        assert relative_error(ours, theirs) < 1e-5
    # the factors matter: the model's weights alone give another network
    plain = compose_control_lora({k: v for k, v in sd.items() if not k.endswith((".up", ".down"))} | {
        k.removesuffix(".up") + ".weight": base[k.removesuffix(".up") + ".weight"] for k in sd if k.endswith(".up")},
        lora_info, model.family.unet, base.get)
    assert relative_error(plain(x, hint, t, context)[0], reference(x, hint, t, context)[0]) > 1e-3


def test_bind_composes_from_the_models_patched_weights_and_keeps_it_per_model(sd1) -> None:
    model, base = sd1
    lora, expected, _ = control_lora_of(base, "sd1", seed=1)
    sd, info = control_lora_state_dict(lora, {"latentloom.config": json.dumps({"family": "sd1"})})
    handle = ControlLoraHandle(sd, info, model.manager, torch.float32, "canny")
    first = handle.bind(model)
    assert handle.bind(model) is first  # composed once per model and patch set
    key = "input_blocks.1.0.in_layers.2.weight"
    torch.testing.assert_close(first.patcher.model.state_dict()[key], expected[key])
    patched = model.clone()
    shift = torch.full_like(base[key], 0.25)
    patched.patcher.add_patches({key: WeightDiff(shift)})
    second = handle.bind(patched)
    assert second is not first
    torch.testing.assert_close(second.patcher.model.state_dict()[key], expected[key] + shift)
    assert second.info.family == "sd1" and second.info.config.hint_channels == 3


def test_a_model_of_another_family_or_shape_is_refused(sd1, model_dir) -> None:
    model, base = sd1
    lora, _, _ = control_lora_of(base, "sd1")
    sd, info = control_lora_state_dict(lora, {"latentloom.config": json.dumps({"family": "sd1"})})
    sdxl, _, _ = wrap_checkpoint(load_checkpoint(model_dir / "sdxl.safetensors", dtype=torch.float32),
                                 ModelManager("cpu"))
    handle = ControlLoraHandle(sd, info, model.manager, torch.float32, "canny")
    with pytest.raises(ValueError, match=r"Control-LoRA 'canny' \(SD1\.x\).*made for SD1\.x and the model is SDXL"):
        handle.bind(sdxl)
    # factors whose product does not fit the model's weight
    layer = "input_blocks.1.0.in_layers.2"
    broken = dict(sd) | {layer + ".down": sd[layer + ".down"][:, :-1]}
    with pytest.raises(CheckpointError, match=r"in_layers\.2\.up @ .*made for another model"):
        compose_control_lora(broken, info, model.family.unet, base.get)


def test_bad_files_get_clear_errors() -> None:
    full, _ = random_controlnet("sd1")
    own = {k: v for k, v in full.items() if k.startswith(OWN)}
    with pytest.raises(CheckpointError, match="no 'lora_controlnet' marker"):
        control_lora_state_dict(own)
    with pytest.raises(CheckpointError, match="without low-rank layers"):
        control_lora_state_dict({MARKER: torch.zeros(0), **own})
    half = {MARKER: torch.zeros(0), **own, "input_blocks.1.0.in_layers.2.up": torch.zeros(8, 2, 1, 1)}
    with pytest.raises(CheckpointError, match=r"only one of \.up/\.down"):
        control_lora_state_dict(half)
    with pytest.raises(CheckpointError, match="without its ControlNet layers"):
        control_lora_state_dict({MARKER: torch.zeros(0), "input_blocks.1.0.in_layers.2.up": torch.zeros(8, 2)})
    pair = {"input_blocks.1.0.in_layers.2.up": torch.zeros(8, 2, 1, 1),
            "input_blocks.1.0.in_layers.2.down": torch.zeros(2, 8, 3, 3)}
    with pytest.raises(CheckpointError, match="cannot tell which model family"):
        control_lora_state_dict({MARKER: torch.zeros(0), **own, **pair})


def test_unknown_keys_are_named(sd1) -> None:
    model, base = sd1
    lora, _, _ = control_lora_of(base, "sd1")
    sd, info = control_lora_state_dict(lora | {"input_blocks.99.0.bias": torch.zeros(3)},
                                       {"latentloom.config": json.dumps({"family": "sd1"})})
    with pytest.raises(CheckpointError, match=r"fit no layer.*input_blocks\.99\.0\.bias"):
        compose_control_lora(sd, info, model.family.unet, base.get)


@pytest.mark.parametrize(("key", "shape", "family"), [
    ("label_emb.0.0.down", (128, 2816), "sdxl"),
    ("label_emb.0.0.down", (128, 2560), "sdxl_refiner"),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.down", (128, 768), "sd1"),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.down", (128, 1024), "sd2"),
])
def test_family_from_real_shapes(key: str, shape: tuple[int, int], family: str) -> None:
    full, _ = random_controlnet("sd1")
    own = {k: v for k, v in full.items() if k.startswith(OWN)}
    layer = key.removesuffix(".down")
    sd = {MARKER: torch.zeros(0), **own, key: torch.empty(shape, device="meta"),
          layer + ".up": torch.empty(64, shape[0], device="meta")}
    _, info = control_lora_state_dict(sd)
    assert info.family == family and info.rank == 128


def test_written_as_a_full_controlnet_it_is_not_a_control_lora(tmp_path, sd1) -> None:
    """The same weights written in full load as an ordinary ControlNet: the marker decides, not the key names."""
    _, base = sd1
    lora, expected, info = control_lora_of(base, "sd1", seed=4)
    write_controlnet_file(tmp_path / "full.safetensors", expected, info)
    assert not is_control_lora_file(tmp_path / "full.safetensors")
    with pytest.raises(CheckpointError, match="marker"):
        read_control_lora(tmp_path / "full.safetensors")
    write_lora(tmp_path / "lora.safetensors", lora, "sd1")
    assert is_control_lora_file(tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="a Control-LoRA"):
        load_controlnet(tmp_path / "lora.safetensors")
