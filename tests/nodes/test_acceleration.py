"""The DeepCache node through KSampler on a tiny random checkpoint: interval 1 leaves the result as it was, a larger
interval reuses the deep features (counted: one UNet call per step, cond and uncond batched), bad settings are
refused by name, and the interface is the ComfyUI-deepcache pack's."""

from __future__ import annotations

import torch

from graph.validation import validate_prompt
from nodes.acceleration import DeepCache
from tests.nodes.test_model_patch_nodes import latent, patched
from tests.nodes.test_sd_nodes import txt2img


def _deep(interval: int, **kw) -> tuple[str, dict]:
    return ("DeepCache", {"cache_interval": interval, "cache_depth": kw.get("depth", 1),
                          "start_step": kw.get("start", 0), "end_step": kw.get("end", 1000)})


def test_interval_one_changes_nothing_and_two_reuses_every_other_step(engine):
    plain = latent(engine, txt2img(steps=4))
    assert torch.equal(latent(engine, patched([_deep(1)], steps=4)), plain)
    prompt = patched([_deep(2)], steps=4)
    cached = latent(engine, prompt)
    model = engine.outputs(prompt, "20")[0][0]
    stats = model.unet_wrapper.stats
    assert (stats.full, stats.cached) == (2, 2)  # 4 steps, each one batched cond+uncond call
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert torch.allclose(cached, plain, atol=0.5 * float(plain.abs().max()))


def test_the_input_model_is_left_plain(engine):
    prompt = patched([_deep(2)], steps=3)
    engine.run(prompt)
    assert engine.outputs(prompt, "4")[0][0].unet_wrapper is None


def test_start_after_end_is_refused_naming_the_node(engine):
    prompt = patched([_deep(2, start=600, end=400)], steps=2)
    validation = validate_prompt(prompt, engine.registry, engine.env)
    result = engine.executor.execute(validation.prompt, "p", lambda *_: None)
    assert result.status == "error"
    assert "start_step 600 is after end_step 400" in result.error["exception_message"]
    assert result.error["node_id"] == "20"


def test_interface_is_the_packs():
    info = DeepCache.__dict__
    assert info["category"] == "loaders" and info["display_name"] == "Deep Cache"
    names = [(i.name, i.type, i.default, i.min, i.max) for i in DeepCache.inputs]
    assert names == [("model", "MODEL", None, None, None), ("cache_interval", "INT", 5, 1, 1000),
                     ("cache_depth", "INT", 3, 0, 12), ("start_step", "INT", 0, 0, 1000),
                     ("end_step", "INT", 1000, 0, 1000)]
    assert [o.type for o in DeepCache.outputs] == ["MODEL"]
