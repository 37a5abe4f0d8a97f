"""The compatibility layer's state: the environment and registry it serves, and the server's delivery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graph.comfy_v1 import current_run


@dataclass
class CompatState:
    env: Any = None
    registry: Any = None
    # (event, data, client_id or None) -> None of each server that attached (one per process outside tests)
    publishers: list[Any] = field(default_factory=list)


STATE = CompatState()


def environment() -> Any:
    """The environment of the node running now, else the one the packs were loaded with."""
    run = current_run()
    env = getattr(run.context, "env", None) if run is not None and run.context is not None else None
    env = env if env is not None else STATE.env
    if env is None:
        raise RuntimeError("folder_paths: this pack was loaded without a data directory (no environment)")
    return env


def context() -> Any:
    """The execution context of the pack node running now (None outside a run)."""
    run = current_run()
    return run.context if run is not None else None
