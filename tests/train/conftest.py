"""What the resumable recipes' tests share (tests/train/test_motion.py, test_controlnet_trainer.py): a tiny SD1
shapes checkpoint at random weights to train against, and running a recipe's `main` on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from train.recipe import build_text_encoder, build_unet, build_vae, tiny_spec, write_checkpoint


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny SD1 shapes model at random weights (its output layer random too, so the UNet is not constant)."""
    spec = tiny_spec()
    unet = build_unet(spec, 1)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.05)
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    write_checkpoint(path, spec, unet, build_vae(spec, 2), build_text_encoder(spec, 3))
    return path


def run_recipe(main: Callable[[list[str]], int], settings: list[str], base: Path, folder: Path, name: str,
               *extra: str) -> tuple[Path, int]:
    """Run a recipe's `main` with `settings` against `base`, writing `folder/name.safetensors` (and its state
    `folder/name.pt`); returns (the output path, the exit status)."""
    out = folder / f"{name}.safetensors"
    code = main([*settings, "--base", str(base), "--out", str(out), "--state", str(folder / f"{name}.pt"), *extra])
    return out, code
