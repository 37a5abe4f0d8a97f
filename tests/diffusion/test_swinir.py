"""SwinIR upscalers: hyperparameters read from files in the official key layout, window attention against a direct
per-window per-head computation, shifted-window masks against the hand-built region mask, padding, shapes.

The state dicts here are written key by key from the official layout (including the buffers the official modules
save), not taken from our module, so a renamed attribute or a misread shape fails.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.checkpoints.files import CheckpointError, write_safetensors
from diffusion.checkpoints.upscale_models import load_upscaler
from diffusion.models import upscalers
from diffusion.models.upscalers import swinir
from diffusion.models.upscalers.swinir_blocks import SwinBlock, border_masks, relative_position_index

TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _official_index(window: int) -> torch.Tensor:
    """The relative-position index by its definition, one pair at a time."""
    n = window * window
    out = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, window), divmod(j, window)
            out[i, j] = (ri - rj + window - 1) * (2 * window - 1) + (ci - cj + window - 1)
    return out


def official_index(window: int) -> torch.Tensor:
    return _official_index(window).clone()


def region_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """[windows, N, N] for a shifted H×W image, built as the paper describes: label the nine regions the cyclic
    shift creates (rows and columns split at -window and -shift), cut the label image into windows, mask every pair
    of tokens with different labels by -100."""
    labels = torch.zeros(h, w)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        labels[rows, cols] = n
    windows = labels.view(h // window, window, w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    return torch.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0)


def official_state_dict(embed_dim=12, depths=(2, 2), heads=(2, 3), window=4, mlp_ratio=2.0, in_chans=3,
                        upsampler="pixelshuffle", scale=4, resi="1conv", num_feat=16, train_size=8,
                        seed=0, meta=False) -> dict[str, torch.Tensor]:
    """Random weights under the official `network_swinir.py` key names and shapes, with the stored buffers
    (relative_position_index, and attn_mask of shifted blocks at the training size); shapes alone with `meta`."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def randn(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta") if meta else torch.randn(*shape, generator=gen)

    def put(name: str, *shape: int, bias: bool = True) -> None:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        sd[f"{name}.weight"] = randn(*shape) / math.sqrt(fan_in)
        if bias:
            sd[f"{name}.bias"] = randn(shape[0]) * 0.1

    def norm(name: str, dim: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * randn(dim)
        sd[f"{name}.bias"] = 0.1 * randn(dim)

    def conv_block(name: str) -> None:
        if resi == "1conv":
            put(name, embed_dim, embed_dim, 3, 3)
        else:
            q = embed_dim // 4
            put(f"{name}.0", q, embed_dim, 3, 3), put(f"{name}.2", q, q, 1, 1), put(f"{name}.4", embed_dim, q, 3, 3)

    put("conv_first", embed_dim, in_chans, 3, 3)
    norm("patch_embed.norm", embed_dim)
    hidden = int(embed_dim * mlp_ratio)
    for i, (depth, nh) in enumerate(zip(depths, heads, strict=True)):
        for j in range(depth):
            b = f"layers.{i}.residual_group.blocks.{j}"
            norm(f"{b}.norm1", embed_dim)
            sd[f"{b}.attn.relative_position_bias_table"] = randn((2 * window - 1) ** 2, nh)
            sd[f"{b}.attn.relative_position_index"] = official_index(window)
            put(f"{b}.attn.qkv", 3 * embed_dim, embed_dim)
            put(f"{b}.attn.proj", embed_dim, embed_dim)
            norm(f"{b}.norm2", embed_dim)
            put(f"{b}.mlp.fc1", hidden, embed_dim)
            put(f"{b}.mlp.fc2", embed_dim, hidden)
            if j % 2:
                windows, n = (train_size // window) ** 2, window * window
                sd[f"{b}.attn_mask"] = (torch.empty(windows, n, n, device="meta") if meta
                                        else region_mask(train_size, train_size, window, window // 2))
        conv_block(f"layers.{i}.conv")
    norm("norm", embed_dim)
    conv_block("conv_after_body")
    if upsampler in ("pixelshuffle", "nearest+conv"):
        put("conv_before_upsample.0", num_feat, embed_dim, 3, 3)
    if upsampler == "pixelshuffle":
        factors = [3] if scale == 3 else [2] * int(math.log2(scale))
        for k, f in enumerate(factors):
            put(f"upsample.{2 * k}", f * f * num_feat, num_feat, 3, 3)
        put("conv_last", in_chans, num_feat, 3, 3)
    elif upsampler == "pixelshuffledirect":
        put("upsample.0", scale * scale * in_chans, embed_dim, 3, 3)
    elif upsampler == "nearest+conv":
        put("conv_up1", num_feat, num_feat, 3, 3)
        if scale == 4:
            put("conv_up2", num_feat, num_feat, 3, 3)
        put("conv_hr", num_feat, num_feat, 3, 3), put("conv_last", in_chans, num_feat, 3, 3)
    else:
        put("conv_last", in_chans, embed_dim, 3, 3)
    return sd


VARIANTS = {
    "classical x4": dict(upsampler="pixelshuffle", scale=4),
    "classical x3": dict(upsampler="pixelshuffle", scale=3, embed_dim=16, heads=(4, 2)),
    "classical x8": dict(upsampler="pixelshuffle", scale=8, depths=(2, 3)),
    "lightweight x2": dict(upsampler="pixelshuffledirect", scale=2, mlp_ratio=1.5),
    "lightweight x4": dict(upsampler="pixelshuffledirect", scale=4, depths=(2, 2, 2), heads=(2, 2, 2)),
    "real-world x4": dict(upsampler="nearest+conv", scale=4, embed_dim=24),
    "real-world x2": dict(upsampler="nearest+conv", scale=2),
    "real-world large 3conv": dict(upsampler="nearest+conv", scale=4, embed_dim=24, resi="3conv", heads=(4, 4)),
    "gray denoise": dict(upsampler="", scale=1, in_chans=1),
    "jpeg window 7": dict(upsampler="", scale=1, window=7, train_size=14),
}


# The official release's files, as main_test_swinir.py builds them: (file name, state dict arguments, expected
# (embed_dim, depths, heads, window, upsampler, scale, resi_connection, in_channels, img_range)).
RELEASED = [
    ("001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth", dict(embed_dim=180, depths=(6,) * 6, heads=(6,) * 6, window=8,
     upsampler="pixelshuffle", scale=4, num_feat=64, train_size=64),
     (180, (6,) * 6, (6,) * 6, 8, "pixelshuffle", 4, "1conv", 3, 1.0)),
    ("001_classicalSR_DIV2K_s48w8_SwinIR-M_x3.pth", dict(embed_dim=180, depths=(6,) * 6, heads=(6,) * 6, window=8,
     upsampler="pixelshuffle", scale=3, num_feat=64, train_size=48),
     (180, (6,) * 6, (6,) * 6, 8, "pixelshuffle", 3, "1conv", 3, 1.0)),
    ("002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth", dict(embed_dim=60, depths=(6,) * 4, heads=(6,) * 4, window=8,
     upsampler="pixelshuffledirect", scale=4, train_size=64),
     (60, (6,) * 4, (6,) * 4, 8, "pixelshuffledirect", 4, "1conv", 3, 1.0)),
    ("003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth", dict(embed_dim=180, depths=(6,) * 6, heads=(6,) * 6,
     window=8, upsampler="nearest+conv", scale=4, num_feat=64, train_size=64),
     (180, (6,) * 6, (6,) * 6, 8, "nearest+conv", 4, "1conv", 3, 1.0)),
    ("003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth", dict(embed_dim=240, depths=(6,) * 9, heads=(8,) * 9,
     window=8, upsampler="nearest+conv", scale=4, num_feat=64, resi="3conv", train_size=64),
     (240, (6,) * 9, (8,) * 9, 8, "nearest+conv", 4, "3conv", 3, 1.0)),
    ("006_CAR_DFWB_s126w7_SwinIR-M_jpeg10.pth", dict(embed_dim=180, depths=(6,) * 6, heads=(6,) * 6, window=7,
     upsampler="", scale=1, in_chans=1, train_size=126),
     (180, (6,) * 6, (6,) * 6, 7, "", 1, "1conv", 1, 255.0)),
]


@pytest.mark.parametrize(("name", "args", "expected"), RELEASED, ids=[r[0] for r in RELEASED])
def test_released_model_shapes_are_detected_as_the_official_script_builds_them(name, args, expected) -> None:
    c = swinir.detect(official_state_dict(**args, meta=True))
    assert c is not None
    assert (c.embed_dim, c.depths, c.num_heads, c.window_size, c.upsampler, c.scale, c.resi_connection,
            c.in_channels, c.img_range) == expected
    assert c.mlp_ratio == 2.0 and c.out_channels == c.in_channels


def load(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """As the loader does it: detect, build on the meta device, assign the file's tensors."""
    config = swinir.detect(sd)
    assert config is not None
    with torch.device("meta"):
        model = swinir.build(config)
    model.load_state_dict(swinir.module_state_dict(sd, config), strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_detect_reads_every_hyperparameter(name: str) -> None:
    args = dict(embed_dim=12, depths=(2, 2), heads=(2, 3), window=4, mlp_ratio=2.0, in_chans=3, resi="1conv",
                num_feat=16) | VARIANTS[name]
    c = swinir.detect(official_state_dict(**args))
    assert c is not None
    assert (c.embed_dim, c.depths, c.num_heads, c.window_size) == (args["embed_dim"], args["depths"], args["heads"],
                                                                  args["window"])
    assert c.mlp_ratio == pytest.approx(args["mlp_ratio"])
    assert (c.upsampler, c.scale, c.resi_connection) == (args["upsampler"], args["scale"], args["resi"])
    assert (c.in_channels, c.out_channels) == (args["in_chans"], args["in_chans"])
    if args["upsampler"] in ("pixelshuffle", "nearest+conv"):
        assert c.num_feat == 16
    assert c.qkv_bias and c.patch_norm
    assert c.mean == (swinir.RGB_MEAN if args["in_chans"] == 3 else (0.0,))
    assert c.img_range == (255.0 if name == "jpeg window 7" else 1.0)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_output_is_input_times_scale_for_any_size_and_deterministic(name: str) -> None:
    args = VARIANTS[name]
    model = load(official_state_dict(**args))
    channels, scale = args.get("in_chans", 3), args["scale"]
    for h, w in ((9, 6), (3, 5), (1, 2)):
        x = torch.rand(2, channels, h, w, generator=torch.Generator().manual_seed(h))
        out = model(x)
        assert out.shape == (2, channels, h * scale, w * scale)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        torch.testing.assert_close(model(x[1:]), out[1:], **TOL)  # batch items are independent


@torch.no_grad()
def test_sizes_off_the_window_are_reflect_padded_then_cropped() -> None:
    model = load(official_state_dict(upsampler="pixelshuffle", scale=2, seed=3))
    x = torch.rand(1, 3, 6, 11, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x, (0, 1, 0, 2), mode="reflect")  # to 8 × 12, window 4
    torch.testing.assert_close(model(x), model(padded)[..., :12, :22], **TOL)
    assert not torch.allclose(model(x), model(F.pad(x, (0, 1, 0, 2), mode="replicate"))[..., :12, :22], **TOL)
    tiny = torch.rand(1, 3, 2, 1)  # shorter than the padding it needs: reflected again, a single column repeated
    assert swinir.pad_to_multiple(tiny, 4).shape == (1, 3, 4, 4)
    torch.testing.assert_close(swinir.pad_to_multiple(tiny, 4)[0, :, :, 0], tiny[0, :, [0, 1, 0, 1], 0])


@torch.no_grad()
def test_scale_one_round_trips_mean_and_range() -> None:
    """With conv_last zero, denoising models return their input exactly: the mean and img_range are undone."""
    for args in (VARIANTS["jpeg window 7"], VARIANTS["gray denoise"]):
        sd = official_state_dict(**args)
        sd["conv_last.weight"].zero_(), sd["conv_last.bias"].zero_()
        x = torch.rand(1, args.get("in_chans", 3), 7, 9)
        torch.testing.assert_close(load(sd)(x), x, rtol=0, atol=2e-6)


def test_relative_position_index_is_the_definition() -> None:
    for window in (1, 3, 4, 8):
        assert torch.equal(relative_position_index(window), official_index(window))


@pytest.mark.parametrize(("h", "w", "window"), [(8, 8, 4), (8, 12, 4), (4, 12, 4), (12, 4, 4), (4, 4, 4), (14, 21, 7)])
def test_border_masks_equal_the_hand_built_region_mask(h: int, w: int, window: int) -> None:
    shift = window // 2
    col, row, corner = border_masks(window, shift)
    nh, nw, n = h // window, w // window, window * window
    ours = torch.zeros(nh, nw, n, n)
    ours[:, -1], ours[-1, :], ours[-1, -1] = col, row, corner
    torch.testing.assert_close(ours.view(-1, n, n), region_mask(h, w, window, shift), rtol=0, atol=0)


def direct_block(p: dict[str, torch.Tensor], x: torch.Tensor, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """One Swin block from its weights `p` (official names below the block), computed window by window and head by
    head: softmax(Q Kᵀ / sqrt(d) + bias + mask) V, the mask hand-built for the whole image."""
    b, _, c = x.shape
    heads = p["attn.relative_position_bias_table"].shape[1]
    d = c // heads
    image = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"]).view(b, h, w, c)
    if shift:
        image = torch.roll(image, (-shift, -shift), (1, 2))
    mask = region_mask(h, w, ws, shift) if shift else torch.zeros((h // ws) * (w // ws), ws * ws, ws * ws)
    bias = torch.empty(heads, ws * ws, ws * ws)
    for i in range(ws * ws):
        for j in range(ws * ws):
            (ri, ci), (rj, cj) = divmod(i, ws), divmod(j, ws)
            bias[:, i, j] = p["attn.relative_position_bias_table"][(ri - rj + ws - 1) * (2 * ws - 1) + ci - cj + ws - 1]
    out = torch.empty_like(image)
    for bi in range(b):
        for k, (r0, c0) in enumerate((r, q) for r in range(0, h, ws) for q in range(0, w, ws)):
            tokens = image[bi, r0:r0 + ws, c0:c0 + ws].reshape(ws * ws, c)
            q_all, k_all, v_all = F.linear(tokens, p["attn.qkv.weight"], p["attn.qkv.bias"]).split(c, dim=-1)
            heads_out = []
            for hd in range(heads):
                q, kk, v = (t[:, hd * d:(hd + 1) * d] for t in (q_all, k_all, v_all))
                scores = (q * d**-0.5) @ kk.T + bias[hd] + mask[k]
                heads_out.append(torch.softmax(scores, dim=-1) @ v)
            attended = F.linear(torch.cat(heads_out, dim=-1), p["attn.proj.weight"], p["attn.proj.bias"])
            out[bi, r0:r0 + ws, c0:c0 + ws] = attended.view(ws, ws, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    y = x + out.reshape(b, h * w, c)
    hidden = F.gelu(F.linear(F.layer_norm(y, (c,), p["norm2.weight"], p["norm2.bias"]), p["mlp.fc1.weight"],
                             p["mlp.fc1.bias"]))
    return y + F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


@pytest.mark.parametrize("shift", [0, 2])
@torch.no_grad()
def test_window_attention_equals_the_direct_computation(shift: int) -> None:
    torch.manual_seed(0)
    block = SwinBlock(dim=12, heads=3, window=4, shift=shift, mlp_hidden=24, qkv_bias=True)
    for p in block.parameters():
        p.copy_(torch.randn_like(p) * 0.5)
    h, w = 8, 12
    x = torch.randn(2, h * w, 12)
    expected = direct_block(block.state_dict(), x, h, w, 4, shift)
    torch.testing.assert_close(block(x, (h, w)), expected, **TOL)


def direct_swinir(sd: dict[str, torch.Tensor], x: torch.Tensor, window: int, scale: int) -> torch.Tensor:
    """The whole network straight from the file's tensors, as the paper and the official code compose it, for an
    input whose sides are multiples of the window (3-channel mean, img_range 1)."""
    def conv(name: str, t: torch.Tensor) -> torch.Tensor:
        if f"{name}.0.weight" in sd:  # 3conv: 3×3, 1×1, 3×3 through a quarter of the channels, LeakyReLU 0.2
            t = F.leaky_relu(conv(f"{name}.0", t), 0.2)
            return conv(f"{name}.4", F.leaky_relu(conv(f"{name}.2", t), 0.2))
        weight = sd[f"{name}.weight"]
        return F.conv2d(t, weight, sd[f"{name}.bias"], padding=weight.shape[-1] // 2)

    def norm(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    b, _, h, w = x.shape
    mean = torch.tensor(swinir.RGB_MEAN).view(1, 3, 1, 1)
    first = conv("conv_first", x - mean)
    c = first.shape[1]
    as_image = lambda t: t.transpose(1, 2).reshape(b, c, h, w)  # noqa: E731
    tokens = norm("patch_embed.norm", first.flatten(2).transpose(1, 2))
    i = 0
    while f"layers.{i}.residual_group.blocks.0.norm1.weight" in sd:
        skip, j = tokens, 0
        while (prefix := f"layers.{i}.residual_group.blocks.{j}.") + "norm1.weight" in sd:
            block = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            tokens = direct_block(block, tokens, h, w, window, window // 2 if j % 2 else 0)
            j += 1
        tokens = conv(f"layers.{i}.conv", as_image(tokens)).flatten(2).transpose(1, 2) + skip
        i += 1
    features = conv("conv_after_body", as_image(norm("norm", tokens))) + first
    if "conv_up1.weight" in sd:
        y = F.leaky_relu(conv("conv_before_upsample.0", features), 0.01)
        for name in ("conv_up1", "conv_up2")[: int(math.log2(scale))]:
            y = F.leaky_relu(conv(name, F.interpolate(y, scale_factor=2.0, mode="nearest")), 0.2)
        out = conv("conv_last", F.leaky_relu(conv("conv_hr", y), 0.2))
    elif "conv_before_upsample.0.weight" in sd:
        y = F.leaky_relu(conv("conv_before_upsample.0", features), 0.01)
        k = 0
        while f"upsample.{k}.weight" in sd:
            y = F.pixel_shuffle(conv(f"upsample.{k}", y), 3 if scale == 3 else 2)
            k += 2
        out = conv("conv_last", y)
    else:
        out = F.pixel_shuffle(conv("upsample.0", features), scale)
    return out + mean


@pytest.mark.parametrize("name", ["classical x4", "classical x3", "lightweight x4", "real-world x4", "real-world x2",
                                  "real-world large 3conv"])
@torch.no_grad()
def test_whole_network_equals_the_direct_computation(name: str) -> None:
    sd = official_state_dict(**VARIANTS[name], seed=5)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = direct_swinir(sd, x, 4, VARIANTS[name]["scale"])
    torch.testing.assert_close(load(sd)(x), expected, rtol=1e-4, atol=1e-4)


def test_stored_buffers_are_dropped_and_a_foreign_index_refused() -> None:
    sd = official_state_dict()
    config = swinir.detect(sd)
    kept = swinir.module_state_dict(sd, config)
    assert not [k for k in kept if k.endswith(("relative_position_index", "attn_mask"))]
    assert len(kept) == len(sd) - 4 - 2  # four blocks' indices, two shifted blocks' masks
    sd["layers.1.residual_group.blocks.0.attn.relative_position_index"] = official_index(4).T.contiguous()
    with pytest.raises(ValueError, match=r"layers\.1\.residual_group\.blocks\.0\.attn\.relative_position_index"):
        swinir.module_state_dict(sd, config)


def test_other_architectures_are_not_swinir() -> None:
    esrgan = {"conv_first.weight": torch.zeros(64, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(32, 64, 3, 3)}
    assert swinir.detect(esrgan) is None
    hat_like = official_state_dict() | {"layers.0.residual_group.blocks.0.conv_block.cab.0.weight": torch.zeros(1)}
    assert swinir.detect(hat_like) is None


@pytest.mark.parametrize(("edit", "message"), [
    (lambda sd: sd.pop("layers.1.residual_group.blocks.1.mlp.fc2.bias"), r"missing.*blocks\.1\.mlp\.fc2\.bias"),
    (lambda sd: sd.update({"layers.0.residual_group.blocks.1.attn.qkv.weight": torch.zeros(30, 12)}),
     r"unexpected shape.*blocks\.1\.attn\.qkv\.weight \[30, 12\]"),
    (lambda sd: sd.update({swinir._MARKER: torch.zeros(50, 2)}), "50 rows"),
    (lambda sd: sd.update({"absolute_pos_embed": torch.zeros(1, 64, 12)}), "absolute position embedding"),
    (lambda sd: sd.update({"upsample.2.weight": torch.zeros(80, 16, 3, 3)}), r"upsample\.2\.weight has 80"),
])
def test_broken_files_name_the_key(edit, message: str) -> None:
    sd = official_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=message):
        swinir.detect(sd)


def test_registered_and_found_first_among_the_upscalers() -> None:
    """Through the package's detection order: no earlier architecture claims a SwinIR file (the real-world tail
    shares RRDBNet's conv_first/conv_up1/conv_up2/conv_hr/conv_last names)."""
    assert swinir in upscalers.ARCHITECTURES
    for name in ("real-world x4", "classical x4", "lightweight x2"):
        sd = official_state_dict(**VARIANTS[name])
        found = next(arch for arch in upscalers.ARCHITECTURES if arch.detect(dict(sd)) is not None)
        assert found is swinir, name


def peak_cpu_bytes(fn) -> int:
    """The most bytes `fn` holds allocated at once on the CPU, from the profiler's allocation and free events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("name", ["classical x4", "classical x8", "lightweight x4", "real-world x4",
                                  "real-world large 3conv", "jpeg window 7"])
@torch.no_grad()
def test_activation_estimate_bounds_the_measured_peak(name: str) -> None:
    model = load(official_state_dict(**VARIANTS[name]))
    x = torch.rand(1, model.config.in_channels, 21, 30)
    measured = peak_cpu_bytes(lambda: model(x)) / 4
    estimate = swinir.activation_elements(model.config, 21, 30)
    assert measured <= estimate <= 2.5 * measured


@torch.no_grad()
def test_released_file_forms_load_through_the_upscaler_loader(tmp_path) -> None:
    """A BasicSR pickle under `params_ema` with the int64 index and mask buffers (as the real-world release ships),
    and a flat half-precision safetensors file without them, give the network of the state dict itself."""
    sd = official_state_dict(**VARIANTS["real-world x4"], seed=7)
    x = torch.rand(1, 3, 10, 7, generator=torch.Generator().manual_seed(0))
    expected = load(sd)(x)
    torch.save({"params_ema": sd}, tmp_path / "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth")
    module, config, arch = load_upscaler(tmp_path / "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth")
    assert arch is swinir and (config.upsampler, config.scale) == ("nearest+conv", 4)
    torch.testing.assert_close(module(x), expected, **TOL)

    half = {k: v.half() for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    write_safetensors(tmp_path / "swinir.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in half.items()},
                      half.__getitem__)
    module, _, _ = load_upscaler(tmp_path / "swinir.safetensors")
    assert next(module.parameters()).dtype == torch.float32
    rounded = load({k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()})(x)
    torch.testing.assert_close(module(x), rounded, **TOL)


def test_a_broken_file_is_refused_naming_the_file_and_key(tmp_path) -> None:
    sd = official_state_dict()
    del sd["layers.1.conv.weight"]
    torch.save(sd, tmp_path / "broken_SwinIR.pth")
    with pytest.raises(CheckpointError, match=r"broken_SwinIR\.pth.*SwinIR.*layers\.1\.conv\.weight"):
        load_upscaler(tmp_path / "broken_SwinIR.pth")
