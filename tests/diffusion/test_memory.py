"""ModelManager on the CPU with a simulated device budget: LRU eviction, pinning, patches while loaded,
layer streaming that gives the same outputs and moves weights in and out around each forward."""

import logging

import pytest
import torch
from torch import nn

from diffusion.memory import ModelManager
from diffusion.patches.patcher import LoraDelta, ModelPatcher
from tests.diffusion.tiny_models import TINY_SD1, clip_ids, tiny_clip, tiny_unet, unet_inputs

WIDTH, DEPTH = 16, 3
SIZE = DEPTH * (WIDTH * WIDTH + WIDTH) * 4  # bytes of one mlp()


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)]).eval().requires_grad_(False)


def patchers(*names: str) -> list[ModelPatcher]:
    return [ModelPatcher(mlp(i), "cpu", "cpu", name=name) for i, name in enumerate(names)]


def names(manager: ModelManager) -> list[str]:
    return [name for name, _ in manager.loaded()]


def lora_for(net: nn.Sequential, seed: int) -> dict[str, LoraDelta]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{i}.weight": LoraDelta(torch.randn(WIDTH, 2, generator=gen), torch.randn(2, WIDTH, generator=gen))
            for i in range(len(net))}


def test_mlp_size_is_what_the_patcher_measures():
    (a,) = patchers("a")
    assert a.model_nbytes() == SIZE


