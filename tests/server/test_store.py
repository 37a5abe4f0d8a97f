"""The SQLite store (order, claims, history windows, recovery) and the OpenAPI document against the routes."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.app import create_app
from server.openapi import OPERATIONS
from server.state import STATE, ServerConfig
from server.store import CRASH_REASON, DuplicatePromptId, Store, history_entry
from tests.server.harness import make_data_dir


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def test_order_is_number_then_arrival_and_front_goes_first(store):
    store.add("a", {}, {}, ["1"])
    store.add("b", {}, {}, ["1"])
    store.add("c", {}, {}, ["1"], front=True)
    store.add("d", {}, {}, ["1"], number=1.5)
    assert [i.prompt_id for i in store.pending()] == ["c", "a", "d", "b"]
    assert [store.claim_next().prompt_id for _ in range(2)] == ["c", "a"]
    assert sorted(i.prompt_id for i in store.running()) == ["a", "c"]
    assert store.queue_remaining() == 4
    assert store.state_of("c") == "running" and store.state_of("d") == "pending" and store.state_of("x") is None
    with pytest.raises(DuplicatePromptId):
        store.add("a", {}, {}, ["1"])


def test_delete_only_touches_pending(store):
    for pid in "abc":
        store.add(pid, {}, {}, [])
    store.claim_next()
    assert [i.prompt_id for i in store.delete_pending(["a", "b", "zz"])] == ["b"]
    assert store.clear_pending() == 1
    assert [i.prompt_id for i in store.running()] == ["a"]


def test_history_windows_follow_comfyui(store):
    for n in range(5):
        item = store.add(f"p{n}", {"n": n}, {}, [])
        store.finish(item.prompt_id, history_entry(item, {}, "success", True, []))
    assert list(store.history()) == ["p0", "p1", "p2", "p3", "p4"]
    assert list(store.history(max_items=2)) == ["p3", "p4"]
    assert list(store.history(max_items=2, offset=1)) == ["p1", "p2"]
    assert list(store.history(offset=3)) == ["p3", "p4"]
    assert store.history_entry("p2")["prompt"][2] == {"n": 2}
    assert [e["prompt"][1] for e in store.delete_history(["p1", "nope"])] == ["p1"]
    assert len(store.delete_history(None)) == 4 and store.history() == {}


def test_history_keeps_the_newest_max_history_entries(tmp_path):
    store = Store(tmp_path / "db.sqlite3", max_history=3)
    for n in range(5):
        item = store.add(f"p{n}", {"n": n}, {}, [])
        store.finish(item.prompt_id, history_entry(item, {}, "success", True, []))
    assert list(store.history()) == ["p2", "p3", "p4"]
    assert [e["prompt"][1] for e in store.take_dropped()] == ["p0", "p1"]
    assert store.take_dropped() == []  # each dropped entry is handed over once
    store.add("q", {}, {}, [])
    store.cancel_pending("q", lambda item: history_entry(item, {}, "error", False, []))  # a cancel is an entry too
    assert list(store.history()) == ["p3", "p4", "q"] and [e["prompt"][1] for e in store.take_dropped()] == ["p2"]
    store.close()
    lower = Store(tmp_path / "db.sqlite3", max_history=1)  # the next server keeps fewer
    assert list(lower.history()) == ["p3", "p4", "q"]
    lower.apply_history_limit()
    assert list(lower.history()) == ["q"] and len(lower.take_dropped()) == 2
    lower.close()


def test_recover_turns_running_into_failed_and_keeps_pending(tmp_path):
    first = Store(tmp_path / "db.sqlite3")
    for pid in "abc":
        first.add(pid, {}, {"client_id": "x"}, [])
    first.claim_next()
    first.close()  # as good as a crash: the 'running' row is what a killed process leaves
    second = Store(tmp_path / "db.sqlite3")
    assert second.recover() == ["a"]
    entry = second.history_entry("a")
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][0][1]["exception_message"] == CRASH_REASON
    assert [i.prompt_id for i in second.pending()] == ["b", "c"]
    assert second.recover() == []
    second.close()


def test_openapi_describes_exactly_the_routes(tmp_path):
    app = create_app(ServerConfig(data_dir=make_data_dir(tmp_path / "data"), web_root=tmp_path / "none"))
    served: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method == "HEAD" or path is None or path == "/":
            continue
        if not getattr(route.handler, "__module__", "").startswith("server."):
            continue  # a node pack's own route (PromptServer.instance is one per process, as in ComfyUI)
        served.add((route.method, path))
    bare = {(m, p) for m, p in served if not p.startswith("/api/")}
    assert bare == set(OPERATIONS)
    assert {(m, "/api" + p) for m, p in bare} == served - bare
    app[STATE].store.close()


def test_concurrent_adds_keep_their_own_numbers_and_errors(store):
    import threading

    results, errors = {}, {}

    def add(pid):
        try:
            results[pid] = store.add(pid, {"id": pid}, {}, [])
        except DuplicatePromptId as exc:
            errors[pid] = exc

    store.add("dup", {}, {}, [])
    threads = [threading.Thread(target=add, args=(f"p{i}" if i != 7 else "dup",)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert list(errors) == ["dup"] and len(results) == 39
    assert len({item.number for item in results.values()}) == 39
    assert {i.prompt_id for i in store.pending()} == {"dup", *results}
    assert all(store.state_of(pid) == "pending" for pid in results)


def test_queue_remaining_follows_every_change(store):
    def count() -> int:
        return store._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    for pid in "abcde":
        store.add(pid, {}, {}, [])
        assert store.queue_remaining() == count()
    steps = [store.claim_next, lambda: store.finish("a", {}), lambda: store.delete_pending(["c"]),
             lambda: store.cancel_pending("d", lambda item: {}), store.claim_next, store.recover, store.clear_pending]
    for step in steps:
        step()
        assert store.queue_remaining() == count()
    assert count() == 0
    store.add("f", {}, {}, [])
    reopened = Store(Path(store._db.execute("PRAGMA database_list").fetchone()[2]))
    assert reopened.queue_remaining() == 1
    reopened.close()


def test_submission_writer_batches_waiting_requests_and_keeps_their_errors(store):
    import asyncio

    from server.store import AddRequest
    from server.submissions import SubmissionWriter

    store.add("dup", {}, {}, [])
    batches: list[int] = []
    commit = store.commit
    store.commit = lambda batch: (batches.append(len(batch)), commit(batch))
    writer = SubmissionWriter(store)

    async def submit_all() -> list:
        requests = [AddRequest(f"p{i}" if i != 7 else "dup", {"i": i}, {}, [], None, False) for i in range(40)]
        with store._lock:  # the writer's first commit waits here while the other 39 queue up behind it
            tasks = [asyncio.create_task(writer.add(request)) for request in requests]
            await asyncio.sleep(0.2)
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(submit_all())
    finally:
        writer.close()
    assert isinstance(results[7], DuplicatePromptId)
    items = [r for i, r in enumerate(results) if i != 7]
    assert [item.prompt_id for item in items] == [f"p{i}" for i in range(40) if i != 7]
    assert len({item.number for item in items}) == 39
    assert sum(batches) == 40 and len(batches) <= 2, batches  # at most the first alone, then all behind it
    assert store.queue_remaining() == 40
