"""Shared fixtures for node tests: a data directory with tiny random checkpoints of each family."""

from __future__ import annotations

import pytest

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from graph.executor import Executor
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment

CHECKPOINTS = {"sd1.safetensors": ("sd1", {}), "sd1-inpaint.safetensors": ("sd1", {"inpaint": True}),
               "sd2-v.safetensors": ("sd2", {"prediction": "v"}), "sdxl.safetensors": ("sdxl", {}),
               "sdxl-refiner.safetensors": ("sdxl_refiner", {})}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, (family, options) in CHECKPOINTS.items():
        write_random_checkpoint(root / name, family, seed=len(name), **options)
    return root


class Engine:
    """A registry, an environment and an executor. Models run in the dtype `pick_dtype` chooses: bf16 on CPUs with
    native bf16 matmuls, fp32 elsewhere; tests that need fp32 force it, the others compare with a tolerance."""

    def __init__(self, data_dir, model_dir, previews=False):
        self.env = Environment(data_dir, extra_model_dirs={"checkpoints": [model_dir]})
        self.env.ensure_dirs()
        self.registry = build_registry(self.env, plugins=False)
        self.executor = Executor(env=self.env, previews=previews)
        self.events = []

    def run(self, prompt, prompt_id="p"):
        validation = validate_prompt(prompt, self.registry, self.env)
        assert validation.ok, validation.response()
        self.events = []
        result = self.executor.execute(validation.prompt, prompt_id, lambda e, d: self.events.append((e, d)))
        assert result.status == "success", result.error and result.error["exception_message"]
        return result

    def failure(self, prompt) -> dict:
        """Run a valid prompt that must fail at execution, in an executor of its own (nothing cached), and return
        the error (node_id, node_type, exception_message, ...)."""
        validation = validate_prompt(prompt, self.registry, self.env)
        assert validation.ok, validation.response()
        result = Executor(env=self.env).execute(validation.prompt, "p", lambda event, data: None)
        assert result.status == "error"
        return result.error

    def error(self, prompt) -> str:
        """The failing node's message of a valid prompt that must fail at execution."""
        return self.failure(prompt)["exception_message"]

    def outputs(self, prompt, node_id, prompt_id="p"):
        """Run and return the cached output values of one node."""
        self.run(prompt, prompt_id)
        keys = self.executor.cache_keys(validate_prompt(prompt, self.registry, self.env).prompt)
        return self.executor.cache.get(keys[node_id]).outputs


@pytest.fixture
def engine(tmp_path, model_dir):
    return Engine(tmp_path / "data", model_dir)
