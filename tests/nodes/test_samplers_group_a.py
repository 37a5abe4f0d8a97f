"""P9 group A sampler names through KSampler on a tiny random SD1 checkpoint: each runs by its ComfyUI name, and
the CFG++ ones get the unconditional prediction from the real guider (equal to their base sampler at cfg 1,
different above)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.nodes.test_sd_nodes import latent_of, txt2img

NEW = ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_sde_gpu",
       "dpmpp_2m_sde_gpu", "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "res_multistep",
       "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
       "gradient_estimation_cfg_pp", "er_sde")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="17 KSampler runs; set LATENTLOOM_SLOW=1")
def test_every_new_sampler_name_runs_through_ksampler(engine):
    latents = {name: latent_of(engine, txt2img(sampler=name, steps=3, size=32)) for name in NEW}
    for name, out in latents.items():
        assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all(), name
    # the _gpu names draw the same noise as their base on the CPU
    base = latent_of(engine, txt2img(sampler="dpmpp_2m_sde", steps=3, size=32))
    torch.testing.assert_close(latents["dpmpp_2m_sde_gpu"], base, rtol=0, atol=0)


def test_cfg_pp_through_ksampler_gets_the_unconditional_prediction(engine):
    """If the guider's hook did not report U, euler_cfg_pp would fall back to U = D and equal euler."""
    cfg_pp = latent_of(engine, txt2img(sampler="euler_cfg_pp", steps=3, size=32, cfg=6.0))
    euler = latent_of(engine, txt2img(sampler="euler", steps=3, size=32, cfg=6.0))
    assert torch.isfinite(cfg_pp).all() and (cfg_pp - euler).abs().max() > 1e-2
