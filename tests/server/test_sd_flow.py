"""The ComfyUI API client flow against a real server process running a tiny SD1 checkpoint: WebSocket events
with sampler progress and latent previews, history, and the image through /view."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import uuid

import aiohttp
from PIL import Image

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from tests.nodes.test_sd_nodes import txt2img
from tests.server.harness import make_data_dir
from tests.server.test_api_flow import collect, wait_history


def test_txt2img_client_flow(start_server, tmp_path):
    data = make_data_dir(tmp_path / "data")
    (data / "models" / "checkpoints").mkdir(parents=True)
    write_random_checkpoint(data / "models" / "checkpoints" / "sd1.safetensors", "sd1")
    server = start_server(data_dir=data)
    prompt = txt2img(steps=3)

    async def flow():
        client_id, prompt_id = uuid.uuid4().hex, uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            await ws.receive()
            async with session.post(f"{server.url}/prompt", json={
                    "prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}) as response:
                assert response.status == 200, await response.text()
            return prompt_id, *(await collect(ws, prompt_id, timeout=120))

    prompt_id, events, frames = asyncio.run(flow())
    types = [e["type"] for e in events if e["type"] != "status"]
    assert types[:2] == ["execution_start", "execution_cached"] and types[-2:] == ["execution_success", "executing"]
    executing = [e["data"]["node"] for e in events if e["type"] == "executing"]
    assert executing[-1] is None and {"3", "4", "8", "9"} <= set(executing)
    progress = [(e["data"]["value"], e["data"]["max"], e["data"]["node"]) for e in events if e["type"] == "progress"]
    assert progress == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    assert len(frames) == 3  # one latent preview per sampler step
    kind, fmt = struct.unpack(">II", frames[-1][:8])
    assert (kind, fmt) == (1, 1) and Image.open(io.BytesIO(frames[-1][8:])).size == (8, 8)
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "success"
    image = entry["outputs"]["9"]["images"][0]
    status, headers, data = server.request(
        "GET", f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}")
    assert status == 200 and headers["content-type"] == "image/png"
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (64, 64) and json.loads(decoded.text["prompt"]) == prompt
