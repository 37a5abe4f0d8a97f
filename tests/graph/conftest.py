from __future__ import annotations

import pytest

from graph.executor import Executor
from graph.validation import validate_prompt
from tests.graph.testnodes import build_registry


class Runner:
    """Validates and executes prompts on one executor, recording events."""

    def __init__(self, cache=None, env=None):
        self.registry = build_registry()
        self.env = env if env is not None else {"state": {}}
        self.executor = Executor(env=self.env, cache=cache)
        self.events: list[tuple[str, dict]] = []

    def run(self, prompt, prompt_id="p1", targets=None):
        self.events = []
        validation = validate_prompt(prompt, self.registry, self.env, targets)
        assert validation.ok, validation.response()
        return self.executor.execute(validation.prompt, prompt_id, lambda e, d: self.events.append((e, d)))

    def ran(self) -> list[str]:
        return [d["node"] for e, d in self.events if e == "executing" and d["node"] is not None]


@pytest.fixture
def runner():
    return Runner()
