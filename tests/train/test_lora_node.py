"""TrainLoraFromImages on a tiny random SD1 checkpoint: it trains, reports progress, writes a LoRA that
LoraLoader loads by name and that changes generations, and leaves the shared UNet untouched."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.patches.lora import load_lora
from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from nodes.loaders import load_checkpoint_handles
from nodes.training import attention_layers, lora_path, train_lora

CAPTIONS = "\n".join(f"a large orange circle number {i}" for i in range(5))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    write_random_checkpoint(root / "tiny.safetensors", "sd1", seed=3)
    env = Environment(root / "data", extra_model_dirs={"checkpoints": [root]})
    env.ensure_dirs()
    return env


def run(env, prompt):
    registry = build_registry(env, plugins=False)
    validation = validate_prompt(prompt, registry, env)
    assert validation.ok, validation.response()
    events = []
    executor = Executor(env=env)
    result = executor.execute(validation.prompt, "p", lambda e, d: events.append((e, d)))
    assert result.status == "success", result.error
    return executor, events


def training_prompt(steps=6, name="orange"):
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 5, "color": 0xFF8714}},
        "6": {"class_type": "TrainLoraFromImages", "inputs": {
            "model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2], "images": ["5", 0], "captions": CAPTIONS,
            "steps": steps, "rank": 4, "learning_rate": 0.01, "seed": 1, "lora_name": name}},
    }


def sample_prompt(lora):
    model, clip = ["4", 0], ["4", 1]
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}}}
    if lora:
        prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                               "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["10", 0], ["10", 1]
    prompt.update({
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a large orange circle", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "3": {"class_type": "KSampler", "inputs": {"model": model, "seed": 2, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    })
    return prompt


def decoded(executor, env, prompt):
    registry = build_registry(env, plugins=False)
    keys = executor.cache_keys(validate_prompt(prompt, registry, env).prompt)
    return executor.cache.get(keys["8"]).outputs[0][0]


def test_node_trains_writes_and_loraloader_uses_it(env):
    executor, events = run(env, training_prompt())
    progress = [d for e, d in events if e == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4, 5, 6] and {p["node"] for p in progress} == {"6"}
    path = env.models_dir / "loras" / "orange.safetensors"
    tensors = load_lora(path)
    assert path.is_file() and any(k.endswith(".lora_up.weight") for k in tensors)
    lora, name = executor.cache.get(executor.cache_keys(validate_prompt(
        training_prompt(), build_registry(env, plugins=False), env).prompt)["6"]).outputs
    assert name[0] == "orange.safetensors" and set(lora[0]) == set(tensors)

    base_exec, _ = run(env, sample_prompt(None))
    lora_exec, _ = run(env, sample_prompt("orange.safetensors"))
    base = decoded(base_exec, env, sample_prompt(None))
    tuned = decoded(lora_exec, env, sample_prompt("orange.safetensors"))
    assert base.shape == tuned.shape == (1, 32, 32, 3) and not torch.allclose(base, tuned)


def test_loss_falls_and_unet_is_left_as_it_was(env):
    model, clip, vae = load_checkpoint_handles(env, "tiny.safetensors")
    with model.manager.use([model.patcher]) as (unet,):  # weights as this MODEL sees them (other tests patch)
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    assert not any(flags.values())  # a loaded checkpoint never trains
    images = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    deltas, losses = train_lora(model, clip, vae, images, CAPTIONS.splitlines(), steps=30, rank=4,
                                learning_rate=0.01, seed=0, repeats=2)
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8  # deterministic (seeded); about 0.83 here
    assert len(deltas) == len(attention_layers(unet)) and all(d.rank == 4 for d in deltas.values())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not any(m._forward_hooks for m in unet.modules())
    assert not any(d.up.requires_grad or d.down.requires_grad for d in deltas.values())
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags  # as they were: not trainable
    assert all(p.grad is None for p in unet.parameters())  # only the LoRA factors got gradients


def test_errors_name_what_is_wrong(env):
    model, clip, vae = load_checkpoint_handles(env, "tiny.safetensors")
    with pytest.raises(ValueError, match="5 images need 5 captions"):
        train_lora(model, clip, vae, torch.rand(5, 32, 32, 3), ["one"], steps=1, rank=2, learning_rate=1e-3, seed=0)
    with pytest.raises(ValueError, match="leave its folder"):
        lora_path(env.models_dir, "../escape")
    with pytest.raises(ValueError, match="empty"):
        lora_path(env.models_dir, "  ")
    assert lora_path(env.models_dir, "sub/x").name == "x.safetensors"
