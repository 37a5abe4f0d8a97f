from __future__ import annotations

import pytest
import torch

from nodes import latent as n


def lat(b=1, h=8, w=8, seed=0, **extra):
    return {"samples": torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed)), **extra}


def test_empty_latent():
    (out,) = n.EmptyLatentImage().execute(512, 256, 3)
    assert out["samples"].shape == (3, 4, 32, 64) and out["samples"].abs().sum() == 0


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_upscale(method):
    src = lat(h=8, w=8)
    (out,) = n.LatentUpscale().execute(src, method, 128, 96, "disabled")
    assert out["samples"].shape == (1, 4, 12, 16)
    (by,) = n.LatentUpscaleBy().execute(src, method, 1.5)
    assert by["samples"].shape == (1, 4, 12, 12)
    (same,) = n.LatentUpscale().execute(src, method, 64, 64, "disabled")
    assert torch.allclose(same["samples"], src["samples"], atol=1e-5)


def test_bislerp_keeps_norms_between_neighbours():
    a = torch.zeros(1, 4, 1, 2)
    a[0, 0, 0, 0], a[0, 1, 0, 1] = 2.0, 2.0  # orthogonal directions, equal norms
    (out,) = n.LatentUpscale().execute({"samples": a}, "bislerp", 24, 8, "disabled")
    norms = out["samples"].norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 2.0), atol=1e-4)


def test_latent_composite_places_source_in_latent_pixels():
    dst = {"samples": torch.zeros(1, 4, 8, 8)}
    src = {"samples": torch.ones(1, 4, 2, 2)}
    (out,) = n.LatentComposite().execute(dst, src, 16, 8, 0)
    s = out["samples"]
    assert s[0, :, 1:3, 2:4].min() == 1 and s.sum() == 16
    (feathered,) = n.LatentComposite().execute(dst, {"samples": torch.ones(1, 4, 4, 4)}, 16, 16, 16)
    inner = feathered["samples"][0, 0, 2:6, 2:6]
    assert inner[0, 0] == pytest.approx(0.25) and inner[1, 1] == pytest.approx(1.0) and inner[3, 3] == 0.25
    (masked,) = n.LatentCompositeMasked().execute(dst, src, 0, 0, False, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert masked["samples"][0, 0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_latent_blend_weights_samples1():
    a, b = {"samples": torch.ones(1, 4, 2, 2)}, {"samples": torch.zeros(1, 4, 2, 2)}
    (out,) = n.LatentBlend().execute(a, b, 0.75)
    assert torch.allclose(out["samples"], torch.full((1, 4, 2, 2), 0.75))


def test_batch_nodes_keep_batch_index_and_masks():
    x = lat(b=4, noise_mask=torch.rand(4, 1, 64, 64))
    (part,) = n.LatentFromBatch().execute(x, 1, 2)
    assert torch.equal(part["samples"], x["samples"][1:3]) and part["batch_index"] == [1, 2]
    assert part["noise_mask"].shape[0] == 2
    (end,) = n.LatentFromBatch().execute(x, 10, 5)
    assert end["batch_index"] == [3]
    (rep,) = n.RepeatLatentBatch().execute(part, 3)
    assert rep["samples"].shape[0] == 6 and rep["batch_index"] == [1, 2, 3, 4, 5, 6]
    (both,) = n.LatentBatch().execute(lat(b=2), lat(b=1, h=16, w=16))
    assert both["samples"].shape == (3, 4, 8, 8) and both["batch_index"] == [0, 1, 2]


def test_latent_interpolate_endpoints_and_norm():
    a, b = lat(seed=1), lat(seed=2)
    assert torch.allclose(n.LatentInterpolate().execute(a, b, 1.0)[0]["samples"], a["samples"], atol=1e-5)
    assert torch.allclose(n.LatentInterpolate().execute(a, b, 0.0)[0]["samples"], b["samples"], atol=1e-5)
    mid = n.LatentInterpolate().execute(a, b, 0.5)[0]["samples"]
    expected = (a["samples"].norm(dim=1) + b["samples"].norm(dim=1)) / 2
    assert torch.allclose(mid.norm(dim=1), expected, atol=1e-4)


def test_set_latent_noise_mask():
    (out,) = n.SetLatentNoiseMask().execute(lat(), torch.ones(64, 64))
    assert out["noise_mask"].shape == (1, 1, 64, 64) and "noise_mask" not in lat()
