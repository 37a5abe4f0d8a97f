"""Worker threads sharing one Environment (as `latentloom serve --workers N` runs them): prompts with
different LoRAs on the same checkpoint, run at the same time, give the images each gives alone, and a
model file two threads ask for at once is loaded once."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

import nodes.loaders
from diffusion.patches.lora import kohya_text_names, kohya_unet_names, save_lora
from diffusion.patches.patcher import LoraDelta
from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from nodes.loaders import load_checkpoint_handles
from tests.nodes.test_sd_nodes import txt2img

log = logging.getLogger(__name__)

ROUNDS = 10  # the unguarded code got 36 of 40 images wrong
# (LoRA file or None, strength_model, strength_clip): two LoRAs at several strengths, and none
VARIANTS = [("a", 0.8, 1.0), ("b", 1.3, -0.6), (None, 0.0, 0.0), ("a", -0.5, 0.4)]


def write_lora(env: Environment, name: str, seed: int) -> None:
    """A rank-2 LoRA over a dozen UNet layers and a few text-encoder layers of the tiny SD1 checkpoint."""
    model, clip, _ = load_checkpoint_handles(env, "sd1.safetensors")
    unet_params = dict(model.patcher.model.named_parameters())
    text_params = dict(clip.patchers["l"].model.named_parameters())
    chosen = [(kohya, unet_params[module + ".weight"])
              for module, kohya in list(kohya_unet_names(model.family.unet, unet_params).items())[:12]]
    chosen += [(kohya, text_params[module + ".weight"])
               for module, kohya in list(kohya_text_names(clip.text)["l"].items())[:8]]
    gen = torch.Generator().manual_seed(seed)
    layers = {kohya: LoraDelta(torch.randn(weight.shape[0], 2, generator=gen),
                               torch.randn(2, weight.shape[1], generator=gen), alpha=2.0)
              for kohya, weight in chosen if weight.ndim == 2}
    (env.models_dir / "loras").mkdir(parents=True, exist_ok=True)
    save_lora(env.models_dir / "loras" / f"{name}.safetensors", layers)


def variant_prompt(lora: str | None, strength_model: float, strength_clip: float) -> dict:
    prompt = txt2img(steps=4, size=32)
    if lora is not None:
        prompt["10"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["4", 0], "clip": ["4", 1], "lora_name": f"{lora}.safetensors",
            "strength_model": strength_model, "strength_clip": strength_clip}}
        for node in ("6", "7"):
            prompt[node]["inputs"]["clip"] = ["10", 1]
        prompt["3"]["inputs"]["model"] = ["10", 0]
    return prompt


class SharedEngine:
    """One environment and registry for every thread; each run gets a fresh Executor (a worker thread's
    own), so every node runs again and only the loaded models are shared."""

    def __init__(self, data_dir, model_dir) -> None:
        self.env = Environment(data_dir, extra_model_dirs={"checkpoints": [model_dir]})
        self.env.ensure_dirs()
        self.registry = build_registry(self.env, plugins=False)

    def image(self, prompt: dict, prompt_id: str) -> torch.Tensor:
        """The decoded image (VAEDecode's float output) of one run."""
        validation = validate_prompt(prompt, self.registry, self.env)
        assert validation.ok, validation.response()
        executor = Executor(env=self.env)
        result = executor.execute(validation.prompt, prompt_id, lambda event, data: None)
        assert result.status == "success", result.error and result.error["exception_message"]
        return executor.cache.get(executor.cache_keys(validation.prompt)["8"]).outputs[0][0]


@pytest.fixture
def shared(tmp_path, model_dir):
    engine = SharedEngine(tmp_path / "data", model_dir)
    write_lora(engine.env, "a", seed=1)
    write_lora(engine.env, "b", seed=2)
    return engine


@pytest.fixture
def one_thread_per_worker():
    """Each worker thread computes with one CPU thread, as two workers on two cores would be set up (and so
    that two workers' thread pools do not fight over the cores); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_worker_threads_with_different_loras_give_the_images_each_gives_alone(shared, one_thread_per_worker):
    prompts = [variant_prompt(*variant) for variant in VARIANTS]
    shared.image(prompts[0], "warm-up")  # loads the checkpoint and the LoRA files
    began = time.perf_counter()
    alone = [shared.image(prompt, f"alone-{i}") for i, prompt in enumerate(prompts)]
    alone_s = (time.perf_counter() - began) / len(prompts)
    for i in range(len(alone)):
        for j in range(i):
            assert (alone[i] - alone[j]).abs().max() > 0.05, "the variants must give clearly different images"

    start = threading.Barrier(2)
    images: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(ROUNDS):
                start.wait(60)
                variant = (round_ + index) % len(prompts)  # the two threads always run different variants
                images[round_, index] = shared.image(prompts[variant], f"r{round_}-w{index}")
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), name=f"worker-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    log.info("one prompt alone: %.2f s; %d rounds of two prompts on two threads: %.2f s (%.2f s a round)",
             alone_s, ROUNDS, time.perf_counter() - began, (time.perf_counter() - began) / ROUNDS)
    assert not errors, errors
    assert len(images) == 2 * ROUNDS
    worst = {key: (image - alone[(key[0] + key[1]) % len(prompts)]).abs().max().item()
             for key, image in sorted(images.items())}
    wrong = {f"round {r}, worker {w}": round(d, 4) for (r, w), d in worst.items() if d > 1e-4}
    assert not wrong, f"{len(wrong)} of {len(worst)} images differ from their prompt's image alone: {wrong}"


def test_a_checkpoint_two_threads_ask_for_at_once_is_loaded_once(shared, monkeypatch):
    """The second thread arrives while the first is still reading the file: it waits for that load."""
    real_load = nodes.loaders.load_checkpoint
    first_loading, second_asking = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_load(*args, **kwargs):
        calls.append(threading.current_thread().name)
        first_loading.set()
        second_asking.wait(1.0)  # today's race: the second thread's own load arrives meanwhile
        return real_load(*args, **kwargs)

    monkeypatch.setattr(nodes.loaders, "load_checkpoint", slow_load)
    env = Environment(shared.env.data_dir, extra_model_dirs=shared.env.extra_model_dirs)
    handles: dict[str, tuple] = {}

    def ask(name: str, after: threading.Event | None) -> None:
        if after is not None:
            after.wait(10)
        handles[name] = load_checkpoint_handles(env, "sd1.safetensors")
        second_asking.set()

    threads = [threading.Thread(target=ask, args=("one", None), name="one"),
               threading.Thread(target=ask, args=("two", first_loading), name="two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert calls == ["one"]
    assert handles["one"] is handles["two"]