def test_least_recently_used_is_evicted_first():
    a, b, c = patchers("a", "b", "c")
    manager = ModelManager("cpu", "cpu", budget_bytes=2 * SIZE + SIZE // 2)
    manager.load([a])
    manager.load([b])
    assert names(manager) == ["a", "b"]
    manager.load([c])
    assert names(manager) == ["b", "c"]
    manager.load([a])
    assert names(manager) == ["c", "a"]
    manager.load([c])  # use refreshes recency without loading anything
    assert names(manager) == ["a", "c"]
    manager.load([b])
    assert names(manager) == ["c", "b"]
    assert manager.loaded() == [("c", SIZE), ("b", SIZE)]


def test_models_in_use_are_not_evicted():
    a, b, c = patchers("a", "b", "c")
    manager = ModelManager("cpu", "cpu", budget_bytes=2 * SIZE + SIZE // 2)
    with manager.use([a]) as modules:
        assert modules == [a.model]
        manager.load([b])
        manager.load([c])  # a is the least recent but in use: b goes
        assert names(manager) == ["a", "c"]
    manager.load([b])  # no longer in use: a goes now
    assert names(manager) == ["c", "b"]


def test_extra_memory_makes_room_for_activations():
    a, b, c = patchers("a", "b", "c")
    manager = ModelManager("cpu", "cpu", budget_bytes=3 * SIZE + SIZE // 2)
    manager.load([a, b, c])
    assert names(manager) == ["a", "b", "c"]
    manager.load([c], extra_memory=SIZE)
    assert names(manager) == ["b", "c"]


def test_memory_probe_simulates_a_small_device():
    a, b, c = patchers("a", "b", "c")
    capacity = 2 * SIZE + 100
    calls = []

    def probe() -> int:
        calls.append(1)
        return capacity - manager.loaded_nbytes()

    manager = ModelManager("cpu", "cpu", memory_probe=probe, reserve_bytes=50)
    manager.load([a, b])
    assert names(manager) == ["a", "b"]
    manager.load([c])
    assert names(manager) == ["b", "c"]
    assert calls


def test_cpu_manager_without_budget_keeps_everything():
    ps = patchers("a", "b", "c", "d")
    manager = ModelManager("cpu", "cpu")
    for p in ps:
        manager.load([p])
    assert names(manager) == ["a", "b", "c", "d"]


def test_patches_applied_while_loaded_and_removed_on_unload_and_eviction():
    (a, other) = patchers("a", "other")
    original = {k: v.clone() for k, v in a.model.state_dict().items()}
    lora = a.clone()
    lora.add_patches(lora_for(a.model, 1), 0.7)
    manager = ModelManager("cpu", "cpu", budget_bytes=SIZE + SIZE // 2)
    x = torch.randn(2, WIDTH)
    plain = a.model(x)
    (module,) = manager.load([lora])
    assert module is a.model
    expected = original["0.weight"] + 0.7 * (lora.patches["0.weight"][0][1].up @ lora.patches["0.weight"][0][1].down)
    torch.testing.assert_close(module[0].weight, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(module(x), plain)
    manager.unload(lora)
    assert all(torch.equal(v, original[k]) for k, v in a.model.state_dict().items())
    manager.load([lora])
    manager.load([other])  # evicts the LoRA model: its weights go back to the originals
    assert names(manager) == ["other"]
    assert all(torch.equal(v, original[k]) for k, v in a.model.state_dict().items())
    manager.load([lora])
    manager.unload_all()
    assert manager.loaded() == []
    assert all(torch.equal(v, original[k]) for k, v in a.model.state_dict().items())


def test_switching_clones_of_a_loaded_model_repatches_in_place():
    (base,) = patchers("base")
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    one, two = base.clone(), base.clone()
    one.add_patches(lora_for(base.model, 2), 1.0)
    two.add_patches(lora_for(base.model, 3), 1.0)
    manager = ModelManager("cpu", "cpu", budget_bytes=10 * SIZE)
    manager.load([one])
    w_one = base.model[1].weight.clone()
    manager.load([two])
    assert len(manager.loaded()) == 1 and manager.is_loaded(two) and not manager.is_loaded(one)
    assert not torch.equal(base.model[1].weight, w_one)
    manager.load([one])
    assert torch.equal(base.model[1].weight, w_one)
    manager.load([base])
    assert all(torch.equal(v, original[k]) for k, v in base.model.state_dict().items())
    with pytest.raises(ValueError, match="two different patch sets"):
        manager.load([one, two])


def test_too_big_without_low_memory_loads_whole_with_a_warning(caplog):
    (a,) = patchers("a")
    manager = ModelManager("cpu", "cpu", budget_bytes=SIZE // 2)
    with caplog.at_level(logging.WARNING, logger="diffusion.memory"):
        manager.load([a])
    assert manager.loaded() == [("a", SIZE)]
    assert "loading anyway" in caplog.text


def hooks_on(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_streaming_keeps_what_fits_and_hooks_the_rest():
    (a,) = patchers("a")
    layer = SIZE // DEPTH
    manager = ModelManager("cpu", "cpu", budget_bytes=layer + layer // 2, low_memory=True)
    manager.load([a])
    streamer = manager._loaded[id(a.model)].streamer
    assert streamer is not None
    assert streamer.resident == [a.model[0]] and streamer.streamed == [a.model[1], a.model[2]]
    assert manager.loaded() == [("a", layer)]
    manager.unload_all()
    assert hooks_on(a.model) == 0


def test_streaming_moves_weights_in_for_the_forward_and_out_after():
    (a,) = patchers("a")
    manager = ModelManager("cpu", "cpu", budget_bytes=0, low_memory=True)
    x = torch.randn(3, WIDTH)
    reference = a.model(x)
    manager.load([a])
    layer = a.model[1]
    resting = layer.weight.data_ptr()
    seen = []
    spy = layer.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr()))
    out = a.model(x)
    spy.remove()
    assert seen and seen[0] != resting, "the forward must run on a copy brought in for it"
    assert layer.weight.data_ptr() == resting, "after the forward the resting weights are back"
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)  # same weights in other memory


@pytest.mark.parametrize("fraction", [0, 3])
def test_streamed_unet_with_patches_matches_the_loaded_one(fraction):
    unet = tiny_unet(TINY_SD1, seed=4)
    inputs = unet_inputs(TINY_SD1)
    base = ModelPatcher(unet, "cpu", "cpu", name="unet")
    lora = base.clone()
    gen = torch.Generator().manual_seed(5)
    w = unet.input_blocks[1][1].proj_in.weight
    lora.add_patches({"input_blocks.1.1.proj_in.weight": LoraDelta(
        torch.randn(w.shape[0], 4, generator=gen), torch.randn(4, w.shape[1], generator=gen), alpha=2.0)})
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        plain = unet(*inputs)
        lora.patch()
        patched = unet(*inputs)
        lora.unpatch()
    assert not torch.allclose(plain, patched)
    manager = ModelManager("cpu", "cpu", budget_bytes=fraction * base.model_nbytes() // 10, low_memory=True)
    for patcher, expected in [(lora, patched), (base, plain), (lora, patched)]:
        with manager.use([patcher]) as (module,), torch.no_grad():
            streamer = manager._loaded[id(unet)].streamer
            assert streamer is not None and len(streamer.streamed) > 0
            torch.testing.assert_close(module(*inputs), expected, rtol=0, atol=1e-6)
    manager.unload_all()
    assert hooks_on(unet) == 0
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())


def test_streamed_clip_matches_the_loaded_one():
    clip = tiny_clip(6, projection=16)
    ids = clip_ids()
    with torch.no_grad():
        reference = clip(input_ids=ids)
    manager = ModelManager("cpu", "cpu", budget_bytes=0, low_memory=True)
    (module,) = manager.load([ModelPatcher(clip, "cpu", "cpu")])
    with torch.no_grad():
        out = module(input_ids=ids)
    # the same weights, brought in layer by layer: equal up to float32 summation order
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, reference.text_embeds, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_to_cuda_keeps_weights_on_the_cpu_between_forwards():
    (a,) = patchers("a")
    x = torch.randn(3, WIDTH)
    reference = a.model(x)
    manager = ModelManager("cuda", "cpu", budget_bytes=0, low_memory=True)
    manager.load([a])
    devices = []
    spy = a.model[2].register_forward_pre_hook(lambda m, args: devices.append(m.weight.device.type))
    out = a.model(x)  # input on the CPU: the streamed layer moves it
    spy.remove()
    assert devices == ["cuda"] and out.device.type == "cuda"
    assert all(p.device.type == "cpu" for p in a.model.parameters())
    torch.testing.assert_close(out.cpu(), reference, rtol=1e-3, atol=1e-3)
    manager.unload_all()
