"""ControlNet: parity with diffusers (residuals from both file layouts, a UNet step with residuals), file
detection and errors, and how residuals reach the UNet during sampling (chains, step ranges, strength 0,
batches, areas and masks, the uncond half, eviction, family mismatch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.controlnets.controlnet import ControlNetModel

from diffusion.checkpoints.controlnet_files import (
    CONTROL_PREFIX,
    ControlNetInfo,
    build_controlnet,
    controlnet_info,
    load_controlnet,
    random_controlnet,
    write_controlnet_file,
)
from diffusion.checkpoints.controlnet_keys import (
    diffusers_to_original,
    diffusers_to_original_controlnet_keys,
    original_to_diffusers,
)
from diffusion.checkpoints.files import CheckpointError, write_safetensors
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint, write_random_vae
from diffusion.handles import wrap_checkpoint
from diffusion.memory import ModelManager
from diffusion.models.controlnet import ControlNet, ControlNetConfig
from diffusion.models.unet import UNetConfig
from diffusion.patches.control import (
    ControlStep,
    apply_control,
    control_residuals,
    load_controlnet_handle,
    residual_patches,
    uncond_control,
)
from diffusion.patches.patcher import ModelPatcher
from diffusion.preprocessors import canny, hysteresis
from diffusion.sampling.context_windows import active_window
from tests.diffusion.random_weights import randomize_, relative_error
from tests.diffusion.test_unet import TINY, adm_inputs, diffusers_config, tiny_pair

TOLERANCE = 1e-4
FAMILIES = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


def diffusers_controlnet(name: str, seed: int = 0) -> ControlNetModel:
    config = diffusers_config(TINY[name])
    for key in ("up_block_types", "out_channels"):
        config.pop(key)
    return randomize_(ControlNetModel(**config), seed).eval()


def controlnet_inputs(name: str, batch: int = 2):
    cfg = TINY[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 13, 10, generator=gen)  # odd sizes: every stride-2 conv rounds up
    hint = torch.rand(batch, 3, 104, 80, generator=gen)
    t = torch.tensor([17.0, 801.5])[:batch]
    context = torch.randn(batch, 5, cfg.context_dim, generator=gen)
    y, added = adm_inputs(name, batch)
    return x, hint, t, context, y, added


def heads_metadata(name: str) -> dict[str, str]:
    import json

    c = TINY[name]
    heads = {"num_heads": c.num_heads} if c.num_heads > 0 else {"num_head_channels": c.num_head_channels}
    return {"latentloom.config": json.dumps({"family": name, "unet": {**heads, "norm_groups": c.norm_groups}})}


def write_tensors(path, sd, metadata=None) -> None:
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, lambda k: sd[k].contiguous(),
                      metadata)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_residuals_match_diffusers_from_both_layouts(tmp_path, name: str, layout: str) -> None:
    theirs = diffusers_controlnet(name)
    sd = theirs.state_dict()
    if layout == "original":  # converted with our key map, under the original release's prefix
        sd = {CONTROL_PREFIX + k: v for k, v in diffusers_to_original(sd).items()}
    path = tmp_path / f"{name}-{layout}.safetensors"
    write_tensors(path, sd, heads_metadata(name))
    ours, info = load_controlnet(path, dtype=torch.float32)
    assert (info.family, info.layout, info.diff) == (FAMILIES[name], layout, False)
    x, hint, t, context, y, added = controlnet_inputs(name)
    down, mid = theirs(x, t, context, hint, added_cond_kwargs=added, return_dict=False)
    residuals = ours(x, hint, t, context, y)
    assert len(residuals) == len(down) + 1
    for mine, reference in zip(residuals, [*down, mid], strict=True):
        assert mine.shape == reference.shape
        assert relative_error(mine, reference) < TOLERANCE


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_unet_step_with_residuals_matches_diffusers(name: str) -> None:
    """Our UNet with our ControlNet's residuals through the UNet patches equals diffusers' UNet given diffusers'
    residuals (down_block_additional_residuals / mid_block_additional_residual)."""
    unet, their_unet = tiny_pair(name)
    theirs = diffusers_controlnet(name, seed=3)
    ours = ControlNet(ControlNetConfig(TINY[name])).eval()
    ours.load_state_dict(diffusers_to_original(theirs.state_dict()), strict=True)
    x, hint, t, context, y, added = controlnet_inputs(name)
    scale = 0.7
    down, mid = theirs(x, t, context, hint, conditioning_scale=scale, added_cond_kwargs=added, return_dict=False)
    reference = their_unet(x, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
    residuals = [r * scale for r in ours(x, hint, t, context, y)]
    out = unet(x, t, context, y, patches=residual_patches(residuals))
    assert relative_error(out, reference) < TOLERANCE
    assert relative_error(unet(x, t, context, y), reference) > 1e-2  # the residuals matter


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_key_maps_cover_every_parameter_both_ways(name: str) -> None:
    config = ControlNetConfig(TINY[name])
    theirs = diffusers_controlnet(name).state_dict()
    mapping = diffusers_to_original_controlnet_keys(config)
    assert set(mapping) == set(theirs)
    ours = diffusers_to_original(theirs)
    assert set(ours) == set(ControlNet(config).state_dict())
    assert set(original_to_diffusers(ours, config)) == set(theirs)


@pytest.mark.parametrize(("factory", "family", "heads"), [
    (UNetConfig.sd1, "sd1", (8, -1)), (UNetConfig.sd2, "sd2", (-1, 64)), (UNetConfig.sdxl, "sdxl", (-1, 64)),
])
def test_real_size_keys_shapes_and_family(factory, family: str, heads: tuple[int, int]) -> None:
    """At real size (on meta): diffusers' ControlNetModel renamed by our key map has exactly our keys and shapes,
    and the family and head layout are read back from the keys."""
    config = ControlNetConfig(factory())
    dcfg = diffusers_config(config.unet)
    for key in ("up_block_types", "out_channels"):
        dcfg.pop(key)
    with torch.device("meta"):
        ours = ControlNet(config).state_dict()
        theirs = diffusers_to_original(ControlNetModel(**dcfg).state_dict())
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    info = controlnet_info(ours, "original", False)
    assert info.family == family
    assert info.config == config
    assert (info.config.unet.num_heads, info.config.unet.num_head_channels) == heads


class Evil:
    """A pickle that would create a file when loaded unsafely."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_with_prefix_loads_through_the_safe_reader(tmp_path) -> None:
    """A `.pth` in the release's layout (control_model. prefix, no metadata: heads from the family default)."""
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), context_dim=768,
                      num_heads=8, norm_groups=32, num_res_blocks=1)  # the real models' heads and groups
    sd, info = random_controlnet("sd1", unet=unet)
    path = tmp_path / "control_sd15_tiny.pth"
    torch.save({"state_dict": {CONTROL_PREFIX + k: v for k, v in sd.items()}}, path)
    net, read = load_controlnet(path)
    assert read.family == "sd1" and read.config == info.config and read.layout == "original"
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    evil, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"state_dict": {CONTROL_PREFIX + k: v for k, v in sd.items()}, "x": Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_controlnet(evil)
    assert not marker.exists()


