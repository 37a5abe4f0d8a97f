"""What the resumable recipes' tests share (tests/train/test_motion.py, test_controlnet_trainer.py,
test_train_128.py): a tiny SD1 shapes checkpoint at random weights to train against, running a recipe's `main` on it,
and the check that a stopped and resumed run ends where an uninterrupted one does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffusion.checkpoints.files import read_state_dict
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


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, copied out of its memory map."""
    return {k: v.clone() for k, v in read_state_dict(path).items()}


def check_resume(train: Callable[..., tuple[Path, int]], base: Path, folder: Path, uninterrupted: Path,
                 first_run_steps: int) -> None:
    """`train(base, folder, name, *flags)` stopped after `first_run_steps` (exit 3, the state saved, no file) and
    resumed writes the same tensors as the uninterrupted run."""
    out, code = train(base, folder, "cut", "--stop-after", str(first_run_steps))
    assert code == 3 and not out.exists() and (folder / "cut.pt").exists()
    out, code = train(base, folder, "cut", "--resume")
    assert code == 0
    full, resumed = weights(uninterrupted), weights(out)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
