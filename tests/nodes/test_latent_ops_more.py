"""Latent crop, flip, rotate, arithmetic and rebatching against hand-computed small tensors."""

from __future__ import annotations

import pytest
import torch

from graph.executor import Executor
from graph.node import Node, NodeOutput, Socket
from graph.types import LATENT
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from nodes.latent_ops import (
    LatentAdd,
    LatentCrop,
    LatentFlip,
    LatentMultiply,
    LatentRotate,
    LatentSubtract,
    RebatchLatents,
)


def numbered(batch=1, channels=4, height=2, width=2):
    return torch.arange(batch * channels * height * width, dtype=torch.float32).view(batch, channels, height, width)


def test_flip_and_rotate_move_samples_and_noise_mask_together():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 4, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    latent = {"samples": x, "noise_mask": mask, "batch_index": [3]}
    flipped = LatentFlip().execute(latent, "x-axis: vertically")[0]
    assert flipped["samples"][0, 0].tolist() == [[3, 4], [1, 2]]
    assert flipped["noise_mask"][0, 0].tolist() == [[0, 0], [1, 0]] and flipped["batch_index"] == [3]
    assert LatentFlip().execute(latent, "y-axis: horizontally")[0]["samples"][0, 0].tolist() == [[2, 1], [4, 3]]
    turned = LatentRotate().execute(latent, "90 degrees")[0]
    assert turned["samples"][0, 2].tolist() == [[3, 1], [4, 2]]  # clockwise, every channel
    assert turned["noise_mask"][0, 0].tolist() == [[0, 1], [0, 0]]
    assert LatentRotate().execute(latent, "270 degrees")[0]["samples"][0, 0].tolist() == [[2, 4], [1, 3]]
    assert LatentRotate().execute({"samples": torch.zeros(1, 4, 2, 5)}, "90 degrees")[0]["samples"].shape == \
        (1, 4, 5, 2)


def test_crop_in_pixels_with_comfyui_clamping():
    x = numbered(height=16, width=16)
    latent = {"samples": x, "noise_mask": torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)}
    out = LatentCrop().execute(latent, 64, 72, 16, 8)[0]  # 8×9 latent units from (2, 1)
    assert torch.equal(out["samples"], x[:, :, 1:10, 2:10])
    assert torch.equal(out["noise_mask"], latent["noise_mask"][:, :, 2:20, 4:20])  # mask at 2× the latent size
    # x beyond the width: moved in so that 8 units remain
    assert torch.equal(LatentCrop().execute({"samples": x}, 64, 64, 800, 0)[0]["samples"], x[:, :, 0:8, 8:16])
    assert LatentCrop().execute({"samples": x}, 512, 512, 0, 0)[0]["samples"].shape == (1, 4, 16, 16)


def test_add_subtract_multiply():
    a, b = numbered(2), torch.ones(1, 4, 2, 2)
    s1 = {"samples": a, "batch_index": [0, 1], "noise_mask": torch.ones(1, 1, 16, 16)}
    added = LatentAdd().execute(s1, {"samples": b})[0]
    assert torch.equal(added["samples"], a + 1)  # b's single entry serves the whole batch
    assert added["batch_index"] == [0, 1] and added["noise_mask"] is s1["noise_mask"]
    assert torch.equal(LatentSubtract().execute(s1, {"samples": b * 3})[0]["samples"], a - 3)
    assert torch.equal(LatentMultiply().execute(s1, -0.5)[0]["samples"], a * -0.5)
    # another size is scaled to samples1's (a constant stays that constant)
    assert torch.allclose(LatentAdd().execute(s1, {"samples": torch.full((3, 4, 5, 7), 2.0)})[0]["samples"], a + 2)
    with pytest.raises(ValueError, match="LatentAdd: samples1 has 4 channels and samples2 16"):
        LatentAdd().execute(s1, {"samples": torch.zeros(1, 16, 2, 2)})


def test_rebatch_latents_regroups_entries_with_their_masks_and_indices():
    first = {"samples": numbered(3, height=1, width=1), "batch_index": [0, 1, 2]}
    masked = {"samples": numbered(1, height=1, width=1) + 100, "noise_mask": torch.zeros(1, 1, 8, 8)}
    other = {"samples": torch.zeros(2, 4, 2, 2)}
    out = RebatchLatents().execute([first, masked, other], [2])[0]
    assert [b["samples"].shape[0] for b in out] == [2, 2, 2]
    assert torch.equal(out[0]["samples"], first["samples"][:2]) and "noise_mask" not in out[0]
    assert out[1]["batch_index"] == [2, 0]
    assert out[1]["samples"][1, 0, 0, 0].item() == 100
    # the entry without a mask gets an all-ones one (repaint everything), beside the masked entry's zeros
    assert out[1]["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 0.0] and out[1]["noise_mask"].shape == (2, 1, 8, 8)
    assert out[2]["samples"].shape == (2, 4, 2, 2)  # another size: a batch of its own
    singles = RebatchLatents().execute([first], [1])[0]
    assert [b["batch_index"] for b in singles] == [[0], [1], [2]]


class ShowLatent(Node):
    """A test output node: reports each latent it gets (its shape and first value)."""

    output_node = True
    inputs = [Socket("samples", LATENT)]
    outputs = []

    def execute(self, samples):
        x = samples["samples"]
        return NodeOutput(ui={"latents": [[list(x.shape), x.flatten()[0].item(), samples.get("batch_index")]]})


def test_latent_ops_through_the_engine_once_per_rebatched_batch(tmp_path):
    env = Environment(tmp_path)
    env.ensure_dirs()
    registry = build_registry(env, plugins=False)
    registry.register(ShowLatent)
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 128, "batch_size": 3}},
              "2": {"class_type": "RebatchLatents", "inputs": {"latents": ["1", 0], "batch_size": 2}},
              "3": {"class_type": "LatentAdd", "inputs": {"samples1": ["2", 0], "samples2": ["2", 0]}},
              "4": {"class_type": "LatentMultiply", "inputs": {"samples": ["3", 0], "multiplier": 2.0}},
              "5": {"class_type": "LatentRotate", "inputs": {"samples": ["4", 0], "rotation": "90 degrees"}},
              "6": {"class_type": "ShowLatent", "inputs": {"samples": ["5", 0]}}}
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    result = Executor(env=env).execute(validation.prompt, "p", lambda *_: None)
    assert result.status == "success", result.error
    assert result.outputs["6"]["latents"] == [[[2, 4, 8, 16], 0.0, [0, 1]], [[1, 4, 8, 16], 0.0, [2]]]


def test_latent_interpolate_cycles_the_second_batch():
    """LatentInterpolate (nodes/latent.py): samples2 with another batch size is cycled to samples1's, as ComfyUI."""
    from nodes.latent import LatentInterpolate

    a = torch.randn(3, 4, 2, 2)
    b = torch.randn(2, 4, 2, 2)
    out = LatentInterpolate().execute({"samples": a}, {"samples": b}, 0.0)[0]["samples"]
    expected = torch.cat([b, b[:1]])  # ratio 0 gives samples2, its entries cycled
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(LatentInterpolate().execute({"samples": a}, {"samples": b}, 1.0)[0]["samples"], a, atol=1e-5)
