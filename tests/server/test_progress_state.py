"""`progress_state`: the per-node states ComfyUI's front end outlines the running node and draws progress bars from,
unit by unit and over a real server's WebSocket."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from server.progress_state import ProgressStates
from tests.server.test_api_flow import collect, image_prompt


def states(data):
    return {node: (s["state"], s["value"], s["max"]) for node, s in data["nodes"].items()}


def test_nodes_start_move_and_finish():
    tracker = ProgressStates()
    assert tracker.update("execution_start", {"prompt_id": "p"}) is None
    first = tracker.update("executing", {"node": "1", "display_node": "1", "prompt_id": "p"})
    assert states(first) == {"1": ("running", 0, 1)}
    assert first["prompt_id"] == "p" and first["nodes"]["1"]["display_node_id"] == "1"
    assert states(tracker.update("executing", {"node": "2", "prompt_id": "p"})) == {
        "1": ("finished", 1, 1), "2": ("running", 0, 1)}
    assert states(tracker.update("progress", {"value": 2, "max": 5, "node": "2", "prompt_id": "p"}))["2"] == (
        "running", 2, 5)
    assert tracker.update("progress", {"value": 1, "max": 5, "node": "9", "prompt_id": "p"}) is None  # not started
    assert states(tracker.update("executed", {"node": "2", "prompt_id": "p", "output": {}}))["2"] == (
        "finished", 5, 5)
    assert states(tracker.update("executing", {"node": "3", "prompt_id": "p"}))["3"] == ("running", 0, 1)
    end = tracker.update("execution_success", {"prompt_id": "p"})
    assert states(end) == {"1": ("finished", 1, 1), "2": ("finished", 5, 5), "3": ("finished", 1, 1)}
    assert tracker.update("executing", {"node": None, "prompt_id": "p"}) is None  # forgotten at the end


def test_error_marks_its_node_and_prompts_stay_apart():
    tracker = ProgressStates()
    tracker.update("executing", {"node": "4", "prompt_id": "a"})
    other = tracker.update("executing", {"node": "4", "prompt_id": "b"})
    assert states(other) == {"4": ("running", 0, 1)}
    failed = tracker.update("execution_error", {"prompt_id": "a", "node_id": "4", "node_type": "KSampler"})
    assert states(failed) == {"4": ("error", 0, 1)}
    assert states(tracker.update("progress", {"value": 1, "max": 2, "node": "4", "prompt_id": "b"})) == {
        "4": ("running", 1, 2)}
    assert tracker.update("execution_interrupted", {"prompt_id": "b", "node_id": "4"}) is None
    assert tracker.update("progress", {"value": 2, "max": 2, "node": "4", "prompt_id": "b"}) is None
    assert tracker.update("executing", {"node": "1"}) is None  # no prompt id: nothing to track


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    return start_server("--web-root", str(tmp_path_factory.mktemp("noweb")))


def test_server_sends_progress_state_with_each_step(server):
    async def flow():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            await ws.receive()
            async with session.post(f"{server.url}/prompt", json={"prompt": image_prompt(steps=3),
                                                                 "client_id": client_id}) as response:
                prompt_id = (await response.json())["prompt_id"]
            return prompt_id, (await collect(ws, prompt_id))[0]

    prompt_id, events = asyncio.run(flow())
    updates = [e["data"] for e in events if e["type"] == "progress_state"]
    assert all(u["prompt_id"] == prompt_id for u in updates)
    # PreviewSteps (node 2) runs 3 steps: running 1/3, 2/3, 3/3 in order, each after its `progress`
    steps = [states(u)["2"] for u in updates if "2" in u["nodes"] and states(u)["2"][0] == "running"]
    assert steps[1:] == [("running", 1, 3), ("running", 2, 3), ("running", 3, 3)]
    types = [e["type"] for e in events]
    first_progress = types.index("progress")
    assert types[first_progress + 1] == "progress_state"
    # the last one, before execution_success, has every node that ran finished
    assert types[-3:] == ["progress_state", "execution_success", "executing"]
    assert states(updates[-1]) == {"1": ("finished", 1, 1), "2": ("finished", 3, 3), "3": ("finished", 1, 1)}