def test_files_that_are_not_controlnets_say_what_they_are(tmp_path) -> None:
    write_random_checkpoint(tmp_path / "ckpt.safetensors", "sd1")
    write_random_vae(tmp_path / "vae.safetensors", prefix=False)
    write_tensors(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 2)})
    for name, words in (("ckpt", "full Stable Diffusion checkpoint"), ("vae", "a VAE"), ("lora", "a LoRA")):
        with pytest.raises(CheckpointError, match="not a ControlNet") as caught:
            load_controlnet(tmp_path / f"{name}.safetensors")
        assert words in str(caught.value) and "found" in str(caught.value)


def test_diff_controlnet_adds_the_base_weights(tmp_path) -> None:
    full, info = random_controlnet("sd1", seed=1)
    base_sd, _ = random_controlnet("sd1", seed=2)  # stands in for the base UNet's encoder weights
    shared = [k for k in full if k.startswith(("input_blocks.", "middle_block.", "time_embed."))]
    diff = {k: full[k] - base_sd[k] if k in shared else full[k] for k in full}
    path = tmp_path / "diff.safetensors"
    write_controlnet_file(path, diff, info, prefix=True, diff=True)
    with pytest.raises(CheckpointError, match="DiffControlNetLoader"):
        load_controlnet(path)
    net, read = load_controlnet(path, base=lambda key: base_sd.get(key) if key in shared else None)
    assert read.diff
    for key, value in full.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=1e-6)


