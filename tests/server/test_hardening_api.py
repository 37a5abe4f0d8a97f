"""What an attack on the JSON routes found: DNS rebinding, one request failing others' commits, non-finite
numbers, deep nesting and huge numbers, and methods the routes do not serve."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest

from server.json_values import JsonValueError, check_json_value, dumps, parse_json
from server.store import AddRequest, Store

PROMPT = {"1": {"class_type": "Number", "inputs": {"value": 1}},
          "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def strict_json(data: bytes):
    """What a browser's JSON.parse accepts: no NaN, no Infinity."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(data, parse_constant=refuse)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--allow-host", "alias.test")


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# DNS rebinding ------------------------------------------------------------------------------------
def test_a_loopback_server_refuses_other_host_names(server):
    status, body = server.json("POST", "/prompt?wait=20", {"prompt": PROMPT})
    assert status == 200
    for host in ("evil.example", f"evil.example:{server.port}", "10.1.2.3", "127.0.0.1.evil.example"):
        headers = {"Host": host, "Origin": "http://other.example"}
        status, body = server.json("POST", "/history", {"clear": True}, headers=headers)
        assert status == 403 and body["error"]["type"] == "forbidden_host", host
        assert host.split(":")[0] in body["error"]["message"]
        assert server.json("GET", "/queue", headers={"Host": host})[0] == 403  # with no Origin too
    assert server.json("GET", "/history")[1]  # nothing was cleared
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "127.0.0.2",
                 "app.localhost", "alias.test", f"ALIAS.test:{server.port}"):
        assert server.json("GET", "/queue", headers={"Host": host})[0] == 200, host


def test_cross_origin_is_judged_against_a_host_of_ours(server):
    status, body = server.json("POST", "/history", {"clear": False},
                               headers={"Host": f"127.0.0.1:{server.port}", "Origin": "http://other.example"})
    assert status == 403 and body["error"]["type"] == "forbidden_origin"
    origin = f"http://alias.test:{server.port}"
    assert server.json("GET", "/queue", headers={"Host": f"alias.test:{server.port}", "Origin": origin})[0] == 200


