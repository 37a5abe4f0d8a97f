"""`latentloom serve --workers ray` against a local Ray started by the test: two CPU workers, tiny checkpoints.

The Ray head runs in a helper process (`tests/server/ray_harness.py`: `ray.init(num_cpus=2)`, auth off, its
temp folder, HOME and TMPDIR inside the test's temporary folder) so that nothing of Ray enters the test
process; the helper also kills actors on request, and stops Ray when the module ends. The server is a real
process that joins that Ray. Single-process results come from one plain process with one torch thread, as
each CPU worker has (`single_process_outputs`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")

import aiohttp

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from tests.nodes.test_sd_nodes import txt2img
from tests.server.harness import make_data_dir
from tests.server.ray_harness import RayHead, RayServer, ray_environment, single_process_outputs
from tests.server.test_api_flow import blocker_prompt, collect, release, submit, wait_history


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    env = ray_environment(folder)
    data = make_data_dir(folder / "data")
    checkpoints = data / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_random_checkpoint(checkpoints / "a.safetensors", "sd1", seed=1)
    write_random_checkpoint(checkpoints / "b.safetensors", "sd1", seed=2)
    head = RayHead(folder, env, cpus=2)
    server = None
    try:
        server = RayServer(data, dict(env, RAY_ADDRESS=head.address), "--workers", "ray").start()
        wait_workers(server, 2)
        yield head, server
    finally:
        if server is not None:
            server.stop()
        head.stop()


def workers(server):
    status, stats = server.json("GET", "/system_stats")
    assert status == 200
    return stats["workers"]


def wait_workers(server, count, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [w for w in workers(server) if w["state"] in ("idle", "running")]
        if len(ready) >= count:
            return ready
        time.sleep(0.2)
    raise AssertionError(f"{count} workers were not ready: {workers(server)}\n{server.log()[-3000:]}")


def worker_running(server, prompt_id, other_than=None, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in workers(server):
            if w["running_prompt"] == prompt_id and w["id"] != other_than:
                return w["id"]
        time.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} is not running on a worker: {workers(server)}")


async def follow(session, url, client_id, prompt_ids, timeout=300.0):
    """Every text event and binary frame this client receives until all its prompts ended."""
    async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        return await collect(ws, prompt_ids, timeout)


def test_twenty_prompts_on_two_workers_match_single_process_runs(cluster, tmp_path):
    _, server = cluster
    prompts = [txt2img(ckpt="ab"[i % 2] + ".safetensors", seed=i, steps=2) for i in range(20)]
    ids = [uuid.uuid4().hex for _ in prompts]
    clients = {"left": [i for i in range(20) if i % 4 < 2], "right": [i for i in range(20) if i % 4 >= 2]}

    async def run():
        async with aiohttp.ClientSession() as session:
            followers = {name: asyncio.create_task(follow(session, server.url, name, [ids[i] for i in mine]))
                         for name, mine in clients.items()}
            await asyncio.sleep(0.5)  # both sockets open before anything runs
            for name, mine in clients.items():
                for i in mine:
                    async with session.post(f"{server.url}/prompt", json={
                            "prompt": prompts[i], "client_id": name, "prompt_id": ids[i]}) as response:
                        assert response.status == 200, await response.text()
            return {name: await task for name, task in followers.items()}

    received = asyncio.run(run())
    for name, mine in clients.items():
        events, frames = received[name]
        own = {ids[i] for i in mine}
        assert {e["data"]["prompt_id"] for e in events if e["type"] != "status"} == own  # nobody else's events
        for pid in own:
            types = [e["type"] for e in events if e["type"] != "status" and e["data"]["prompt_id"] == pid]
            assert types[0] == "execution_start" and types[-2:] == ["execution_success", "executing"]
            assert types.count("progress") == 2 and types.count("executed") == 1
        # a latent preview per sampler step, less those the hub skipped while this client was behind (a loaded
        # machine starves the server's event loop; previews are the one thing it drops)
        assert 0 < len(frames) <= 2 * len(mine)
        Image.open(io.BytesIO(frames[0][8:])).verify()

    reference = single_process_outputs(server.data_dir / "models" / "checkpoints", prompts, tmp_path / "single")
    files = set()
    for i, pid in enumerate(ids):
        entry = wait_history(server, pid)
        assert entry["status"]["status_str"] == "success"
        saved = entry["outputs"]["9"]["images"][0]
        files.add(saved["filename"])
        image = Image.open(server.data_dir / "output" / saved["subfolder"] / saved["filename"])
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(reference[i][0]))), f"prompt {i} differs"
        assert json.loads(image.text["prompt"]) == prompts[i]
    assert len(files) == 20  # every image landed under its own name in the server's output folder

    stats = workers(server)
    assert len(stats) == 2 and sum(w["prompts_done"] for w in stats) == 20
    assert all(w["prompts_done"] > 0 for w in stats)
    for w in stats:  # affinity: no worker loaded a checkpoint twice
        assert w["checkpoint_loads"] and all(n == 1 for n in w["checkpoint_loads"].values()), stats
        assert sorted(w["loaded_checkpoints"]) == sorted(w["checkpoint_loads"])
        assert w["host"] and w["memory_total"] > 0 and w["running_prompt"] is None


def test_cancel_and_interrupt_reach_the_worker(cluster):
    _, server = cluster
    cancelled = submit(server, blocker_prompt("never-c"))
    worker_running(server, cancelled)
    assert server.json("DELETE", f"/prompt/{cancelled}") == (200, {"prompt_id": cancelled, "cancelled": "running"})
    entry = wait_history(server, cancelled, timeout=60)
    assert [m[0] for m in entry["status"]["messages"]][-1] == "execution_interrupted"
    interrupted = submit(server, blocker_prompt("never-i"))
    worker_running(server, interrupted)
    assert server.request("POST", "/interrupt", {"prompt_id": interrupted})[0] == 200
    entry = wait_history(server, interrupted, timeout=60)
    assert entry["status"]["status_str"] == "error"
    assert [m[0] for m in entry["status"]["messages"]][-1] == "execution_interrupted"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="out of the 15-minute suite: LATENTLOOM_SLOW=1")
def test_nodes_joining_and_leaving_are_picked_up(cluster, tmp_path):
    head, server = cluster
    before = {w["id"] for w in wait_workers(server, 2)}
    node = head.add_node(tmp_path, cpus=1)
    try:
        joined = {w["id"] for w in wait_workers(server, 3, timeout=120)} - before
        assert len(joined) == 1  # the new node's CPU became a worker
    finally:
        node.terminate()
        node.wait(90)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = {w["id"] for w in workers(server) if w["state"] in ("idle", "running")}
        if ready == before:
            break
        time.sleep(0.2)
    assert ready == before, workers(server)  # its worker is gone, the others stay


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="out of the 15-minute suite: LATENTLOOM_SLOW=1")
def test_worker_killed_mid_prompt_is_replaced_and_the_prompt_retried(cluster):
    head, server = cluster
    wait_workers(server, 2)
    prompt_id = submit(server, blocker_prompt("retry-go", value=7))
    first = worker_running(server, prompt_id)
    head.kill(f"latentloom-worker-{first}")
    second = worker_running(server, prompt_id, other_than=first)
    release(server, "retry-go")
    entry = wait_history(server, prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["3"]["values"] == [7]
    retried = entry["status"]["messages"][0]
    assert retried[0] == "execution_retried" and retried[1]["worker_id"] == first
    ids = {w["id"] for w in wait_workers(server, 2)}
    assert first not in ids and second in ids  # the dead worker was replaced by a new one


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1", reason="out of the 15-minute suite: LATENTLOOM_SLOW=1")
def test_prompt_whose_workers_die_twice_is_recorded_failed(cluster):
    head, server = cluster
    wait_workers(server, 2)
    prompt_id = submit(server, blocker_prompt("never-k"))
    first = worker_running(server, prompt_id)
    head.kill(f"latentloom-worker-{first}")
    second = worker_running(server, prompt_id, other_than=first)
    head.kill(f"latentloom-worker-{second}")
    entry = wait_history(server, prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    error = entry["status"]["messages"][-1]
    assert error[0] == "execution_error" and error[1]["exception_type"] == "WorkerDied"
    assert first in error[1]["exception_message"] and second in error[1]["exception_message"]
    assert "given up after 2 runs" in error[1]["exception_message"]
    after = submit(server, txt2img(ckpt="a.safetensors", seed=3, steps=2))  # the cluster still serves
    assert wait_history(server, after, timeout=180)["status"]["status_str"] == "success"
