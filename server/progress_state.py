"""Per-node progress of running prompts, as ComfyUI's `progress_state` WebSocket event carries it.

ComfyUI's front end (1.2x) no longer takes the running node from `executing`: it outlines every node that a
`progress_state` event says is "running", and draws a node's progress bar from its `value`/`max` there. Each event
holds every node of the prompt that has started (ComfyUI leaves pending ones out), so a client that missed one event
is corrected by the next. The states follow the executor's own events, wherever the prompt runs (a thread or a Ray
actor): `executing` starts a node (and finishes the one before: a prompt runs one node at a time), `progress`
moves it, `executed` finishes it, `execution_error` marks the failing node; the end of a prompt finishes what was
still running.
"""

from __future__ import annotations

import threading
from typing import Any

RUNNING, FINISHED, ERROR = "running", "finished", "error"
ENDS = ("execution_success", "execution_error", "execution_interrupted")


class ProgressStates:
    """The node states of each running prompt; `update` is called with every event the executor emits."""

    def __init__(self) -> None:
        self._prompts: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def update(self, event: str, data: dict[str, Any]) -> dict[str, Any] | None:
        """The `progress_state` data this event changes into (None when it changes nothing a client shows)."""
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            return None
        with self._lock:
            if event == "execution_interrupted":  # the front end drops every state on its own
                self._prompts.pop(prompt_id, None)
                return None
            nodes = self._prompts.setdefault(prompt_id, {}) if event not in ENDS else self._prompts.pop(prompt_id, {})
            if not self._apply(prompt_id, nodes, event, data):
                return None
            return {"prompt_id": prompt_id, "nodes": {node: dict(state) for node, state in nodes.items()}}

    @staticmethod
    def _apply(prompt_id: str, nodes: dict[str, dict[str, Any]], event: str, data: dict[str, Any]) -> bool:
        node = data.get("node_id") if event == "execution_error" else data.get("node")
        node = None if node is None else str(node)
        if event == "execution_error" and node is not None:  # before the others finish: it stays where it failed
            state = nodes.setdefault(node, {"value": 0, "max": 1, "node_id": node, "prompt_id": prompt_id,
                                            "display_node_id": node, "parent_node_id": None, "real_node_id": node})
            state["state"] = ERROR
        if event in ("executing", "execution_success", "execution_error"):
            for state in nodes.values():  # one node runs at a time: whatever ran before is done
                if state["state"] == RUNNING:
                    state["state"], state["value"] = FINISHED, state["max"]
        if event == "executing":
            if node is None:
                return bool(nodes)
            display = str(data.get("display_node") or node)
            nodes[node] = {"value": 0, "max": 1, "state": RUNNING, "node_id": node, "prompt_id": prompt_id,
                           "display_node_id": display, "parent_node_id": None, "real_node_id": node}
            return True
        if event == "progress" and node in nodes:
            value, total = data.get("value"), data.get("max")
            if not isinstance(value, int | float) or not isinstance(total, int | float):
                return False
            nodes[node].update(value=value, max=max(total, 1), state=RUNNING)
            return True
        if event == "executed" and node in nodes:
            nodes[node].update(state=FINISHED, value=nodes[node]["max"])
            return True
        return event in ("execution_success", "execution_error") and bool(nodes)

    def forget(self, prompt_id: str) -> None:
        """Drop a prompt's states (its end was announced; a worker that died sent no end event)."""
        with self._lock:
            self._prompts.pop(prompt_id, None)
