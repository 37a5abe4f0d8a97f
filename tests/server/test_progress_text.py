"""A node's progress text (GetImageSize's size, as ComfyUI's front end shows it on the node) reaches the prompt's
client as ComfyUI's binary TEXT frame: [u32 3][u32 len(node id)][node id][text]."""

from __future__ import annotations

import asyncio
import struct
import uuid

import aiohttp
import pytest

from tests.server.test_api_flow import collect


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    return start_server("--web-root", str(tmp_path_factory.mktemp("noweb")))


def test_get_image_size_sends_its_size_to_the_client_as_text(server):
    prompt = {"1": {"class_type": "MakeImage", "inputs": {"width": 24, "height": 16, "value": 0.5}},
              "size": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["size", 0]}}}

    async def run():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            return await collect(ws, prompt_id)

    events, frames = asyncio.run(run())
    assert any(e["type"] == "execution_success" for e in events), events
    text = struct.pack(">II", 3, 4) + b"size" + b"width: 24, height: 16\n batch size: 1"
    assert frames == [text]


def test_a_text_without_utf8_is_sent_with_replacements():
    from server.websocket import progress_text_frame

    frame = progress_text_frame("7", "bad \udc80 text").frame(with_metadata=True)
    assert frame == struct.pack(">II", 3, 1) + b"7" + b"bad ? text"
