"""kill -9 of the server during a run and during submissions, then a restart: nothing accepted is lost."""

from __future__ import annotations

import threading
import time
import uuid

from tests.server.harness import ServerProcess
from tests.server.test_api_flow import blocker_prompt, sum_prompt, wait_history, wait_running


def test_kill_during_a_run_then_restart(start_server):
    server = start_server()
    running = server.json("POST", "/prompt", {"prompt": blocker_prompt("never-" + uuid.uuid4().hex)})[1]["prompt_id"]
    wait_running(server, running)
    pending = [server.json("POST", "/prompt", {"prompt": sum_prompt(i)})[1]["prompt_id"] for i in range(3)]
    first = server.json("POST", "/prompt", {"prompt": sum_prompt(50), "front": True})[1]["prompt_id"]
    server.kill9()

    restarted = start_server(data_dir=server.data_dir)
    crashed = wait_history(restarted, running)
    assert crashed["status"]["status_str"] == "error" and not crashed["status"]["completed"]
    assert "stopped while this prompt was running" in crashed["status"]["messages"][0][1]["exception_message"]
    for i, prompt_id in enumerate(pending):
        assert wait_history(restarted, prompt_id)["outputs"]["3"] == {"values": [i + 1]}
    assert wait_history(restarted, first)["outputs"]["3"] == {"values": [51]}
    order = [pid for pid in restarted.json("GET", "/history")[1] if pid in {first, *pending}]
    assert order == [first, *pending]  # the pending ones kept their order across the restart


def test_kill_during_submissions_loses_no_accepted_prompt(start_server):
    server = start_server()
    gate = "gate-" + uuid.uuid4().hex
    blocker = server.json("POST", "/prompt", {"prompt": blocker_prompt(gate)})[1]["prompt_id"]
    wait_running(server, blocker)
    accepted: list[str] = []
    lock = threading.Lock()

    def submit_many(offset: int) -> None:
        for i in range(200):
            try:
                status, body = server.json("POST", "/prompt", {"prompt": sum_prompt(offset + i % 100)})
            except OSError:
                return
            if status == 200:
                with lock:
                    accepted.append(body["prompt_id"])

    threads = [threading.Thread(target=submit_many, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    while len(accepted) < 20:
        time.sleep(0.005)
    server.kill9()
    for thread in threads:
        thread.join()
    restarted: ServerProcess = start_server(data_dir=server.data_dir)
    queue = restarted.json("GET", "/queue")[1]  # the queue first: a prompt only ever moves queue → history
    known = {item[1] for item in queue["queue_pending"] + queue["queue_running"]}
    known |= set(restarted.json("GET", "/history")[1])
    assert blocker in known
    assert set(accepted) <= known
    (restarted.data_dir / "signals" / gate).touch()
    for prompt_id in accepted[-3:]:
        assert wait_history(restarted, prompt_id)["status"]["status_str"] == "success"