# --- sampling --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("cn") / "sd1.safetensors"
    write_random_checkpoint(path, "sd1", seed=5)
    manager = ModelManager("cpu")
    return wrap_checkpoint(load_checkpoint(path, dtype=torch.float32), manager)[0]


def handle(model, seed: int = 0, family: str = "sd1"):
    sd, info = random_controlnet(family, seed=seed)
    return load_controlnet_handle(build_controlnet(sd, info, dtype=torch.float32), info, model.manager, f"cn{seed}")


def conditioning(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 77, model.family.unet.context_dim, generator=gen), {})]


def hint_image(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 40, 48, 3, generator=torch.Generator().manual_seed(seed))


def denoise(model, positive, negative=None, batch: int = 1, cfg: float = 1.0, sigma: float = 2.0):
    x = torch.randn(batch, 4, 5, 6, generator=torch.Generator().manual_seed(9))
    with model.denoiser() as d, torch.no_grad():
        return model.guider(d, positive, negative or [], cfg)(x, torch.tensor([sigma]))


def test_strength_zero_and_outside_the_step_range_change_nothing_bit_for_bit(sd1) -> None:
    cn, pos = handle(sd1), conditioning(sd1)
    plain = denoise(sd1, pos)
    assert torch.equal(denoise(sd1, apply_control(pos, ControlStep(cn, hint_image(), 0.0))), plain)
    late = ControlStep(cn, hint_image(), 1.0, start_percent=0.6, end_percent=1.0)  # sigma 2 is early: not yet
    assert torch.equal(denoise(sd1, apply_control(pos, late)), plain)
    assert not torch.allclose(denoise(sd1, apply_control(pos, late), sigma=0.1), denoise(sd1, pos, sigma=0.1))
    active = denoise(sd1, apply_control(pos, ControlStep(cn, hint_image(), 1.0)))
    assert (active - plain).abs().max() > 1e-3


def test_two_controlnets_chain_their_residuals_add(sd1) -> None:
    a = ControlStep(handle(sd1, 1), hint_image(seed=1), 0.8)
    b = ControlStep(handle(sd1, 2), hint_image(seed=2), 1.3)
    chained = apply_control(apply_control(conditioning(sd1), a), b)
    assert chained[0][1]["control"] == (a, b)
    x = torch.randn(1, 4, 5, 6)
    t, ctx, sigma = torch.tensor([500.0]), chained[0][0], torch.tensor([3.0])
    both = control_residuals([((a, b), 1)], x, t, ctx, None, sigma, sd1.model_sampling)
    one = control_residuals([((a,), 1)], x, t, ctx, None, sigma, sd1.model_sampling)
    two = control_residuals([((b,), 1)], x, t, ctx, None, sigma, sd1.model_sampling)
    half = control_residuals([((dataclasses.replace(a, strength=0.4),), 1)], x, t, ctx, None, sigma,
                             sd1.model_sampling)
    for r, p, q, h in zip(both, one, two, half, strict=True):
        torch.testing.assert_close(r, p + q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h, p / 2, rtol=1e-5, atol=1e-6)  # strength scales the residuals
    assert not torch.allclose(denoise(sd1, chained), denoise(sd1, apply_control(conditioning(sd1), a)))


