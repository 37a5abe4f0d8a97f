"""T2I-Adapter: parity with diffusers' T2IAdapter (full, light, full_xl) from both file layouts, detection of
variant, hint channels and family, bad files; a UNet step with adapter features against diffusers'
`down_intrablock_additional_residuals`; and how the features reach the UNet while sampling (computed once per hint,
strength 0 and step ranges, batches, chaining with a ControlNet, family mismatch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.adapter import T2IAdapter as DiffusersAdapter

from diffusion.checkpoints.files import CheckpointError, write_safetensors
from diffusion.checkpoints.t2i_adapter_files import (
    build_t2i_adapter,
    config_for_unet,
    load_t2i_adapter,
    random_t2i_adapter,
    write_random_t2i_adapter,
)
from diffusion.checkpoints.t2i_adapter_keys import diffusers_to_original, original_to_diffusers
from diffusion.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from tests.diffusion.random_weights import randomize_, relative_error

TOLERANCE = 1e-4
# Tiny adapters of each kind diffusers builds, as diffusers' config and ours.
KINDS = {
    "full": ({"in_channels": 3, "channels": [8, 16, 16, 32], "num_res_blocks": 2, "downscale_factor": 8,
              "adapter_type": "full_adapter"}, T2IAdapterConfig("full", 3, (8, 16, 16, 32), 2, 8)),
    "full_1ch": ({"in_channels": 1, "channels": [8, 16, 32], "num_res_blocks": 3, "downscale_factor": 8,
                  "adapter_type": "full_adapter"}, T2IAdapterConfig("full", 1, (8, 16, 32), 3, 8)),
    "light": ({"in_channels": 3, "channels": [8, 16, 32], "num_res_blocks": 4, "downscale_factor": 8,
               "adapter_type": "light_adapter"}, T2IAdapterConfig("light", 3, (8, 16, 32, 32), 4, 8)),
    "full_xl": ({"in_channels": 3, "channels": [8, 16, 32, 32], "num_res_blocks": 2, "downscale_factor": 16,
                 "adapter_type": "full_adapter_xl"}, T2IAdapterConfig("full", 3, (8, 16, 32, 32), 2, 16, True)),
}


def diffusers_adapter(kind: str, seed: int = 0) -> DiffusersAdapter:
    return randomize_(DiffusersAdapter(**KINDS[kind][0]), seed).eval()


def hint_for(kind: str, batch: int = 2, height: int = 13, width: int = 10) -> torch.Tensor:
    """A hint of `height` x `width` latent pixels: odd sizes, so every average pool rounds up."""
    config = KINDS[kind][1]
    scale = config.unshuffle
    return torch.rand(batch, config.in_channels, height * scale, width * scale,
                      generator=torch.Generator().manual_seed(1))


def write_tensors(path, sd) -> None:
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, lambda k: sd[k].contiguous())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", ["original", "diffusers"])
@torch.no_grad()
def test_features_match_diffusers_from_both_layouts(tmp_path, kind: str, layout: str) -> None:
    theirs = diffusers_adapter(kind)
    path = tmp_path / "adapter.safetensors"
    if layout == "diffusers":
        write_tensors(path, theirs.state_dict())
    else:  # the original release's names, through our own key map
        write_tensors(path, diffusers_to_original(theirs.state_dict()))
    ours, info = load_t2i_adapter(path, dtype=torch.float32)
    assert info.layout == layout and info.config == KINDS[kind][1]
    assert info.family == ("sdxl" if kind == "full_xl" else "sd1")
    hint = hint_for(kind)
    reference = theirs(hint)
    features = ours(hint)
    assert len(features) == len(reference) == len(info.config.channels)
    for f, r in zip(features, reference, strict=True):
        assert f.shape == r.shape
        assert relative_error(f, r) < TOLERANCE


@pytest.mark.parametrize("kind", list(KINDS))
def test_key_maps_cover_every_parameter_both_ways(kind: str) -> None:
    theirs = DiffusersAdapter(**KINDS[kind][0]).state_dict()
    config = KINDS[kind][1]
    original = diffusers_to_original(theirs)
    assert set(original) == set(T2IAdapter(config).state_dict())
    back = original_to_diffusers(original, config)
    assert set(back) == set(theirs)
    assert all(back[k] is theirs[k] for k in theirs)


@pytest.mark.parametrize(("config", "family"), [
    (T2IAdapterConfig("full", 3, (320, 640, 1280, 1280), 2, 8), "sd1"),  # t2iadapter_depth_sd15v2 and the like
    (T2IAdapterConfig("full", 1, (320, 640, 1280, 1280), 2, 8), "sd1"),  # canny/sketch: one channel
    (T2IAdapterConfig("light", 3, (320, 640, 1280, 1280), 4, 8), "sd1"),  # t2iadapter_color_sd14v1
    (T2IAdapterConfig("full", 3, (320, 640, 1280, 1280), 2, 16, True), "sdxl"),  # t2i-adapter-*-sdxl-1.0
    (T2IAdapterConfig("full", 1, (320, 640, 1280, 1280), 2, 16, True), "sdxl"),  # canny/sketch sdxl
])
def test_real_size_files_are_detected_from_shapes(tmp_path, config: T2IAdapterConfig, family: str) -> None:
    """Real-size layouts, on meta tensors (shapes only, nothing allocated)."""
    from diffusion.checkpoints.t2i_adapter_files import T2IAdapterInfo
    from diffusion.checkpoints.t2i_adapter_keys import adapter_config, adapter_state_dict

    with torch.device("meta"):
        sd = T2IAdapter(config).state_dict()
    for stored in (sd, original_to_diffusers(sd, config)):
        ours, _ = adapter_state_dict(stored)
        assert adapter_config(ours) == config
        assert T2IAdapterInfo(config.family, "original", config).family == family
    assert config.total_downscale == (64 if family == "sd1" else 32)


def test_strided_conv_downsample_and_3x3_kernels_are_read(tmp_path) -> None:
    """Files trained with use_conv (down_opt.op) and ksize 3: detected and run as the paper's blocks compute."""
    config = T2IAdapterConfig("full", 3, (8, 16), 2, 8, ksize=3, conv_down=True)
    path = tmp_path / "conv.safetensors"
    sd = write_random_t2i_adapter(path, config, seed=3)
    net, info = load_t2i_adapter(path, dtype=torch.float32)
    assert info.config == config
    hint = torch.rand(1, 3, 32, 24)
    conv = torch.nn.functional.conv2d

    def block(x, k):
        if f"body.{k}.down_opt.op.weight" in sd:
            x = conv(x, sd[f"body.{k}.down_opt.op.weight"], sd[f"body.{k}.down_opt.op.bias"], stride=2, padding=1)
        if f"body.{k}.in_conv.weight" in sd:
            x = conv(x, sd[f"body.{k}.in_conv.weight"], sd[f"body.{k}.in_conv.bias"], padding=1)
        h = conv(x, sd[f"body.{k}.block1.weight"], sd[f"body.{k}.block1.bias"], padding=1).relu()
        return x + conv(h, sd[f"body.{k}.block2.weight"], sd[f"body.{k}.block2.bias"], padding=1)

    x = conv(torch.nn.functional.pixel_unshuffle(hint, 8), sd["conv_in.weight"], sd["conv_in.bias"], padding=1)
    expected = []
    for level in range(2):
        for j in range(2):
            x = block(x, level * 2 + j)
        expected.append(x)
    with torch.no_grad():
        for f, e in zip(net(hint), expected, strict=True):
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_files_that_are_not_adapters_are_refused(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    write_tensors(path, {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="not a T2I-Adapter"):
        load_t2i_adapter(path)
    bad = random_t2i_adapter(T2IAdapterConfig("full", 3, (8, 16), 2, 8))
    bad["conv_in.weight"] = torch.zeros(8, 100, 3, 3)  # 100 input channels: no hint/unshuffle gives that
    write_tensors(path, bad)
    with pytest.raises(CheckpointError, match="reads 100 channels"):
        load_t2i_adapter(path)
    good = random_t2i_adapter(T2IAdapterConfig("full", 3, (8, 16), 2, 8))
    del good["body.3.block2.bias"]
    write_tensors(path, good)
    with pytest.raises(CheckpointError, match="missing"):
        load_t2i_adapter(path)


def test_pickled_adapter_wrapped_under_adapter_loads_safely(tmp_path) -> None:
    config = T2IAdapterConfig("light", 3, (8, 16), 2, 8)
    sd = random_t2i_adapter(config, seed=2)
    path = tmp_path / "t2iadapter_color_sd14v1.pth"
    torch.save({"adapter": sd, "step": 3}, path)
    net, info = load_t2i_adapter(path, dtype=torch.float32)
    assert info.config == config and info.layout == "original"
    assert [tuple(f.shape) for f in net(torch.rand(1, 3, 16, 16))] == [(1, 8, 2, 2), (1, 16, 1, 1)]
    torch.save({"adapter": sd, "evil": torch.nn.ReLU()}, path)  # needs code to unpickle: refused
    with pytest.raises(CheckpointError, match="refused"):
        load_t2i_adapter(path)


def test_config_for_unet_and_build_from_weights() -> None:
    config = config_for_unet(16, (1, 2, 2), xl=True)
    assert config.channels == (16, 32, 32, 32) and config.xl and config.unshuffle == 16
    sd = random_t2i_adapter(config)
    from diffusion.checkpoints.t2i_adapter_files import T2IAdapterInfo

    net = build_t2i_adapter(sd, T2IAdapterInfo("sdxl", "original", config), dtype=torch.float32)
    out = net(torch.rand(1, 3, 64, 48))
    assert [tuple(f.shape) for f in out] == [(1, 16, 4, 3), (1, 32, 4, 3), (1, 32, 2, 2), (1, 32, 2, 2)]


# --- the UNet with adapter features ------------------------------------------------------------------------


def adapter_for(unet_config, xl: bool, seed: int = 0, variant: str = "full") -> DiffusersAdapter:
    """Diffusers' adapter whose features fit a tiny UNet (SDXL: its three levels and the middle)."""
    widths = [unet_config.model_channels * m for m in unet_config.channel_mult]
    if variant == "light":
        return randomize_(DiffusersAdapter(3, widths[:-1], 4, 8, "light_adapter"), seed).eval()
    if xl:
        return randomize_(DiffusersAdapter(3, [*widths, widths[-1]], 2, 16, "full_adapter_xl"), seed).eval()
    return randomize_(DiffusersAdapter(3, widths, 2, 8, "full_adapter"), seed).eval()


@pytest.mark.parametrize(("name", "variant"), [("sd1", "full"), ("sd1", "light"), ("sdxl", "full")])
@torch.no_grad()
def test_unet_step_with_adapter_features_matches_diffusers(name: str, variant: str) -> None:
    from diffusion.patches.t2i_adapter_control import intrablock_patches, intrablock_sites
    from tests.diffusion.test_unet import TINY, adm_inputs, tiny_pair

    ours, theirs = tiny_pair(name)
    cfg = TINY[name]
    xl = name == "sdxl"
    adapter = adapter_for(cfg, xl, variant=variant)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 13, 10, generator=gen)  # odd: every downsample rounds up
    hint = torch.rand(2, 3, 112 if xl else 104, 80, generator=gen)  # SDXL: rounded up to 16 as the apply path does
    features = adapter(hint)
    t = torch.tensor([17.0, 801.5])
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    y, added = adm_inputs(name, 2)
    reference = theirs(x, t, context, added_cond_kwargs=added,
                       down_intrablock_additional_residuals=[f.clone() for f in features]).sample
    sites = intrablock_sites([f.shape[1] for f in features], cfg)
    assert sites == ([3, 5, 8, "middle"] if xl else [2, 5, 8])
    out = ours(x, t, context, y, patches=intrablock_patches(dict(zip(sites, features, strict=True))))
    plain = ours(x, t, context, y)
    assert relative_error(out, reference) < TOLERANCE
    assert relative_error(plain, reference) > 100 * TOLERANCE  # the features matter


def test_sites_of_the_real_unets() -> None:
    from diffusion.models.unet import UNetConfig
    from diffusion.patches.t2i_adapter_control import intrablock_sites

    assert intrablock_sites([320, 640, 1280, 1280], UNetConfig.sd1()) == [2, 5, 8, 11]
    assert intrablock_sites([320, 640, 1280, 1280], UNetConfig.sdxl()) == [3, 5, 8, "middle"]
    with pytest.raises(ValueError, match="do not fit"):
        intrablock_sites([320, 640, 1280, 1280], UNetConfig.sdxl_refiner())


# --- sampling ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusion.checkpoints.loader import load_checkpoint
    from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
    from diffusion.handles import wrap_checkpoint
    from diffusion.memory import ModelManager

    manager = ModelManager("cpu")
    out = {}
    for family in ("sd1", "sdxl"):
        path = tmp_path_factory.mktemp("t2i") / f"{family}.safetensors"
        write_random_checkpoint(path, family, seed=5)
        out[family] = wrap_checkpoint(load_checkpoint(path, dtype=torch.float32), manager)[0]
    return out


def adapter_handle(model, seed: int = 0, variant: str = "full", in_channels: int = 3):
    from diffusion.checkpoints.t2i_adapter_files import T2IAdapterInfo
    from diffusion.patches.t2i_adapter_control import load_t2i_adapter_handle

    unet = model.family.unet
    xl = model.family.name == "sdxl"
    config = config_for_unet(unet.model_channels, unet.channel_mult, xl=xl, variant=variant, in_channels=in_channels)
    info = T2IAdapterInfo(config.family, "original", config)
    net = build_t2i_adapter(random_t2i_adapter(config, seed=seed), info, dtype=torch.float32)
    return load_t2i_adapter_handle(net, info, model.manager, f"adapter{seed}")


def counting(handle) -> list:
    """Records the hint of every adapter run."""
    calls = []
    handle.patcher.model.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    return calls


def conditioning(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cond = [(torch.randn(1, 77, model.family.unet.context_dim, generator=gen), {})]
    if model.family.name == "sdxl":
        cond[0][1]["pooled_output"] = torch.randn(1, 16, generator=gen)
    return cond


def hint_image(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 40, 48, 3, generator=torch.Generator().manual_seed(seed))


def denoise(model, positive, negative=None, batch: int = 1, cfg: float = 1.0, sigma: float = 2.0,
            size: tuple[int, int] = (5, 6)):
    x = torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(9))
    with model.denoiser() as d, torch.no_grad():
        return model.guider(d, positive, negative or [], cfg)(x, torch.tensor([sigma]))


def test_strength_zero_and_outside_the_step_range_change_nothing_bit_for_bit(models) -> None:
    from diffusion.patches.control import ControlStep, apply_control

    sd1 = models["sd1"]
    adapter, pos = adapter_handle(sd1), conditioning(sd1)
    plain = denoise(sd1, pos)
    assert torch.equal(denoise(sd1, apply_control(pos, ControlStep(adapter, hint_image(), 0.0))), plain)
    late = ControlStep(adapter, hint_image(), 1.0, start_percent=0.6, end_percent=1.0)  # sigma 2 is early
    assert torch.equal(denoise(sd1, apply_control(pos, late)), plain)
    assert not torch.allclose(denoise(sd1, apply_control(pos, late), sigma=0.1), denoise(sd1, pos, sigma=0.1))
    active = denoise(sd1, apply_control(pos, ControlStep(adapter, hint_image(), 1.0)))
    assert (active - plain).abs().max() > 1e-3


def test_features_are_computed_once_per_hint_and_size(models) -> None:
    from diffusion.patches.control import ControlStep, apply_control

    sd1 = models["sd1"]
    adapter = adapter_handle(sd1)
    calls = counting(adapter)
    step = ControlStep(adapter, hint_image(), 1.0)
    pos, neg = apply_control(conditioning(sd1), step), apply_control(conditioning(sd1, 1), step)
    first = denoise(sd1, pos, neg, cfg=4.0, sigma=3.0)
    for sigma in (2.0, 1.0, 0.5):  # the steps of a sampling run, both CFG halves each time
        denoise(sd1, pos, neg, cfg=4.0, sigma=sigma)
    assert len(calls) == 1 and tuple(calls[0].shape) == (1, 3, 40, 48)  # latent 5x6, x 8
    torch.testing.assert_close(denoise(sd1, pos, neg, cfg=4.0, sigma=3.0), first, rtol=0, atol=0)
    denoise(sd1, pos, neg, cfg=4.0, size=(6, 6))  # another latent size: computed for it once
    assert len(calls) == 2 and tuple(calls[1].shape) == (1, 3, 48, 48)


def test_one_channel_adapters_get_the_mean_and_sdxl_hints_round_up_to_16(models) -> None:
    from diffusion.patches.control import ControlStep, _fit, apply_control

    sd1, sdxl = models["sd1"], models["sdxl"]
    adapter = adapter_handle(sd1, in_channels=1)
    calls = counting(adapter)
    image = hint_image()
    denoise(sd1, apply_control(conditioning(sd1), ControlStep(adapter, image, 1.0)))
    expected = _fit(image.movedim(-1, 1), 40, 48).mean(1, keepdim=True)
    torch.testing.assert_close(calls[0], expected)
    xl = adapter_handle(sdxl)
    calls = counting(xl)
    plain = denoise(sdxl, conditioning(sdxl))
    out = denoise(sdxl, apply_control(conditioning(sdxl), ControlStep(xl, image, 1.0)))  # latent 5x6: 40x48 -> 48x48
    assert tuple(calls[0].shape) == (1, 3, 48, 48) and (out - plain).abs().max() > 1e-3


def test_batch_rows_get_their_own_hint_and_a_wrong_batch_is_refused(models) -> None:
    from diffusion.patches.control import ControlStep, apply_control

    sd1 = models["sd1"]
    adapter = adapter_handle(sd1)
    hints = hint_image(batch=2)
    both = denoise(sd1, apply_control(conditioning(sd1), ControlStep(adapter, hints, 1.0)), batch=2)
    for i in range(2):
        alone = denoise(sd1, apply_control(conditioning(sd1), ControlStep(adapter, hints[i:i + 1], 1.0)), batch=2)
        torch.testing.assert_close(both[i], alone[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    with pytest.raises(ValueError, match="hint image batch is 3 but the latent batch is 2"):
        denoise(sd1, apply_control(conditioning(sd1), ControlStep(adapter, hint_image(batch=3), 1.0)), batch=2)


def test_rows_without_the_adapter_get_nothing_and_it_chains_with_a_controlnet(models) -> None:
    from diffusion.checkpoints.controlnet_files import build_controlnet, random_controlnet
    from diffusion.patches.control import ControlStep, control_residuals, load_controlnet_handle

    sd1 = models["sd1"]
    fits = sd1._check_control
    adapter = ControlStep(adapter_handle(sd1), hint_image(), 0.7)
    sd, info = random_controlnet("sd1", seed=1)
    cn = load_controlnet_handle(build_controlnet(sd, info, dtype=torch.float32), info, sd1.manager, "cn")
    controlnet = ControlStep(cn, hint_image(seed=1), 1.2)
    x = torch.randn(2, 4, 5, 6)
    t, ctx, sigma = torch.tensor([500.0]), torch.randn(2, 77, 16), torch.tensor([3.0])
    ms = sd1.model_sampling
    only = control_residuals([((adapter,), 1), (None, 1)], x, t, ctx, None, sigma, ms, fits)
    assert list(only) == [] and set(only.intrablock) == {2, 5, 8, 11}
    for r in only.intrablock.values():
        assert r[0].abs().max() > 0 and torch.equal(r[1], torch.zeros_like(r[1]))
    both = control_residuals([((controlnet, adapter), 2)], x, t, ctx, None, sigma, ms, fits)
    alone_cn = control_residuals([((controlnet,), 2)], x, t, ctx, None, sigma, ms, fits)
    alone_ad = control_residuals([((adapter,), 2)], x, t, ctx, None, sigma, ms, fits)
    assert len(both) == len(alone_cn) and all(torch.equal(a, b) for a, b in zip(both, alone_cn, strict=True))
    assert all(torch.equal(both.intrablock[k], v) for k, v in alone_ad.intrablock.items())
    two = control_residuals([((adapter, dataclasses.replace(adapter, strength=0.35)), 2)], x, t, ctx, None, sigma,
                            ms, fits)
    for k, v in alone_ad.intrablock.items():  # two adapters add up, each with its strength
        torch.testing.assert_close(two.intrablock[k], v * 1.5, rtol=1e-5, atol=1e-6)


def test_sd1_adapter_on_an_sdxl_model_names_both_families(models) -> None:
    from diffusion.patches.control import ControlStep, apply_control

    sd1_adapter = adapter_handle(models["sd1"])
    cond = conditioning(models["sdxl"])
    with pytest.raises(ValueError, match=r"SD1\.x T2I-Adapter and the model is SDXL base"):
        denoise(models["sdxl"], apply_control(cond, ControlStep(sd1_adapter, hint_image(), 1.0)))
    xl_adapter = adapter_handle(models["sdxl"])
    with pytest.raises(ValueError, match=r"SDXL base T2I-Adapter and the model is SD1\.x"):
        denoise(models["sd1"], apply_control(conditioning(models["sd1"]), ControlStep(xl_adapter, hint_image(), 1.0)))


def test_area_and_mask_conditioning_with_an_adapter(models) -> None:
    from diffusion.patches.control import ControlStep, apply_control

    sd1 = models["sd1"]
    adapter = adapter_handle(sd1)
    calls = counting(adapter)
    pos = conditioning(sd1)
    step = ControlStep(adapter, hint_image(), 1.0)
    mask = torch.zeros(5, 6)
    mask[:, :3] = 1
    for cond in ([(pos[0][0], {"area": (3, 4, 1, 2)})], [(pos[0][0], {"mask": mask})]):
        steered = denoise(sd1, apply_control(cond, step) + conditioning(sd1, 3))
        plain = denoise(sd1, cond + conditioning(sd1, 3))
        assert steered.shape == plain.shape and torch.isfinite(steered).all()
        assert (steered - plain).abs().max() > 1e-4
    # the area's features from the hint fitted to the area's size x 8, the masked entry's from the full latent's
    assert [tuple(c.shape[-2:]) for c in calls] == [(24, 32), (40, 48)]


def test_the_model_manager_loads_and_evicts_the_adapter(models) -> None:
    from diffusion.memory import ModelManager
    from diffusion.patches.control import ControlStep, apply_control
    from diffusion.patches.patcher import ModelPatcher

    sd1 = models["sd1"]
    unet_bytes = sd1.patcher.model_nbytes()
    manager = ModelManager("cpu", "cpu", budget_bytes=10 * unet_bytes)
    model = dataclasses.replace(sd1, manager=manager)
    adapter = adapter_handle(model)
    pos = apply_control(conditioning(model), ControlStep(adapter, hint_image(), 1.0))
    first = denoise(model, pos)
    assert adapter.patcher.name in [name for name, _ in manager.loaded()]
    big = ModelPatcher(torch.nn.Linear(1, 1), "cpu", name="big")
    manager.budget_bytes = unet_bytes + adapter.patcher.model_nbytes() + 8
    big.model_nbytes = lambda: manager.budget_bytes - 8  # needs all the room: both are evicted
    with manager.use([big]):
        assert adapter.patcher.name not in [name for name, _ in manager.loaded()]
    manager.budget_bytes = 10 * unet_bytes
    torch.testing.assert_close(denoise(model, pos), first, rtol=0, atol=0)  # cached features: same result
