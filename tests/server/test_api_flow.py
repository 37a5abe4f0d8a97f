"""The API as a ComfyUI client uses it, against a real server process (auth off, loopback)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import aiohttp
import pytest
from PIL import Image

from tests.graph.test_ui_format import ui_workflow
from tests.server.harness import multipart


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    return start_server("--web-root", str(tmp_path_factory.mktemp("noweb")))


def image_prompt(steps=3, value=0.25, save="SaveImage"):
    """MakeImage -> PreviewSteps (progress + previews) -> SaveImage. A tiny-checkpoint txt2img workflow
    replaces this once the SD nodes exist; the assertions on events, history and /view stay the same."""
    save_inputs = {"images": ["2", 0]} | ({"filename_prefix": "flow"} if save == "SaveImage" else {})
    return {"1": {"class_type": "MakeImage", "inputs": {"width": 24, "height": 16, "value": value}},
            "2": {"class_type": "PreviewSteps", "inputs": {"images": ["1", 0], "steps": steps, "delay": 0}},
            "3": {"class_type": save, "inputs": save_inputs}}


def sum_prompt(a, b=1):
    return {"1": {"class_type": "Number", "inputs": {"value": a}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": b}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def blocker_prompt(name, value=0):
    return {"1": {"class_type": "Number", "inputs": {"value": value}},
            "2": {"class_type": "WaitForFile", "inputs": {"x": ["1", 0], "name": name, "timeout": 60}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def submit(server, prompt, **fields):
    status, body = server.json("POST", "/prompt", {"prompt": prompt, **fields})
    assert status == 200, body
    return body["prompt_id"]


def wait_history(server, prompt_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = server.json("GET", f"/history/{prompt_id}")
        assert status == 200
        if body:
            return body[prompt_id]
        time.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not finish")


def wait_running(server, prompt_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = server.json("GET", "/queue")[1]["queue_running"]
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not start")


def release(server, name):
    (server.data_dir / "signals" / name).touch()


def event_names(entry):
    return [m[0] for m in entry["status"]["messages"]]


async def collect(ws, until_prompt, timeout=30.0):
    """Text events and binary frames until `executing` with node null for until_prompt (a prompt id, or a
    collection of them: until every one has ended)."""
    open_ids = {until_prompt} if isinstance(until_prompt, str) else set(until_prompt)
    events, frames = [], []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                frames.append(msg.data)
                continue
            event = json.loads(msg.data)
            events.append(event)
            data = event["data"]
            if event["type"] == "executing" and data.get("node") is None:
                open_ids.discard(data.get("prompt_id"))
                if not open_ids:
                    break
    return events, frames


def test_comfyui_client_flow(server):
    """ws connect → POST /prompt → execution_start … executing … progress … executed … executing null
    → /history → /view, and the image decodes."""
    async def flow():
        client_id, prompt_id = uuid.uuid4().hex, uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            first = json.loads((await ws.receive()).data)
            assert first["type"] == "status" and first["data"]["sid"] == client_id
            assert "queue_remaining" in first["data"]["status"]["exec_info"]
            async with session.post(f"{server.url}/prompt", json={
                    "prompt": image_prompt(), "client_id": client_id, "prompt_id": prompt_id}) as response:
                assert response.status == 200
                assert (await response.json())["prompt_id"] == prompt_id
            return prompt_id, *(await collect(ws, prompt_id))

    prompt_id, events, frames = asyncio.run(flow())
    types = [e["type"] for e in events if e["type"] != "status"]
    assert types[0] == "execution_start" and types[1] == "execution_cached"
    assert types.index("executing") < types.index("progress") < types.index("executed")
    assert types[-2:] == ["execution_success", "executing"]
    assert all(e["data"]["prompt_id"] == prompt_id for e in events if e["type"] != "status")
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "2"), (2, 3, "2"), (3, 3, "2")]
    assert len(frames) == 3
    kind, fmt = struct.unpack(">II", frames[0][:8])
    assert (kind, fmt) == (1, 1)
    assert Image.open(io.BytesIO(frames[0][8:])).size == (24, 16)
    executed = next(e["data"] for e in events if e["type"] == "executed")
    assert executed["node"] == "3"
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert entry["prompt"][1] == prompt_id and entry["prompt"][4] == ["3"]
    images = entry["outputs"]["3"]["images"]
    assert images == executed["output"]["images"]
    for image in images:
        status, headers, data = server.request(
            "GET", f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}")
        assert status == 200 and headers["content-type"] == "image/png"
        decoded = Image.open(io.BytesIO(data))
        assert decoded.size == (24, 16)
        assert decoded.convert("RGB").getpixel((0, 0)) == (64, 64, 64)


def test_preview_metadata_frames_for_clients_that_ask(server):
    async def flow():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/api/ws?clientId={client_id}") as ws:
            await ws.receive()
            await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            flags = json.loads((await ws.receive()).data)
            assert flags["type"] == "feature_flags" and flags["data"]["supports_preview_metadata"] is True
            prompt_id = submit(server, image_prompt(steps=1, value=0.75), client_id=client_id)
            return prompt_id, await collect(ws, prompt_id)

    prompt_id, (_, frames) = asyncio.run(flow())
    kind, length = struct.unpack(">II", frames[0][:8])
    meta = json.loads(frames[0][8:8 + length])
    assert kind == 4 and meta["prompt_id"] == prompt_id and meta["node_id"] == "2"
    assert meta["image_type"] == "image/jpeg"
    assert Image.open(io.BytesIO(frames[0][8 + length:])).size == (24, 16)


def test_routing_without_client_id_broadcasts_progress_only(server):
    async def flow():
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws") as ws:
            await ws.receive()
            prompt_id = submit(server, image_prompt(steps=2, value=0.1))
            entry = await asyncio.to_thread(wait_history, server, prompt_id)
            seen = []
            while True:
                try:
                    msg = await ws.receive(timeout=0.5)
                except TimeoutError:
                    break
                seen.append(msg)
            return entry, seen

    entry, seen = asyncio.run(flow())
    texts = [json.loads(m.data) for m in seen if m.type == aiohttp.WSMsgType.TEXT]
    assert entry["status"]["status_str"] == "success"
    assert [t["data"]["value"] for t in texts if t["type"] == "progress"] == [1, 2]
    assert not {t["type"] for t in texts} & {"executing", "executed", "execution_start", "execution_success"}
    assert sum(m.type == aiohttp.WSMsgType.BINARY for m in seen) == 2


def test_reconnect_with_client_id_resumes(server):
    """Events sent while the client was away arrive when it reconnects with its clientId."""
    async def flow():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
                await ws.receive()
            prompt_id = submit(server, sum_prompt(11, 12), client_id=client_id)
            await asyncio.to_thread(wait_history, server, prompt_id)
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
                return prompt_id, await collect(ws, prompt_id)

    prompt_id, (events, _) = asyncio.run(flow())
    assert events[0]["type"] == "status"
    executed = [e["data"] for e in events if e["type"] == "executed"]
    assert executed == [{"node": "3", "display_node": "3", "output": {"values": [23]}, "prompt_id": prompt_id}]


def test_failed_prompt_ends_with_executing_null_and_error_history(server):
    async def flow():
        client_id = uuid.uuid4().hex
        prompt = {"1": {"class_type": "Number", "inputs": {"value": 3}},
                  "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},
                  "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            await ws.receive()
            prompt_id = submit(server, prompt, client_id=client_id)
            return prompt_id, await collect(ws, prompt_id)

    prompt_id, (events, _) = asyncio.run(flow())
    error = next(e["data"] for e in events if e["type"] == "execution_error")
    assert error["node_id"] == "2" and "boom on 3" in error["exception_message"]
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    assert event_names(entry)[-1] == "execution_error"


def test_validation_errors_are_400_with_comfyui_shape(server):
    status, body = server.json("POST", "/prompt", {"client_id": "x"})
    assert status == 400 and body["error"]["type"] == "no_prompt" and body["node_errors"] == {}
    status, body = server.json("POST", "/prompt", {"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    status, body = server.json("POST", "/prompt", {"prompt": sum_prompt(5000)})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
    assert body["node_errors"]["1"]["dependent_outputs"] == ["3"]
    status, body = server.json("POST", "/prompt", {"prompt": {"1": {"class_type": "Number", "inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs"


def test_dropped_outputs_are_reported_in_the_200(server):
    prompt = sum_prompt(1) | {"4": {"class_type": "Number", "inputs": {"value": 9999}},
                              "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    status, body = server.json("POST", "/prompt", {"prompt": prompt, "unknown_field": [1, 2]})
    assert status == 200 and list(body["node_errors"]) == ["4"]
    assert str(uuid.UUID(body["prompt_id"])) == body["prompt_id"]  # the dashed form ComfyUI mints
    entry = wait_history(server, body["prompt_id"])
    assert list(entry["outputs"]) == ["3"] and entry["prompt"][4] == ["3"]


def test_partial_execution_targets(server):
    prompt = sum_prompt(2) | {"5": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    prompt_id = submit(server, prompt, partial_execution_targets=["5"])
    assert list(wait_history(server, prompt_id)["outputs"]) == ["5"]


def test_ui_format_prompt_is_converted(server):
    workflow = ui_workflow()
    prompt_id = submit(server, workflow)
    entry = wait_history(server, prompt_id)
    assert entry["outputs"]["5"] == {"values": [48]} and entry["outputs"]["8"] == {"values": [7]}
    assert entry["prompt"][2]["3"]["inputs"] == {"a": ["1", 0], "b": 40}
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"] == workflow


def test_explicit_prompt_id_is_kept_and_duplicates_refused(server):
    prompt_id = "my-own-id-" + uuid.uuid4().hex
    assert submit(server, sum_prompt(4), prompt_id=prompt_id) == prompt_id
    wait_history(server, prompt_id)
    status, body = server.json("POST", "/prompt", {"prompt": sum_prompt(4), "prompt_id": prompt_id})
    assert status == 400 and body["error"]["type"] == "duplicate_prompt_id"


def test_queue_order_front_number_delete_clear_and_cancel(server):
    gate = uuid.uuid4().hex
    blocker = submit(server, blocker_prompt(gate))
    wait_running(server, blocker)
    a = submit(server, sum_prompt(100))
    b = submit(server, sum_prompt(101))
    c = submit(server, sum_prompt(102), front=True)
    d = submit(server, sum_prompt(103), number=-1e9)
    queue = server.json("GET", "/queue")[1]
    assert [item[1] for item in queue["queue_pending"]] == [d, c, a, b]
    assert [item[1] for item in queue["queue_running"]] == [blocker]
    assert queue["queue_pending"][2][3] == {} and queue["queue_pending"][2][4] == ["3"]
    assert server.json("GET", "/prompt")[1] == {"exec_info": {"queue_remaining": 5}}
    assert server.json("POST", "/queue", {"delete": [b, blocker]})[0] == 200  # a running one is not deleted
    assert [item[1] for item in server.json("GET", "/queue")[1]["queue_pending"]] == [d, c, a]
    status, body = server.json("DELETE", f"/prompt/{c}")
    assert status == 200 and body == {"prompt_id": c, "cancelled": "pending"}
    cancelled = wait_history(server, c)
    assert cancelled["status"]["status_str"] == "error" and event_names(cancelled) == ["execution_interrupted"]
    assert [item[1] for item in server.json("GET", "/queue")[1]["queue_pending"]] == [d, a]
    assert server.json("POST", "/queue", {"clear": True})[0] == 200
    assert server.json("GET", "/queue")[1] == {"queue_running": [[server.json("GET", "/queue")[1][
        "queue_running"][0][0], blocker, blocker_prompt(gate), {}, ["3"]]], "queue_pending": []}
    release(server, gate)
    assert wait_history(server, blocker)["status"]["status_str"] == "success"
    assert server.json("GET", f"/history/{b}")[1] == {}
    assert server.json("DELETE", f"/prompt/{b}")[0] == 404
    assert server.json("POST", "/queue", {"delete": "nope"})[0] == 400


def test_interrupt_one_prompt_leaves_the_next_running(server):
    first = submit(server, blocker_prompt(uuid.uuid4().hex, 1))
    gate = uuid.uuid4().hex
    second = submit(server, blocker_prompt(gate, 2))
    wait_running(server, first)
    assert server.json("POST", "/interrupt", {"prompt_id": second})[0] == 200  # pending: not touched
    assert server.json("POST", "/interrupt", {"prompt_id": first})[0] == 200
    entry = wait_history(server, first)
    assert entry["status"]["status_str"] == "error" and event_names(entry)[-1] == "execution_interrupted"
    wait_running(server, second)
    release(server, gate)
    assert wait_history(server, second)["outputs"]["3"] == {"values": [2]}
    assert server.json("POST", "/interrupt", raw=b"")[0] == 200  # global, nothing running


def test_global_interrupt(server):
    prompt_id = submit(server, blocker_prompt(uuid.uuid4().hex, 3))
    wait_running(server, prompt_id)
    assert server.json("POST", "/interrupt")[0] == 200
    assert event_names(wait_history(server, prompt_id))[-1] == "execution_interrupted"


def test_cancel_running_prompt_only(server):
    running = submit(server, blocker_prompt(uuid.uuid4().hex, 4))
    after = submit(server, sum_prompt(40, 2))
    wait_running(server, running)
    status, body = server.json("DELETE", f"/prompt/{running}")
    assert status == 200 and body["cancelled"] == "running"
    assert event_names(wait_history(server, running))[-1] == "execution_interrupted"
    assert wait_history(server, after)["outputs"]["3"] == {"values": [42]}
    assert server.json("DELETE", "/api/prompt/unknown-id")[0] == 404


def test_wait_returns_outputs_or_202(server):
    status, body = server.json("POST", "/prompt?wait=20", {"prompt": sum_prompt(20, 1)})
    assert status == 200 and body["outputs"]["3"] == {"values": [21]}
    assert body["status"]["status_str"] == "success" and body["node_errors"] == {}
    gate = uuid.uuid4().hex
    status, body = server.json("POST", "/prompt?wait=0.2", {"prompt": blocker_prompt(gate, 5)})
    assert status == 202 and set(body) == {"prompt_id", "number", "node_errors"}
    release(server, gate)
    wait_history(server, body["prompt_id"])
    assert server.json("POST", "/prompt?wait=soon", {"prompt": sum_prompt(1)})[0] == 400


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_gets_the_history_entry(server):
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/done"
        prompt_id = submit(server, sum_prompt(30, 3), extra_data={"webhook": url})
        deadline = time.monotonic() + 20
        while not _Receiver.received and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        receiver.shutdown()
    assert _Receiver.received[0][prompt_id]["outputs"]["3"] == {"values": [33]}
    status, body = server.json("POST", "/prompt", {"prompt": sum_prompt(1),
                                                   "extra_data": {"webhook": "http://example.com/hook"}})
    assert status == 400 and body["error"]["type"] == "webhook_refused"
    assert server.json("POST", "/prompt", {"prompt": sum_prompt(1), "extra_data": {"webhook": "file:///x"}})[0] == 400


def test_history_paging_delete_and_temp_files(server):
    ids = [submit(server, sum_prompt(200 + i)) for i in range(4)]
    for prompt_id in ids:
        wait_history(server, prompt_id)
    everything = list(server.json("GET", "/history")[1])
    assert everything[-4:] == ids
    assert list(server.json("GET", "/history?max_items=2")[1]) == ids[-2:]
    n = len(everything)
    assert list(server.json("GET", f"/history?offset={n - 3}&max_items=2")[1]) == ids[1:3]
    assert list(server.json("GET", f"/history?offset={n - 1}")[1]) == ids[-1:]
    assert server.json("GET", "/history?max_items=x")[0] == 400
    assert server.json("POST", "/history", {"delete": [ids[0]]})[0] == 200
    assert server.json("GET", f"/history/{ids[0]}")[1] == {}
    preview = submit(server, image_prompt(steps=1, value=0.5, save="PreviewImage"))
    image = wait_history(server, preview)["outputs"]["3"]["images"][0]
    path = server.data_dir / "temp" / image["subfolder"] / image["filename"]
    assert image["type"] == "temp" and path.is_file()
    assert server.json("POST", "/history", {"clear": True})[0] == 200
    assert server.json("GET", "/history")[1] == {} and not path.exists()


def test_free_unloads_and_clears_caches(server):
    first = wait_history(server, submit(server, sum_prompt(300)))
    again = wait_history(server, submit(server, sum_prompt(300)))
    assert first["status"]["messages"][1][1]["nodes"] == []
    assert again["status"]["messages"][1][1]["nodes"] == ["1", "2", "3"]
    assert server.json("POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
    time.sleep(0.3)
    third = wait_history(server, submit(server, sum_prompt(300)))
    assert third["status"]["messages"][1][1]["nodes"] == []


def test_info_routes(server):
    (server.data_dir / "models" / "embeddings" / "nice.safetensors").write_bytes(b"x")
    (server.data_dir / "models" / "checkpoints" / "sub").mkdir(exist_ok=True)
    (server.data_dir / "models" / "checkpoints" / "sub" / "tiny.safetensors").write_bytes(b"x")
    info = server.json("GET", "/object_info")[1]
    assert {"MakeImage", "SaveImage", "LoadImage", "Show"} <= set(info)
    assert info["SaveImage"]["output_node"] is True
    one = server.json("GET", "/api/object_info/Add")[1]
    assert list(one) == ["Add"] and one["Add"]["input_order"]["required"] == ["a", "b"]
    assert server.json("GET", "/object_info/NoSuchNode") == (200, {})
    stats = server.json("GET", "/system_stats")[1]
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"] in ("cpu", "cuda")
    assert server.json("GET", "/embeddings")[1] == ["nice"]
    assert "checkpoints" in server.json("GET", "/models")[1]
    # the data directory's models, then the repository's own (the shipped demo model)
    assert server.json("GET", "/models/checkpoints")[1] == ["latentloom-shapes.safetensors",
                                                            "latentloom-shapes_128.safetensors", "sub/tiny.safetensors"]
    assert server.json("GET", "/models/nonsense")[0] == 404
    features = server.json("GET", "/features")[1]
    assert features["supports_preview_metadata"] is True and features["max_upload_size"] == 100 << 20
    assert server.json("GET", "/")[0] == 404  # no canvas in this server's web root
    assert server.json("GET", "/openapi.json")[1]["openapi"].startswith("3.")


def test_upload_view_and_load_image(server):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(buffer, format="PNG")
    body, content_type = multipart({"image": ("red.png", buffer.getvalue())})
    status, reply = server.json("POST", "/upload/image", raw=body, headers={"Content-Type": content_type})
    assert status == 200 and reply == {"name": "red.png", "subfolder": "", "type": "input"}
    status, reply = server.json("POST", "/upload/image", raw=body, headers={"Content-Type": content_type})
    assert reply["name"] == "red (1).png"
    body2, _ = multipart({"image": ("red.png", buffer.getvalue()), "overwrite": "true", "subfolder": "sub"})
    assert server.json("POST", "/api/upload/image", raw=body2, headers={"Content-Type": content_type})[1] == {
        "name": "red.png", "subfolder": "sub", "type": "input"}
    status, headers, data = server.request("GET", "/view?filename=red.png&type=input&preview=jpeg;80")
    assert status == 200 and headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(data)).size == (6, 4)
    status, _, data = server.request("GET", "/view?filename=red.png [input]&channel=a".replace(" ", "%20"))
    assert status == 200 and Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert server.json("GET", "/view?filename=missing.png")[0] == 404
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    entry = wait_history(server, submit(server, prompt))
    assert entry["status"]["status_str"] == "success"
    mask = io.BytesIO()
    Image.new("RGBA", (6, 4), (0, 0, 0, 100)).save(mask, format="PNG")
    body, content_type = multipart({"image": ("mask.png", mask.getvalue()), "original_ref": json.dumps(
        {"filename": "red.png", "subfolder": "", "type": "input"})})
    status, reply = server.json("POST", "/upload/mask", raw=body, headers={"Content-Type": content_type})
    assert status == 200
    masked = Image.open(server.data_dir / "input" / reply["name"])
    assert masked.mode == "RGBA" and masked.getpixel((0, 0)) == (255, 0, 0, 100)
    status, body = server.json("POST", "/upload/image", raw=b"x", headers={"Content-Type": "text/plain"})
    assert status == 400


def test_saved_workflows(server):
    assert server.json("GET", "/workflows")[1] == []
    assert server.json("PUT", "/workflows/my%20flow", {"nodes": [], "links": []}) == (200, {"name": "my flow.json"})
    assert server.json("GET", "/workflows")[1] == ["my flow.json"]
    assert server.json("GET", "/workflows/my%20flow.json")[1] == {"nodes": [], "links": []}
    assert server.json("PUT", "/workflows/x", [1, 2])[0] == 400
    assert server.json("DELETE", "/workflows/my%20flow")[0] == 200
    assert server.json("GET", "/workflows/my%20flow")[0] == 404
    assert server.json("DELETE", "/workflows/my%20flow")[0] == 404