def test_batch_rows_get_their_own_hint_and_a_wrong_batch_is_refused(sd1) -> None:
    cn = handle(sd1)
    hints = hint_image(batch=2, seed=4)
    both = denoise(sd1, apply_control(conditioning(sd1), ControlStep(cn, hints, 1.0)), batch=2)
    for i in range(2):
        alone = denoise(sd1, apply_control(conditioning(sd1), ControlStep(cn, hints[i:i + 1], 1.0)), batch=2)
        torch.testing.assert_close(both[i], alone[i], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="hint image batch is 3 but the latent batch is 2"):
        denoise(sd1, apply_control(conditioning(sd1), ControlStep(cn, hint_image(batch=3), 1.0)), batch=2)


def test_control_follows_the_conditioning_in_one_batched_call(sd1) -> None:
    """Positive with a ControlNet, negative without: one UNet call, the negative's rows untouched; the old node's
    marking gives the chain to the uncond half as ComfyUI does."""
    cn = handle(sd1)
    pos, neg = conditioning(sd1, 1), conditioning(sd1, 2)
    step = ControlStep(cn, hint_image(), 1.0)
    calls = []
    original = cn.patcher.model.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    cn.patcher.model.forward = counting
    try:
        x = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(9))
        with sd1.denoiser() as d, torch.no_grad():
            plain = sd1.guider(d, pos, neg, 1.0)._predict([pos, neg], x, torch.tensor([2.0]))
            guided = sd1.guider(d, apply_control(pos, step), neg, 1.0)._predict(
                [apply_control(pos, step), neg], x, torch.tensor([2.0]))
            both = sd1.guider(d, apply_control(pos, step), apply_control(neg, step), 1.0)._predict(
                [apply_control(pos, step), apply_control(neg, step)], x, torch.tensor([2.0]))
    finally:
        del cn.patcher.model.forward
    assert calls == [1, 2]  # the positive's row alone, then both rows of the shared step in one call
    assert torch.equal(guided[1], plain[1]) and not torch.allclose(guided[0], plain[0])
    torch.testing.assert_close(both[0], guided[0], rtol=1e-4, atol=1e-5)  # batch of 2 vs 1: kernels may differ
    assert uncond_control(apply_control(pos, step), neg)[0][1].get("control") is None
    filled = uncond_control(apply_control(pos, step, to_uncond=True), neg)
    assert filled[0][1]["control"] == (step,) and neg[0][1] == {}


def test_area_and_mask_conditioning_with_a_controlnet(sd1) -> None:
    cn, pos = handle(sd1), conditioning(sd1)
    step = ControlStep(cn, hint_image(), 1.0)
    area = [(pos[0][0], {"area": (3, 4, 1, 2)})]
    mask = torch.zeros(5, 6)
    mask[:, :3] = 1
    masked = [(pos[0][0], {"mask": mask})]
    for cond in (area, masked):
        with_cn = denoise(sd1, apply_control(cond, step) + conditioning(sd1, 3))
        without = denoise(sd1, cond + conditioning(sd1, 3))
        assert with_cn.shape == without.shape and torch.isfinite(with_cn).all()
        assert (with_cn - without).abs().max() > 1e-4
    assert (3 * 8, 4 * 8) in {k[:2] for k in step._resized}  # the hint fitted to the area's size x 8


def test_sd1_controlnet_on_an_sdxl_model_names_both_families(sd1, tmp_path) -> None:
    path = tmp_path / "sdxl.safetensors"
    write_random_checkpoint(path, "sdxl", seed=1)
    sdxl, _, _ = wrap_checkpoint(load_checkpoint(path, dtype=torch.float32), ModelManager("cpu"))
    cond = [(torch.randn(1, 77, sdxl.family.unet.context_dim), {"pooled_output": torch.randn(1, 16)})]
    with pytest.raises(ValueError, match=r"SD1\.x ControlNet and the model is SDXL base"):
        denoise(sdxl, apply_control(cond, ControlStep(handle(sd1), hint_image(), 1.0)))


