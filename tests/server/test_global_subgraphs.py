"""`/global_subgraphs`: node packs' subgraph blueprints as ComfyUI's front end lists and loads them."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.state import ServerConfig

BLUEPRINT = {"nodes": [{"id": 1, "type": "KSampler"}], "links": [], "version": 0.4}


@pytest.fixture
def data_dir(tmp_path):
    data = tmp_path / "data"
    folder = data / "custom_nodes" / "pack_a" / "subgraphs"
    folder.mkdir(parents=True)
    (folder / "Upscale twice.json").write_text(json.dumps(BLUEPRINT))
    (folder / "notes.txt").write_text("not a blueprint")
    (folder / "deeper").mkdir()
    (folder / "deeper" / "nested.json").write_text("{}")  # only files directly in subgraphs/
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    os.symlink(tmp_path / "secret.json", folder / "escape.json")  # leads out of its folder: never listed
    (data / "custom_nodes" / "single_file_pack.py").write_text("NODE_CLASSES = []\n")
    return data


def run(data_dir, probe):
    async def main():
        client = TestClient(TestServer(create_app(ServerConfig(data_dir=data_dir, workers=1))))
        await client.start_server()
        try:
            return await probe(client)
        finally:
            await client.close()

    return asyncio.run(main())


def test_lists_and_serves_pack_blueprints(data_dir):
    async def probe(client):
        listing = await (await client.get("/api/global_subgraphs")).json()
        assert list(listing.values()) == [{"source": "custom_node", "name": "Upscale twice",
                                           "info": {"node_pack": "pack_a"}}]
        (key,) = listing
        one = await client.get(f"/api/global_subgraphs/{key}")
        assert one.status == 200
        body = await one.json()
        assert json.loads(body["data"]) == BLUEPRINT and body["name"] == "Upscale twice"
        assert (await client.get(f"/global_subgraphs/{key}")).status == 200  # bare path too
        missing = await client.get("/api/global_subgraphs/" + "0" * 64)
        assert missing.status == 404 and "no subgraph blueprint" in (await missing.json())["error"]["message"]
        # a path instead of an id is never read
        traversal = await client.get("/api/global_subgraphs/..%2F..%2Fsecret.json")
        assert traversal.status == 404
        return key

    first = run(data_dir, probe)
    assert run(data_dir, probe) == first  # ids are stable across restarts


def test_no_custom_nodes_folder_is_an_empty_listing(tmp_path):
    async def probe(client):
        response = await client.get("/api/global_subgraphs")
        return response.status, await response.json()

    data = tmp_path / "data"
    assert run(data, probe) == (200, {})
