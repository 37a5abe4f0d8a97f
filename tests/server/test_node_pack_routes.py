"""A ComfyUI node pack (tests/packs/v1_pack) on the server, through real HTTP: its WEB_DIRECTORY at
/extensions/<pack>/ and in GET /extensions, its own route behind our token and origin rules, and its messages
and ui results reaching the WebSocket and the history."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from graph.registry import NodeRegistry
from nodes.environment import Environment
from server.app import create_app
from tests.server.inprocess import InProcessServer

PACK = Path(__file__).resolve().parents[1] / "packs" / "v1_pack"


class PackServer(InProcessServer):
    """The in-process server with the test pack in its data directory's custom_nodes/."""

    async def _start(self) -> None:
        shutil.copytree(PACK, self.data_dir / "custom_nodes" / "v1_pack", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        registry = NodeRegistry()
        registry.discover_folder(self.data_dir / "custom_nodes", Environment(self.data_dir))
        self.app = create_app(self.config, registry)
        from aiohttp import web

        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = PackServer(tmp_path_factory.mktemp("packs") / "data").start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    started = PackServer(tmp_path_factory.mktemp("locked") / "data", auth_token="s3cret").start()
    yield started
    started.stop()


def test_web_directory_is_listed_and_served(server):
    assert server.json("GET", "/extensions") == (200, ["/extensions/v1_pack/js/v1_pack.js"])
    assert server.json("GET", "/api/extensions")[1] == ["/extensions/v1_pack/js/v1_pack.js"]
    status, headers, body = server.request("GET", "/extensions/v1_pack/js/v1_pack.js")
    assert status == 200 and b"V1_PACK_EXTENSION" in body and "javascript" in headers["content-type"]
    assert server.request("GET", "/extensions/v1_pack/notes.txt")[0] == 200
    assert server.request("GET", "/extensions/v1_pack/..%2F__init__.py")[0] == 404
    assert server.request("GET", "/extensions/v1_pack/%2E%2E/__init__.py")[0] == 404
    assert server.request("GET", "/extensions/other_pack/a.js")[0] == 404


def test_pack_route_is_mounted_at_both_prefixes(server):
    assert server.json("GET", "/v1_pack/ping?q=hi") == (200, {"pong": "hi", "max": 16384})
    assert server.json("GET", "/api/v1_pack/ping?q=x") == (200, {"pong": "x", "max": 16384})


def test_pack_route_obeys_origin_and_token(server, locked):
    assert server.json("GET", "/v1_pack/ping", headers={"Origin": "http://evil.example"})[0] == 403
    assert locked.json("GET", "/v1_pack/ping")[0] == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert locked.json("GET", "/v1_pack/ping?q=t", headers=auth) == (200, {"pong": "t", "max": 16384})
    assert locked.request("GET", "/extensions/v1_pack/js/v1_pack.js")[0] == 200  # scripts are public, as the page


def test_send_sync_and_ui_results_reach_the_client_and_history(server):
    client_id = uuid.uuid4().hex
    prompt = {"h": {"class_type": "V1Hello", "inputs": {"sampler": "euler", "scheduler": "normal"}}}

    frames: list[bytes] = []

    async def exchange() -> tuple[str, list[dict]]:
        messages: list[dict] = []
        socket = f"{server.url}/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(socket) as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = await ws.receive(timeout=30)
                if message.type == aiohttp.WSMsgType.BINARY:
                    frames.append(message.data)
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                messages.append(data)
                if data["type"] in ("execution_success", "execution_error"):
                    break
        return prompt_id, messages

    prompt_id, messages = asyncio.run(exchange())
    kinds = [m["type"] for m in messages]
    assert "execution_success" in kinds, messages
    assert {"type": "v1_pack.hello", "data": {"sampler": "euler"}} in messages
    executed = next(m for m in messages if m["type"] == "executed")
    modules = ["comfy_compat.nodes", "comfy_compat.server", "comfy_compat.folder_paths"]
    assert executed["data"]["output"] == {"modules": modules}
    status, history = server.json("GET", f"/history/{prompt_id}")
    assert status == 200 and history[prompt_id]["outputs"]["h"] == {"modules": modules}
    # the pack's binary messages, as ComfyUI frames them: [u32 event][payload], big-endian
    assert struct.pack(">I", 3) + b"\x00\x00\x00\x01hraw" in frames
    assert struct.pack(">I", 3) + struct.pack(">I", 1) + b"h" + b"hello euler" in frames
    preview = next(f for f in frames if f[:8] == struct.pack(">II", 1, 2))
    image = Image.open(io.BytesIO(preview[8:]))
    assert image.format == "PNG" and image.size == (16, 8) and image.getpixel((3, 3)) == (255, 0, 0)
