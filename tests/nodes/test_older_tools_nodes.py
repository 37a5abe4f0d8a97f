"""Older tools still found in shared workflows, through the engine on tiny random checkpoints:
ModelSamplingContinuousEDM / ModelSamplingContinuousV and HypernetworkLoader."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.patches.hypernetwork import attention_input_widths
from graph.validation import validate_prompt
from nodes.schedulers import BasicScheduler
from tests.diffusion.test_hypernetwork import Payload, write_hypernetwork
from tests.nodes.test_model_patch_nodes import latent, patched
from tests.nodes.test_sd_nodes import txt2img

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
    error = engine.failure(patched([("ModelSamplingContinuousEDM", inputs)]))
    assert error["node_type"] == "ModelSamplingContinuousEDM" and error["node_id"] == "20"
    for word in words:
        assert word in error["exception_message"], error["exception_message"]
    assert "Traceback" not in error["exception_message"]


# --- HypernetworkLoader -----------------------------------------------------------------------------------------


def hypernetwork_prompt(name="style.pt", strength=1.0, chain=(), ckpt="sd1.safetensors"):
    nodes = [("HypernetworkLoader", {"hypernetwork_name": name, "strength": strength})]
    nodes += [("HypernetworkLoader", {"hypernetwork_name": n, "strength": s}) for n, s in chain]
    return patched(nodes, ckpt=ckpt)


@pytest.fixture
def sd1_widths(engine):
    model = engine.outputs(txt2img(), "4")[0][0]
    return sorted(attention_input_widths(model.patcher.model)), model.family.unet.context_dim


def test_hypernetwork_loader_changes_the_clone_only(engine, sd1_widths):
    widths, context_dim = sd1_widths
    folder = engine.env.models_dir / "hypernetworks"
    write_hypernetwork(folder / "style.pt", widths=(context_dim,))
    write_hypernetwork(folder / "all.pt", widths=widths, seed=7)
    plain = latent(engine, txt2img())
    styled = latent(engine, hypernetwork_prompt())
    assert torch.isfinite(styled).all() and not torch.allclose(styled, plain, atol=1e-4)
    both = latent(engine, hypernetwork_prompt(chain=[("all.pt", 0.5)]))
    assert not torch.allclose(both, styled, atol=1e-4)
    torch.testing.assert_close(latent(engine, hypernetwork_prompt(strength=0.0)), plain, rtol=0, atol=0)
    engine.executor.cache.clear()  # the shared MODEL, run again without the hypernetwork: as before
    torch.testing.assert_close(latent(engine, txt2img()), plain, rtol=0, atol=0)


def test_hypernetwork_errors_name_the_node_and_the_file(engine, sd1_widths):
    _, context_dim = sd1_widths
    folder = engine.env.models_dir / "hypernetworks"
    write_hypernetwork(folder / "other.pt", widths=(context_dim + 8,))
    error = engine.failure(hypernetwork_prompt("other.pt"))
    assert error["node_type"] == "HypernetworkLoader"
    assert f"no attention input of width {context_dim + 8}" in error["exception_message"]
    torch.save({context_dim: [Payload(), {}]}, folder / "evil.pt")
    error = engine.failure(hypernetwork_prompt("evil.pt"))
    message = error["exception_message"]
    assert "models/hypernetworks/evil.pt" in message and "needs code" in message
    assert str(engine.env.data_dir) not in message
    (folder / "text.pt").write_text("not a pickle")
    assert "text.pt" in engine.failure(hypernetwork_prompt("text.pt"))["exception_message"]


def test_a_hypernetwork_name_outside_its_folder_is_refused(engine):
    validation = validate_prompt(hypernetwork_prompt("../checkpoints/sd1.safetensors"), engine.registry, engine.env)
    assert not validation.ok and "hypernetwork_name" in str(validation.response())