def test_the_model_manager_evicts_and_reloads_a_controlnet(sd1) -> None:
    unet_bytes = sd1.patcher.model_nbytes()
    manager = ModelManager("cpu", "cpu", budget_bytes=10 * unet_bytes)
    model = dataclasses.replace(sd1, manager=manager)
    cn = handle(model)
    pos = apply_control(conditioning(model), ControlStep(cn, hint_image(), 1.0))
    first = denoise(model, pos)
    assert cn.patcher.name in [name for name, _ in manager.loaded()]
    big = ModelPatcher(torch.nn.Linear(1, 1), "cpu", name="big")
    manager.budget_bytes = unet_bytes + cn.patcher.model_nbytes() + 8
    big.model_nbytes = lambda: manager.budget_bytes - 8  # needs all the room: both are evicted
    with manager.use([big]):
        assert cn.patcher.name not in [name for name, _ in manager.loaded()]
    manager.budget_bytes = 10 * unet_bytes
    torch.testing.assert_close(denoise(model, pos), first, rtol=0, atol=0)


def test_applying_shares_the_controlnet_and_the_hint(sd1) -> None:
    cn, hint = handle(sd1), hint_image()
    step = ControlStep(cn, hint, 1.0)
    out = apply_control(conditioning(sd1) + conditioning(sd1, 1), step)
    assert all(opts["control"][0] is step for _, opts in out)
    assert step.hint.data_ptr() == hint.data_ptr()
    info = ControlNetInfo("sd1", "original", False, cn.info.config)
    assert info.title == "SD1.x"


# --- Canny ---------------------------------------------------------------------------------------------------


def grow_rings(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Hysteresis the slow, obvious way: grow the strong pixels one ring at a time through weak ones."""
    edges = strong & weak
    while True:
        grown = (torch.nn.functional.max_pool2d(edges.float(), 3, 1, 1) > 0) & weak
        if torch.equal(grown, edges):
            return edges
        edges = grown


def test_hysteresis_labelling_equals_growing_rings() -> None:
    gen = torch.Generator().manual_seed(0)
    for density in (0.3, 0.5, 0.7):
        weak = torch.rand(2, 1, 37, 41, generator=gen) < density
        strong = torch.rand(2, 1, 37, 41, generator=gen) < 0.02
        assert torch.equal(hysteresis(strong, weak), grow_rings(strong, weak))


def test_canny_keeps_a_faint_edge_connected_to_a_strong_one() -> None:
    image = torch.zeros(1, 96, 64, 3)
    image[0, :, 32:] = torch.linspace(1.0, 0.2, 96)[:, None, None]  # one edge, strong at the top, faint below
    edges = canny(image, 0.4, 0.8)[0, ..., 0] > 0
    assert edges[:, 31].sum() + edges[:, 32].sum() >= 94  # the whole line (the ends blur), one pixel wide
    assert edges.sum(1).max() == 1
    alone = image.clone()
    alone[0, :, 32:] = 0.2  # the faint part without its strong end: below the high threshold, no edge
    assert not canny(alone, 0.4, 0.8).any()


def test_per_frame_hints_follow_a_context_window(sd1) -> None:
    """A clip of 4 frames with one hint per frame, sampled in a window of frames 1 and 3: the window's rows get
    hints 1 and 3 (AnimateDiff's context windows evaluate a few frames of the batch at a time)."""
    cn = handle(sd1)
    hints = hint_image(batch=4, seed=7)
    whole = denoise(sd1, apply_control(conditioning(sd1), ControlStep(cn, hints, 1.0)), batch=4)
    x = torch.randn(4, 4, 5, 6, generator=torch.Generator().manual_seed(9))[[1, 3]]
    with active_window([1, 3], 4), sd1.denoiser() as d, torch.no_grad():
        windowed = sd1.guider(d, apply_control(conditioning(sd1), ControlStep(cn, hints, 1.0)), [], 1.0)(
            x, torch.tensor([2.0]))
    torch.testing.assert_close(windowed, whole[[1, 3]], rtol=1e-4, atol=1e-5)
