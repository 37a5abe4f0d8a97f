"""Upscale models: RRDBNet and SRVGGNetCompact against functional references written here from the papers, both
ESRGAN key layouts, detection from shapes, wrappers, bad files, and the tiled run (seams, sizes, channels, OOM)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from diffusion.checkpoints.files import CheckpointError
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.checkpoints.upscale_models import (
    UpscaleModel,
    detect_architecture,
    load_upscale_model,
    load_upscaler,
    random_upscaler_state,
    write_random_upscale_model,
)
from diffusion.memory import ModelManager
from diffusion.models.upscalers import ARCHITECTURES, rrdbnet, srvgg
from tests.diffusion.random_weights import relative_error

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager(torch.device("cpu"), "cpu")


def photo(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A photograph-like IMAGE [B, H, W, 3]: smooth gradients, a hard-edged rectangle and disc, sensor noise."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([xx, yy, 0.5 + 0.3 * torch.sin(6 * xx + 3 * yy)], -1)
    image[height // 4: height // 2, width // 3: 2 * width // 3] = torch.tensor([0.9, 0.2, 0.1])
    image[(xx - 0.7) ** 2 + (yy - 0.7) ** 2 < 0.03] = torch.tensor([0.1, 0.3, 0.9])
    noisy = image[None].repeat(batch, 1, 1, 1) + 0.03 * torch.randn(batch, height, width, 3, generator=gen)
    return noisy.clamp(0, 1)


# --- independent references: torch.nn.functional on the state dict, from the papers ---------------------------


def reference_rrdbnet(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ESRGAN's generator (BasicSR key names): dense blocks of five convs on concatenated features (LeakyReLU 0.2),
    residuals scaled by 0.2 in each dense block and around each group of three, a trunk conv, ×2 nearest + conv per
    upsampling stage, two convs at full size. Real-ESRGAN's x2/x1 pixel-unshuffle the input first."""
    def conv(name, h):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def act(h):
        return torch.where(h >= 0, h, 0.2 * h)

    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    ratio = sd["conv_first.weight"].shape[1] // sd["conv_last.weight"].shape[0]
    factor = {1: 1, 4: 2, 16: 4}[ratio]
    if factor > 1:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // factor, factor, w // factor, factor).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(b, c * factor * factor, h // factor, w // factor)
    first = conv("conv_first", x)
    trunk = first
    for i in range(blocks):
        group_in = trunk
        for r in (1, 2, 3):
            dense_in, feats = trunk, [trunk]
            for c in (1, 2, 3, 4):
                feats.append(act(conv(f"body.{i}.rdb{r}.conv{c}", torch.cat(feats, 1))))
            trunk = dense_in + 0.2 * conv(f"body.{i}.rdb{r}.conv5", torch.cat(feats, 1))
        trunk = group_in + 0.2 * trunk
    h = first + conv("conv_body", trunk)
    stage = 1
    while f"conv_up{stage}.weight" in sd:
        h = act(conv(f"conv_up{stage}", h.repeat_interleave(2, -2).repeat_interleave(2, -1)))
        stage += 1
    return conv("conv_last", act(conv("conv_hr", h)))


def reference_srvgg(sd: dict[str, torch.Tensor], x: torch.Tensor, scale: int) -> torch.Tensor:
    """Real-ESRGAN compact: conv, PReLU, ..., conv to C·s² maps, pixel shuffle, plus the input enlarged by
    repetition."""
    h, i = x, 0
    while f"body.{i}.weight" in sd:
        weight = sd[f"body.{i}.weight"]
        if weight.ndim == 4:
            h = F.conv2d(h, weight, sd[f"body.{i}.bias"], padding=1)
        else:
            h = torch.where(h >= 0, h, weight[None, :, None, None] * h)
        i += 1
    b, c, hh, ww = h.shape
    out_c = c // scale**2
    h = h.reshape(b, out_c, scale, scale, hh, ww).permute(0, 1, 4, 2, 5, 3).reshape(b, out_c, hh * scale, ww * scale)
    return h + x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


ESRGAN_X4 = {"conv_first": "model.0", "conv_up1": "model.3", "conv_up2": "model.6", "conv_hr": "model.8",
             "conv_last": "model.10"}  # the original ESRGAN repository's nn.Sequential indices for a ×4 model


def to_esrgan_layout(sd: dict[str, torch.Tensor], num_block: int) -> dict[str, torch.Tensor]:
    """The same tensors under the original ESRGAN keys, renamed here independently of the module's own map."""
    out = {}
    for key, value in sd.items():
        layer, kind = key.rsplit(".", 1)
        if m := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)", layer):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{kind}"] = value
        elif layer == "conv_body":
            out[f"model.1.sub.{num_block}.{kind}"] = value
        else:
            out[f"{ESRGAN_X4[layer]}.{kind}"] = value
    return out


