"""SaveImageWebsocket against a real server: each image reaches the submitting client as a binary frame
`[u32 1][u32 2][PNG]` (ComfyUI's websockets_api_example_ws_images.py reads `out[8:]`), full size, lossless, and
never to another client."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import uuid

import aiohttp
import numpy as np
import pytest
from PIL import Image

from server.websocket import JPEG, PNG, PREVIEW_BACKLOG_LIMIT, Hub, Preview
from tests.server.test_api_flow import collect, wait_history


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    return start_server("--web-root", str(tmp_path_factory.mktemp("noweb")))


def websocket_prompt(width, height, value):
    return {"1": {"class_type": "MakeImage", "inputs": {"width": width, "height": height, "value": value}},
            "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}},
            "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}}}


def test_save_image_websocket_sends_png_frames_to_the_submitter_only(server):
    async def flow():
        client_id, prompt_id = uuid.uuid4().hex, uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws, \
                session.ws_connect(f"{server.url}/ws?clientId={uuid.uuid4().hex}") as bystander:
            await ws.receive()
            await bystander.receive()
            async with session.post(f"{server.url}/prompt", json={
                    "prompt": websocket_prompt(900, 5, 0.6), "client_id": client_id,
                    "prompt_id": prompt_id}) as response:
                assert response.status == 200, await response.text()
            events, frames = await collect(ws, prompt_id)
            stray = []
            try:
                async with asyncio.timeout(0.5):
                    async for msg in bystander:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            stray.append(msg.data)
            except TimeoutError:
                pass
            return prompt_id, events, frames, stray

    prompt_id, events, frames, stray = asyncio.run(flow())
    assert len(frames) == 2 and not stray
    for frame in frames:
        assert struct.unpack(">II", frame[:8]) == (1, 2)
        image = Image.open(io.BytesIO(frame[8:]))
        assert image.format == "PNG" and image.size == (900, 5)  # full size: no preview downscaling
        assert (np.asarray(image.convert("RGB")) == 153).all()  # 0.6 × 255, lossless
    progress = [(e["data"]["value"], e["data"]["max"], e["data"]["node"]) for e in events if e["type"] == "progress"]
    assert progress == [(1, 2, "3"), (2, 2, "3")]
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "success" and entry["outputs"] == {}


def test_metadata_clients_get_the_png_with_its_node(server):
    async def flow():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            await ws.receive()
            await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            await ws.receive()
            async with session.post(f"{server.url}/prompt", json={
                    "prompt": websocket_prompt(4, 3, 0.2), "client_id": client_id}) as response:
                prompt_id = (await response.json())["prompt_id"]
            return prompt_id, await collect(ws, prompt_id)

    prompt_id, (_, frames) = asyncio.run(flow())
    assert len(frames) == 2
    kind, length = struct.unpack(">II", frames[0][:8])
    meta = json.loads(frames[0][8:8 + length])
    assert kind == 4 and meta["image_type"] == "image/png" and meta["node_id"] == "3"
    assert meta["prompt_id"] == prompt_id
    assert (np.asarray(Image.open(io.BytesIO(frames[0][8 + length:])).convert("RGB")) == 51).all()


def test_a_client_far_behind_loses_latent_previews_but_never_png_images():
    """The hub's backlog rule: JPEG previews are skipped for a client PREVIEW_BACKLOG_LIMIT messages behind; the
    PNG frames SaveImageWebsocket sends are its results and are always queued."""
    hub = Hub(status=lambda: {}, server_flags={}, running_node=lambda client_id: None)
    for index in range(PREVIEW_BACKLOG_LIMIT + 1):
        hub.publish(f"text {index}", "slow")
    outbox = hub.clients["slow"].outbox
    hub.publish(Preview(b"jpeg", JPEG, {}), "slow")
    assert len(outbox) == PREVIEW_BACKLOG_LIMIT + 1
    hub.publish(Preview(b"\x89PNG", PNG, {}), "slow")
    assert len(outbox) == PREVIEW_BACKLOG_LIMIT + 2 and outbox[-1].image_format == PNG