# one request's error stays its own --------------------------------------------------------------------
def test_a_request_the_database_refuses_fails_alone(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    try:
        batch = [AddRequest(f"p{i}", {"i": i}, {}, [], None, False) for i in range(5)]
        batch[2].prompt_id = "\ud800"  # SQLite cannot encode a lone surrogate
        store.commit(batch)
        assert batch[2].error is not None and batch[2].item is None
        assert [r.item.prompt_id for i, r in enumerate(batch) if i != 2] == ["p0", "p1", "p3", "p4"]
        assert [item.prompt_id for item in store.pending()] == ["p0", "p1", "p3", "p4"]
        assert store.queue_remaining() == 4
        numbers = [r.item.number for i, r in enumerate(batch) if i != 2]
        assert numbers == sorted(numbers) and len(set(numbers)) == 4
    finally:
        store.close()


def test_unencodable_strings_are_refused_and_never_fail_other_submissions(server):
    prompt = json.dumps(PROMPT)
    bad_bodies = [f'{{"prompt": {prompt}, "prompt_id": "\\ud800"}}',
                  f'{{"prompt": {prompt}, "client_id": "\\udfff x"}}',
                  json.dumps({"prompt": PROMPT, "extra_data": {"note": "x"}}).replace('"x"', '"\\ud83d"')]
    results: list[tuple[str, int]] = []

    def submit(kind: str, raw: bytes) -> None:
        results.append((kind, server.json("POST", "/prompt", raw=raw,
                                          headers={"Content-Type": "application/json"})[0]))

    threads = []
    for round_ in range(5):
        for i in range(12):
            body = {"prompt": PROMPT, "prompt_id": f"ok-{round_}-{i}"}
            threads.append(threading.Thread(target=submit, args=("ok", json.dumps(body).encode())))
        threads += [threading.Thread(target=submit, args=("bad", raw.encode())) for raw in bad_bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for kind, status in results if kind == "ok"] == [200] * 60
    assert [status for kind, status in results if kind == "bad"] == [400] * 15
    _, body = server.json("POST", "/prompt", raw=bad_bodies[0].encode(),
                               headers={"Content-Type": "application/json"})
    assert body["error"]["type"] == "invalid_json" and "prompt_id" in body["error"]["message"]


# non-finite numbers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_where_they_come_in(server, literal):
    prompt = json.dumps({"1": {"class_type": "Power", "inputs": {"base": 2.0, "exponent": 1.0}},
                         "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
    for raw in (f'{{"prompt": {prompt.replace("2.0", literal, 1)}}}',
                f'{{"prompt": {prompt}, "extra_data": {{"x": [{literal}]}}}}',
                f'{{"prompt": {prompt}, "number": {literal}}}'):
        status, body = server.json("POST", "/prompt", raw=raw.encode(), headers={"Content-Type": "application/json"})
        assert status == 400 and "finite" in body["error"]["message"], raw
    status, _ = server.json("POST", "/queue", raw=f'{{"clear": {literal}}}'.encode(),
                            headers={"Content-Type": "application/json"})
    assert status == 400


def test_a_float_input_must_be_finite_in_validation():
    from graph.node import Float, Node
    from graph.registry import NodeRegistry
    from graph.validation import validate_prompt
    from tests.graph.testnodes import NODE_CLASSES

    class Scale(Node):
        category = "test"
        inputs = [Float("factor", default=1.0)]  # no min or max: only finiteness stops a NaN
        outputs = []
        output_node = True

        def execute(self, factor):
            return ()

    registry = NodeRegistry()
    for cls in [*NODE_CLASSES, Scale]:
        registry.register(cls)
    for value in (float("nan"), float("inf"), "nan", "-inf", 10**400):
        result = validate_prompt({"1": {"class_type": "Scale", "inputs": {"factor": value}}}, registry, None)
        assert not result.ok, value
        error = result.node_errors["1"]["errors"][0]
        assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == "factor"
        strict_json(dumps(result.response()).encode())  # the error itself is readable by JSON.parse
    assert validate_prompt({"1": {"class_type": "Scale", "inputs": {"factor": "2.5"}}}, registry, None).ok


def test_non_finite_node_results_are_never_emitted(server):
    prompt = {"1": {"class_type": "Power", "inputs": {"base": 10.0, "exponent": 400.0}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    status, _, data = server.request("POST", "/prompt?wait=20", {"prompt": prompt, "prompt_id": "inf-result"})
    assert status == 200 and strict_json(data)["outputs"]["2"] == {"values": [None]}
    for path in ("/history", "/history/inf-result", "/queue"):
        status, _, data = server.request("GET", path)
        assert status == 200
        strict_json(data)
    assert strict_json(server.request("GET", "/history/inf-result")[2])["inf-result"]["outputs"]["2"] == \
        {"values": [None]}


def test_events_never_carry_non_finite_numbers(server):
    prompt = {"1": {"class_type": "Power", "inputs": {"base": 10.0, "exponent": 400.0}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}

    async def run() -> list:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws?clientId=nan") as ws:
            await ws.receive(timeout=10)  # status
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": "nan"}) as reply:
                assert reply.status == 200
            texts = []
            while True:
                message = await ws.receive(timeout=30)
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                texts.append(message.data)
                event = strict_json(message.data.encode())
                if event["type"] == "executing" and event["data"]["node"] is None:
                    return texts
    texts = asyncio.run(run())
    executed = [strict_json(t.encode()) for t in texts if '"executed"' in t]
    assert executed and executed[0]["data"]["output"] == {"values": [None]}


# nesting and huge numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), [("POST", "/prompt"), ("POST", "/queue"), ("POST", "/history"),
                                              ("POST", "/interrupt"), ("POST", "/free"),
                                              ("PUT", "/workflows/deep.json"), ("POST", "/api/prompt")])
def test_deeply_nested_json_is_a_400_on_every_json_route(server, method, path):
    for levels in (101, 995, 5000, 200_000):
        raw = f'{{"prompt": {deep(levels)}}}'.encode()
        status, body = server.json(method, path, raw=raw, headers={"Content-Type": "application/json"})
        assert status == 400 and body["error"]["type"] == "invalid_json", (path, levels, body)
        assert "nested" in body["error"]["message"]


def test_nesting_up_to_the_limit_is_accepted():
    assert parse_json(deep(99)) is not None
    check_json_value({"a": [[{"b": 1.5}]]})
    with pytest.raises(JsonValueError, match=r"a\.0\.1\.b"):
        check_json_value({"a": [[1, {"b": float("nan")}]]})
    with pytest.raises(JsonValueError, match="nested more than 100"):
        check_json_value(json.loads(deep(102)))


def test_the_websocket_survives_a_deeply_nested_message(server):
    async def run() -> dict:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws?clientId=deep") as ws:
            await ws.receive(timeout=10)
            await ws.send_str(deep(100_000))
            async with session.post(f"{server.url}/prompt", json={"prompt": PROMPT, "client_id": "deep"}):
                pass
            while True:
                event = json.loads((await ws.receive(timeout=30)).data)
                if event["type"] == "executing":
                    return event
    assert asyncio.run(run())["type"] == "executing"


def test_huge_numbers_in_queries_and_bodies(server):
    for query in ("offset=" + "9" * 30, "max_items=" + "9" * 30, "offset=1&max_items=" + "9" * 400,
                  "offset=" + "9" * 4000):
        status, body = server.json("GET", f"/history?{query}")
        assert status == 200 and isinstance(body, dict), query
    assert server.json("GET", "/history?offset=" + "9" * 5000)[0] == 400  # past Python's int parsing limit
    for number in ("1" + "0" * 400, "-" + "9" * 400, "1e300"):
        raw = f'{{"prompt": {json.dumps(PROMPT)}, "number": {number}}}'.encode()
        status, body = server.json("POST", "/prompt", raw=raw, headers={"Content-Type": "application/json"})
        assert status == 400 and body["error"]["type"] == "invalid_number", number
    status, body = server.json("POST", "/prompt", {"prompt": PROMPT, "number": 12345678})
    assert status == 200 and body["number"] == 12345678


# methods ---------------------------------------------------------------------------------------------------
def test_routes_answer_as_the_openapi_document_says(server):
    status, body = server.json("POST", "/free", raw=b"")
    assert status == 400 and body["error"]["type"] == "invalid_json"
    assert server.json("POST", "/free", {"unload_models": False})[0] == 200
    assert server.json("POST", "/interrupt", raw=b"")[0] == 200  # its body is optional
    for raw in (b"not json", b"[1]", b"\xff\xfe"):
        status, body = server.json("POST", "/interrupt", raw=raw, headers={"Content-Type": "application/json"})
        assert status == 400 and body["error"]["type"] == "invalid_json", raw
    for path in ("/queue", "/api/object_info", "/history", "/system_stats", "/openapi.json", "/prompt"):
        get_status, get_headers, _ = server.request("GET", path)
        status, headers, data = server.request("HEAD", path)
        assert (status, data) == (get_status, b""), path
        assert headers["content-type"] == get_headers["content-type"]
    for method, path, allowed in [("PUT", "/interrupt", "POST"), ("GET", "/interrupt", "POST"),
                                  ("HEAD", "/free", "POST"), ("GET", "/api/upload/image", "POST"),
                                  ("POST", "/prompt/abc", "DELETE"), ("DELETE", "/queue", "GET, HEAD, POST"),
                                  ("PATCH", "/workflows/x.json", "DELETE, GET, HEAD, PUT")]:
        status, headers, data = server.request(method, path)
        assert status == 405 and headers["allow"].replace(" ", "") == allowed.replace(" ", ""), (method, path)
        if method != "HEAD":
            assert json.loads(data)["error"]["type"] == "method_not_allowed"
            assert allowed in json.loads(data)["error"]["message"]


def test_every_response_forbids_content_sniffing(server):
    for method, path in [("GET", "/queue"), ("GET", "/nope.html"), ("PUT", "/interrupt"), ("GET", "/"),
                         ("GET", "/view?filename=missing.png"), ("POST", "/prompt")]:
        status, headers, _ = server.request(method, path)
        assert headers.get("x-content-type-options") == "nosniff", (method, path, status)