# --- parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [4, 2, 1, 8])
def test_rrdbnet_matches_the_functional_reference(tmp_path, scale):
    path = tmp_path / f"x{scale}.pth"
    sd = write_random_upscale_model(path, "rrdbnet", scale, num_feat=12, num_block=2, num_grow=6, seed=scale)
    module, config, arch = load_upscaler(path, dtype=torch.float32)
    assert arch is rrdbnet and config.scale == scale
    assert (config.num_feat, config.num_block, config.num_grow) == (12, 2, 6)
    assert config.unshuffle == {1: 4, 2: 2}.get(scale, 1)
    x = photo(2, 24, 20).movedim(-1, 1)
    with torch.no_grad():
        ours = module(x)
    expected = reference_rrdbnet(sd, x)
    assert ours.shape == (2, 3, 24 * scale, 20 * scale)
    assert relative_error(ours, expected) <= TOLERANCE


def test_both_rrdbnet_key_layouts_load_to_the_same_output(tmp_path):
    sd = random_upscaler_state("rrdbnet", 4, num_feat=8, num_block=2, num_grow=4, seed=3)
    old = to_esrgan_layout(sd, num_block=2)
    assert "model.1.sub.1.RDB3.conv5.0.weight" in old and "model.1.sub.2.weight" in old
    torch.save(old, tmp_path / "esrgan.pth")
    torch.save({"params_ema": sd}, tmp_path / "basicsr.pth")
    new_module, new_config, _ = load_upscaler(tmp_path / "basicsr.pth", dtype=torch.float32)
    old_module, old_config, _ = load_upscaler(tmp_path / "esrgan.pth", dtype=torch.float32)
    assert old_config.old_layout and not new_config.old_layout and old_config.scale == 4
    x = photo(1, 16, 16).movedim(-1, 1)
    with torch.no_grad():
        a, b = new_module(x), old_module(x)
    assert torch.equal(a, b)
    assert relative_error(a, reference_rrdbnet(sd, x)) <= TOLERANCE
    # the writer's own ESRGAN layout is the same key set
    assert set(random_upscaler_state("rrdbnet", 4, num_block=2, old_layout=True)) == set(old)


def test_esrgan_layout_indices_for_other_upsampling_depths():
    """×8 (three upsample stages: model.3, .6, .9, then .11 and .13) and a 1x model with no upsampling and no
    unshuffle (model.2 and model.4), as community ESRGAN files have them."""
    x8 = random_upscaler_state("rrdbnet", 8, old_layout=True)
    assert {"model.9.weight", "model.11.weight", "model.13.weight"} <= set(x8) and "model.12.weight" not in x8
    assert rrdbnet.detect(x8) == rrdbnet.RRDBConfig(3, 3, 8, 1, 4, upsamples=3, unshuffle=1, old_layout=True)
    one = rrdbnet.RRDBConfig(3, 3, 8, 2, 4, upsamples=0, unshuffle=1, old_layout=True)
    with torch.device("meta"):
        names = rrdbnet.build(one).state_dict()
    keys = {rrdbnet.esrgan_key(k, one): v for k, v in names.items()}
    assert {"model.0.weight", "model.1.sub.2.weight", "model.2.weight", "model.4.weight"} <= set(keys)
    assert rrdbnet.detect(keys) == one and rrdbnet.detect(keys).scale == 1


def test_odd_sizes_through_an_unshuffling_model_come_back_at_exactly_scale_times(tmp_path):
    write_random_upscale_model(tmp_path / "x2.safetensors", "rrdbnet", 2)
    module, _, _ = load_upscaler(tmp_path / "x2.safetensors", dtype=torch.float32)
    x = photo(1, 17, 23).movedim(-1, 1)
    with torch.no_grad():
        out = module(x)
    assert out.shape == (1, 3, 34, 46)
    padded = F.pad(x, (0, 1, 0, 1), mode="reflect")
    with torch.no_grad():
        assert torch.allclose(out, module(padded)[..., :34, :46])


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_srvgg_matches_the_functional_reference(tmp_path, scale):
    path = tmp_path / "compact.pth"
    sd = write_random_upscale_model(path, "srvgg", scale, num_feat=10, num_conv=3, seed=scale)
    module, config, arch = load_upscaler(path, dtype=torch.float32)
    assert arch is srvgg and (config.num_feat, config.num_conv, config.scale) == (10, 3, scale)
    x = photo(2, 13, 17).movedim(-1, 1)
    with torch.no_grad():
        ours = module(x)
    assert ours.shape == (2, 3, 13 * scale, 17 * scale)
    assert relative_error(ours, reference_srvgg(sd, x, scale)) <= TOLERANCE


