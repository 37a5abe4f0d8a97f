"""Marker keys beside a checkpoint's weights choose how it is sampled: `edm_vpred.sigma_min/max` (CosXL:
continuous-time EDM v-prediction), `ztsnr` (a zero-terminal-SNR schedule), `v_pred` (v-prediction)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion.checkpoints.families import FamilyError
from diffusion.checkpoints.loader import load_checkpoint
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.handles import wrap_checkpoint
from diffusion.memory import ModelManager
from diffusion.sampling.model_sampling import ContinuousModelSampling


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("markers") / "plain.safetensors"
    write_random_checkpoint(path, "sd1", seed=4)
    return path


def with_keys(plain, tmp_path, **extra):
    sd = load_file(plain)
    sd.update({k.replace("__", "."): torch.tensor(v) for k, v in extra.items()})
    with safe_open(plain, "pt") as f:
        metadata = f.metadata()  # the tiny model's head and group counts, which shapes do not reveal
    path = tmp_path / "marked.safetensors"
    save_file(sd, path, metadata=metadata)
    return path


def model_sampling(path):
    model, _, _ = wrap_checkpoint(load_checkpoint(path, dtype=torch.float32), ModelManager("cpu"))
    return model.model_sampling


def test_a_plain_checkpoint_samples_discretely(plain):
    sampling = model_sampling(plain)
    assert not isinstance(sampling, ContinuousModelSampling)
    assert sampling.sigma_max == pytest.approx(14.6146, rel=1e-3)


def test_edm_vpred_keys_make_a_continuous_v_prediction_model(plain, tmp_path):
    sampling = model_sampling(with_keys(plain, tmp_path, edm_vpred__sigma_min=0.002, edm_vpred__sigma_max=120.0))
    assert isinstance(sampling, ContinuousModelSampling)
    assert sampling.prediction == "v_prediction" and sampling.sigma_data == 1.0
    assert sampling.sigma_min == pytest.approx(0.002, rel=1e-4) and sampling.sigma_max == pytest.approx(120.0)


def test_ztsnr_rescales_the_schedule_to_zero_terminal_snr(plain, tmp_path):
    rescaled = model_sampling(with_keys(plain, tmp_path, ztsnr=0.0))
    assert rescaled.sigma_max > 100 * model_sampling(plain).sigma_max  # the last level is (almost) pure noise


def test_unreadable_or_inverted_edm_sigmas_name_the_keys(plain, tmp_path):
    with pytest.raises(FamilyError, match="0 < sigma_min < sigma_max"):
        load_checkpoint(with_keys(plain, tmp_path, edm_vpred__sigma_min=5.0, edm_vpred__sigma_max=1.0))
    with pytest.raises(FamilyError, match=r"edm_vpred\.sigma_min/sigma_max keys are unreadable"):
        load_checkpoint(with_keys(plain, tmp_path, edm_vpred__sigma_max=120.0))
