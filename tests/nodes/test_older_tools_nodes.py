"""Older tools still found in shared workflows, through the engine on tiny random checkpoints:
ModelSamplingContinuousEDM / ModelSamplingContinuousV and HypernetworkLoader."""

from __future__ import annotations

import math

import pytest
import torch

from graph.executor import Executor
from graph.validation import validate_prompt
from nodes.schedulers import BasicScheduler
from tests.nodes.test_model_patch_nodes import latent, patched
from tests.nodes.test_sd_nodes import txt2img


def failed(engine, prompt) -> dict:
    validation = validate_prompt(prompt, engine.registry, engine.env)
    assert validation.ok, validation.response()
    result = Executor(env=engine.env).execute(validation.prompt, "p", lambda event, data: None)
    assert result.status == "error"
    return result.error


# --- ModelSamplingContinuousEDM / ModelSamplingContinuousV ------------------------------------------------------

EDM = {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}
V = {"sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03}


@pytest.mark.parametrize("class_type, inputs, scheduler", [
    ("ModelSamplingContinuousEDM", EDM, "karras"),
    ("ModelSamplingContinuousEDM", {**EDM, "sampling": "v_prediction", "sigma_max": 120.0}, "normal"),
    ("ModelSamplingContinuousEDM", {**EDM, "sampling": "eps"}, "simple"),
    ("ModelSamplingContinuousV", V, "exponential"),
])
def test_continuous_sampling_runs_on_the_clone_only(engine, class_type, inputs, scheduler):
    plain = latent(engine, txt2img(scheduler=scheduler))
    prompt = patched([(class_type, inputs)], scheduler=scheduler)
    out = latent(engine, prompt)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-4)
    clone, original = engine.outputs(prompt, "20")[0][0], engine.outputs(prompt, "4")[0][0]
    assert math.isclose(clone.model_sampling.sigma_max, inputs["sigma_max"])
    assert math.isclose(clone.model_sampling.sigma_min, inputs["sigma_min"])
    assert clone.model_sampling.prediction == inputs["sampling"]
    assert original.model_sampling.prediction == "eps" and original.model_sampling.sigma_max < 15
    engine.executor.cache.clear()  # the shared MODEL samples as before
    torch.testing.assert_close(latent(engine, txt2img(scheduler=scheduler)), plain, rtol=0, atol=0)


def test_basic_scheduler_follows_the_continuous_range(engine):
    clone = engine.outputs(patched([("ModelSamplingContinuousEDM", EDM)]), "20")[0][0]
    sigmas = BasicScheduler().execute(clone, "karras", 5, 1.0)[0]
    assert math.isclose(float(sigmas[0]), 80.0, rel_tol=1e-5)
    assert math.isclose(float(sigmas[-2]), 0.002, rel_tol=1e-4) and float(sigmas[-1]) == 0.0


@pytest.mark.parametrize("inputs, words", [
    ({**EDM, "sampling": "cosmos_rflow"}, ["cosmos_rflow", "not supported"]),
    ({**EDM, "sampling": "edm_playground_v2.5"}, ["edm_playground_v2.5", "latent"]),
    ({**EDM, "sigma_min": 0.0}, ["sigma_min=0.0"]),
    ({**EDM, "sigma_min": 100.0}, ["sigma_min=100.0", "sigma_max=80.0"]),
])
def test_refused_continuous_settings_are_named(engine, inputs, words):
    error = failed(engine, patched([("ModelSamplingContinuousEDM", inputs)]))
    assert error["node_type"] == "ModelSamplingContinuousEDM" and error["node_id"] == "20"
    for word in words:
        assert word in error["exception_message"], error["exception_message"]
    assert "Traceback" not in error["exception_message"]