def test_realistic_shapes_are_detected_as_released_models_declare_them():
    with torch.device("meta"):
        x4plus = rrdbnet.build(rrdbnet.RRDBConfig(3, 3, 64, 23, 32, 2, 1)).state_dict()
        x2plus = rrdbnet.build(rrdbnet.RRDBConfig(3, 3, 64, 23, 32, 2, 2)).state_dict()
        general = srvgg.build(srvgg.SRVGGConfig(3, 3, 64, 32, 4)).state_dict()
    assert x2plus["conv_first.weight"].shape[1] == 12  # Real-ESRGAN x2plus: RGB unshuffled by 2
    assert rrdbnet.detect(x4plus) == rrdbnet.RRDBConfig(3, 3, 64, 23, 32, 2, 1)
    assert rrdbnet.detect(x2plus).scale == 2
    assert srvgg.detect(general) == srvgg.SRVGGConfig(3, 3, 64, 32, 4)  # realesr-general-x4v3
    assert rrdbnet.detect(general) is None and srvgg.detect(x4plus) is None
    assert [a.ARCH_NAME for a in ARCHITECTURES][:2] == [rrdbnet.ARCH_NAME, srvgg.ARCH_NAME]


# --- files: wrappers and bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["params_ema", "params", "module.", "state_dict"])
def test_wrapped_files_load(tmp_path, wrap):
    sd = random_upscaler_state("srvgg", 4, seed=1)
    if wrap == "module.":
        payload = {f"module.{k}": v for k, v in sd.items()}
    else:
        payload = {wrap: sd, "iter": 5} if wrap != "params_ema" else {"params": {}, "params_ema": sd}
    torch.save(payload, tmp_path / "m.pth")
    module, _, _ = load_upscaler(tmp_path / "m.pth", dtype=torch.float32)
    assert torch.equal(module.body[0].weight, sd["body.0.weight"])


def test_a_stable_diffusion_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "sd1.safetensors"
    write_random_checkpoint(path, "sd1", seed=0)
    with pytest.raises(CheckpointError, match=r"sd1\.safetensors: this is a Stable Diffusion checkpoint"):
        load_upscaler(path)


def test_unknown_keys_are_refused_listing_what_was_found(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: not an upscale model.*'decoder\.bias'.*prefixes"):
        load_upscaler(tmp_path / "other.pth")


def test_truncated_and_code_carrying_files_are_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    write_random_upscale_model(good, "rrdbnet", 4)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_upscaler(tmp_path / "cut.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv_first.weight": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: this pickle needs code"):
        load_upscaler(tmp_path / "evil.pth")


def test_a_variant_the_loader_cannot_build_is_named(tmp_path):
    sd = random_upscaler_state("rrdbnet", 4)
    sd["conv_first.weight"] = torch.zeros(8, 5, 3, 3)  # 5 input channels for 3 output: no unshuffle fits
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth: looks like ESRGAN \(RRDBNet\).*5 channels"):
        load_upscaler(tmp_path / "odd.pth")
    sd = random_upscaler_state("srvgg", 4)
    sd["body.6.weight"] = torch.zeros(20, 8, 3, 3)
    sd["body.6.bias"] = torch.zeros(20)
    with pytest.raises(CheckpointError, match=r"not 3 channels times a square scale"):
        detect_architecture(sd, "compact.pth")


def test_wrong_shapes_for_the_detected_architecture_are_named(tmp_path):
    sd = random_upscaler_state("rrdbnet", 4)
    sd["conv_hr.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: .*conv_hr\.weight: file \[8, 8, 1, 1\]"):
        load_upscaler(tmp_path / "bad.pth")


# --- the handle: tiles, sizes, channels, memory --------------------------------------------------------------


@pytest.fixture(scope="module")
def handles(tmp_path_factory, manager) -> dict[str, UpscaleModel]:
    root = tmp_path_factory.mktemp("upscalers")
    out = {}
    for name, arch, scale in (("rrdb4", "rrdbnet", 4), ("rrdb2", "rrdbnet", 2), ("compact4", "srvgg", 4)):
        write_random_upscale_model(root / f"{name}.safetensors", arch, scale, seed=len(name))
        out[name] = load_upscale_model(root / f"{name}.safetensors", manager, dtype=torch.float32)
    return out


@pytest.mark.parametrize("name", ["rrdb4", "rrdb2", "compact4"])
def test_tiled_equals_untiled_on_a_photograph_like_image(handles, name):
    model = handles[name]
    image = photo(1, 80, 112)
    whole = model.upscale(image, tile=1024)
    tiled = model.upscale(image, tile=64, overlap=32)  # 2 × 3 tiles, ComfyUI's overlap
    assert tiled.shape == whole.shape == (1, 80 * model.scale, 112 * model.scale, 3)
    inside = ((whole > 0) & (whole < 1)).float().mean()
    assert inside > 0.75  # differences are not hidden by clamping
    error = (tiled - whole).abs()
    assert error.max() < 2e-3 and error.mean() < 1e-4
    # what the tolerance would have caught: the same image one output pixel off, or tiles met without trimming
    shifted = (torch.roll(whole, 1, 2) - whole).abs().mean()
    assert shifted > 50 * 1e-4


def test_untrimmed_blending_leaves_the_seams_the_trim_removes(handles, monkeypatch):
    """The tolerance above is meaningful: the same tiles blended with plain ramps (no trim) differ visibly."""
    import diffusion.checkpoints.upscale_models as module

    model = handles["rrdb4"]
    image = photo(1, 80, 112)
    whole = model.upscale(image, tile=1024)
    plain = module.tiled_apply

    def untrimmed(*args, **kwargs):
        kwargs["trim"] = 0
        return plain(*args, **kwargs)

    monkeypatch.setattr(module, "tiled_apply", untrimmed)
    assert (model.upscale(image, tile=64, overlap=32) - whole).abs().max() > 1e-2


def test_batches_equal_single_images_and_values_are_clamped(handles):
    model = handles["compact4"]
    images = photo(3, 20, 24, seed=5)
    images[1] = 1.0  # white + a positive residual overshoots 1 before clamping
    batch = model.upscale(images)
    assert batch.shape == (3, 80, 96, 3) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1 and (batch == 1).any()
    for i in range(3):
        assert torch.allclose(batch[i:i + 1], model.upscale(images[i:i + 1]), atol=1e-6)


def test_alpha_and_grey_images(handles):
    model = handles["rrdb4"]
    rgb = photo(1, 16, 20)
    alpha = torch.linspace(0, 1, 20).expand(1, 16, 20)[..., None]
    rgba = model.upscale(torch.cat([rgb, alpha], -1))
    assert rgba.shape == (1, 64, 80, 4)
    assert torch.allclose(rgba[..., :3], model.upscale(rgb), atol=1e-6)
    expected_alpha = F.interpolate(alpha.movedim(-1, 1), scale_factor=4, mode="bicubic").clamp(0, 1)
    assert torch.allclose(rgba[..., 3], expected_alpha[:, 0], atol=1e-6)
    grey = rgb.mean(-1, keepdim=True)
    out = model.upscale(grey)
    assert out.shape == (1, 64, 80, 1)
    assert torch.allclose(out, model.upscale(grey.expand(-1, -1, -1, 3)).mean(-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="the image has 2 channels; this ESRGAN \\(RRDBNet\\) model takes 3"):
        model.upscale(torch.zeros(1, 8, 8, 2))


def test_out_of_memory_halves_the_tile_until_it_fits_then_gives_up(handles, monkeypatch):
    model = handles["compact4"]
    image = photo(1, 40, 40)
    expected = model.upscale(image, tile=20, overlap=8)
    module = model.patcher.model
    forward = module.forward
    seen = []

    def limited(x):
        seen.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > 20:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    monkeypatch.setattr(module, "forward", limited)
    out = model.upscale(image, tile=80, overlap=8, min_tile=16)
    assert seen[0] == 40 and max(seen[-4:]) == 20  # 80 → 40 failed → 20 ran
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.upscale(image, tile=80, overlap=8, min_tile=32)


def test_progress_counts_tiles(handles):
    calls = []
    handles["rrdb2"].upscale(photo(2, 40, 60), tile=32, overlap=8, progress=lambda done, total: calls.append((done,
                                                                                                           total)))
    assert calls == [(i, 12) for i in range(1, 13)]  # 2 × 3 tiles per image, two images


def test_activation_estimates_grow_with_the_tile_and_cover_the_full_size_maps():
    config = rrdbnet.RRDBConfig(3, 3, 64, 23, 32)
    small, large = (rrdbnet.activation_elements(config, s, s) for s in (64, 128))
    assert large == 4 * small
    assert small >= 3 * 64 * (64 * 4) ** 2  # at least three 64-channel maps at the 256×256 output
    compact = srvgg.SRVGGConfig(3, 3, 64, 32, 4)
    assert srvgg.activation_elements(compact, 64, 64) >= 2 * 64 * 64 * 64
