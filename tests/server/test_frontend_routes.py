"""What ComfyUI's front end asks besides prompts and files, through real HTTP to our app: translations and
extensions, the model library (folders, files with their folder index, previews, safetensors metadata), the log
buffer and its live WebSocket events, folder paths, and our shipped workflows as its template browser's templates."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import struct
from pathlib import Path

import aiohttp
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from server import workflow_templates
from server.log_buffer import LOG_BUFFER, MAX_MESSAGE, LogBuffer
from server.state import ROOT
from tests.server.inprocess import InProcessServer

SHIPPED = sorted(path.stem for path in (ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def extra_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("extra-loras")
    save_file({"w": torch.zeros(2)}, folder / "extra.safetensors", metadata={"ss_output_name": "extra"})
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, extra_dir):
    data = tmp_path_factory.mktemp("frontend") / "data"
    started = InProcessServer(data, extra_model_dirs={"loras": [extra_dir]}).start()
    loras = started.data_dir / "models" / "loras"
    (loras / "styles").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, loras / "a.safetensors", metadata={"ss_trigger": "shiny", "ss_epochs": "4"})
    save_file({"w": torch.zeros(2)}, loras / "styles" / "b.safetensors")
    (loras / "notes.txt").write_text("not a model")
    yield started
    started.stop()


def image_bytes(size: tuple[int, int], color: str = "red", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


# static answers ---------------------------------------------------------------------------------------------
def test_no_translations_extensions_or_pack_templates(server):
    assert server.json("GET", "/api/i18n") == (200, {})
    assert server.json("GET", "/api/extensions") == (200, [])
    assert server.json("GET", "/api/workflow_templates") == (200, {})


def test_system_stats_carry_what_the_front_end_reads(server):
    status, stats = server.json("GET", "/api/system_stats")
    assert status == 200
    for field in ("os", "python_version", "embedded_python", "comfyui_version", "pytorch_version", "argv",
                  "ram_total", "ram_free", "required_frontend_version"):
        assert field in stats["system"], field
    for field in ("name", "type", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"):
        assert field in stats["devices"][0], field


# model library ------------------------------------------------------------------------------------------------
def test_model_folders_are_listed_with_public_names(server, extra_dir):
    status, folders = server.json("GET", "/api/experiment/models")
    assert status == 200
    loras = next(f for f in folders if f["name"] == "loras")
    assert loras["folders"][0] == "models/loras" and loras["folders"][1] == f"<extra loras: {extra_dir.name}>"
    status, paths = server.json("GET", "/internal/folder_paths")
    assert status == 200 and paths["loras"] == loras["folders"]
    text = json.dumps([folders, paths])
    assert str(server.data_dir) not in text and str(extra_dir) not in text


def test_models_of_a_folder_come_with_the_index_of_their_folder(server):
    status, models = server.json("GET", "/api/experiment/models/loras")
    assert status == 200
    # loras are looked for in models/loras (0), the extra folder (1), then the repository's own models (2)
    shipped = {(p.name, 2) for p in (ROOT / "models" / "loras").glob("*.safetensors")}
    assert shipped  # the demo LoRA the lora workflow uses
    assert {(m["name"], m["pathIndex"]) for m in models} == {("a.safetensors", 0), ("styles/b.safetensors", 0),
                                                             ("extra.safetensors", 1), *shipped}
    status, body = server.json("GET", "/api/experiment/models/nonsense")
    assert status == 404 and "nonsense" in body["error"]["message"]


def test_view_metadata_reads_the_safetensors_header(server):
    assert server.json("GET", "/api/view_metadata/loras?filename=a.safetensors") == (
        200, {"ss_trigger": "shiny", "ss_epochs": "4"})
    assert server.json("GET", "/api/view_metadata/loras?filename=styles%2Fb.safetensors") == (200, {})
    assert server.json("GET", "/api/view_metadata/loras?filename=extra.safetensors") == (
        200, {"ss_output_name": "extra"})
    for query, status, words in (("filename=missing.safetensors", 404, "missing.safetensors"),
                                 ("filename=notes.txt", 404, "notes.txt"),
                                 ("filename=..%2F..%2Flatentloom.sqlite3", 403, "leaves"),
                                 ("filename=%2Fetc%2Fpasswd", 403, "leaves"),
                                 ("filename=a%00.safetensors", 400, "control character"),
                                 ("", 400, "required")):
        got, body = server.json("GET", f"/api/view_metadata/loras?{query}")
        assert got == status and words in body["error"]["message"], query
    assert server.json("GET", "/api/view_metadata/nowhere?filename=a.safetensors")[0] == 404


def test_a_corrupt_or_pickled_model_is_a_clear_error_and_never_runs_code(server):
    loras = server.data_dir / "models" / "loras"
    (loras / "broken.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    status, body = server.json("GET", "/api/view_metadata/loras?filename=broken.safetensors")
    assert status == 400 and body["error"]["type"] == "invalid_model"
    assert "broken.safetensors" in body["error"]["message"] and str(server.data_dir) not in body["error"]["message"]
    marker = server.data_dir / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # a pickle that would run a shell command
    (loras / "pickled.safetensors").write_bytes(payload)
    assert server.json("GET", "/api/view_metadata/loras?filename=pickled.safetensors")[0] in (400, 404)
    assert not marker.exists()


def test_model_previews_come_from_a_picture_beside_the_model_or_its_cover_image(server):
    loras = server.data_dir / "models" / "loras"
    (loras / "a.png").write_bytes(image_bytes((1024, 256)))
    status, headers, data = server.request("GET", "/api/experiment/models/preview/loras/0/a.webp")
    assert status == 200 and headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(data)) as preview:
        assert preview.format == "WEBP" and preview.size == (512, 128)
        assert preview.convert("RGB").getpixel((10, 10))[0] > 200
    cover = base64.b64encode(image_bytes((64, 64), "blue")).decode()
    save_file({"w": torch.zeros(1)}, loras / "styles" / "c.safetensors",
              metadata={"ssmd_cover_images": json.dumps([cover])})
    status, _, data = server.request("GET", "/api/experiment/models/preview/loras/0/styles/c.webp")
    assert status == 200
    with Image.open(io.BytesIO(data)) as preview:
        assert preview.size == (64, 64) and preview.convert("RGB").getpixel((5, 5))[2] > 200
    for path, status in (("loras/0/styles/b.webp", 404), ("loras/1/a.webp", 404), ("loras/9/a.webp", 404),
                         ("loras/x/a.webp", 400), ("loras/0/..%2F..%2F..%2Fsecret.webp", 403),
                         ("nowhere/0/a.webp", 404)):
        got, body = server.json("GET", f"/api/experiment/models/preview/{path}")
        assert got == status and "Traceback" not in json.dumps(body), path


def test_a_preview_that_is_not_an_image_is_a_clear_400(server):
    loras = server.data_dir / "models" / "loras"
    save_file({"w": torch.zeros(1)}, loras / "d.safetensors")
    (loras / "d.png").write_bytes(b"definitely not a png")
    status, body = server.json("GET", "/api/experiment/models/preview/loras/0/d.webp")
    assert status == 400 and body["error"]["type"] == "invalid_image"


# logs ------------------------------------------------------------------------------------------------------------
def test_recent_log_lines_are_served_raw_and_as_text(server):
    logging.getLogger("latentloom.test").warning("hello from the frontend routes test")
    status, raw = server.json("GET", "/internal/logs/raw")
    assert status == 200 and set(raw["size"]) == {"cols", "rows"}
    entry = next(e for e in raw["entries"] if "hello from the frontend routes test" in e["m"])
    assert entry["m"].endswith("\n") and "WARNING latentloom.test" in entry["m"] and entry["t"][:2] == "20"
    status, text = server.json("GET", "/api/internal/logs")
    assert status == 200 and f"{entry['t']} - {entry['m']}" in text


def test_the_log_buffer_is_bounded_and_cuts_long_lines():
    buffer = LogBuffer(None, capacity=50)
    logger = logging.getLogger("latentloom.test.bounded")
    logger.propagate, logger.level = False, logging.INFO
    buffer.attach(logger)
    try:
        for number in range(200):
            logger.info("line %d", number)
        logger.info("x" * (MAX_MESSAGE * 2))
    finally:
        buffer.detach(logger)
    entries = buffer.entries()
    assert len(entries) == 50 and "line 151" in entries[0]["m"] and "line 199" in entries[-2]["m"]
    assert len(entries[-1]["m"]) < MAX_MESSAGE + 100
    logger.info("after detaching")
    assert "after detaching" not in buffer.entries()[-1]["m"]


def test_the_buffer_leaves_the_root_logger_with_its_app(tmp_path):
    short = InProcessServer(tmp_path / "data").start()
    buffer = short.app[LOG_BUFFER]
    assert buffer in logging.getLogger().handlers
    short.stop()
    assert buffer not in logging.getLogger().handlers


def test_subscribed_clients_get_new_lines_as_logs_events(server):
    async def scenario() -> tuple[list[str], list[str]]:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId=log-watcher") as socket:
            await socket.receive(timeout=10)  # status
            async with session.patch(f"{server.url}/internal/logs/subscribe",
                                     json={"clientId": "log-watcher", "enabled": True}) as response:
                assert response.status == 200
            logging.getLogger("latentloom.test").warning("live line one")
            seen = await _logs_until(socket, "live line one")
            async with session.patch(f"{server.url}/internal/logs/subscribe",
                                     json={"clientId": "log-watcher", "enabled": False}) as response:
                assert response.status == 200
            logging.getLogger("latentloom.test").warning("live line two")
            after = await _logs_until(socket, "live line two", timeout=1.0)
            return seen, after

    seen, after = asyncio.run(scenario())
    assert any("live line one" in line for line in seen)
    assert not any("live line two" in line for line in after)
    for body in ({"clientId": "x"}, {"clientId": "", "enabled": True}, {"clientId": 5, "enabled": True},
                 {"clientId": "x", "enabled": "yes"}, ["log-watcher", True]):
        status, answer = server.json("PATCH", "/internal/logs/subscribe", body)
        assert status == 400 and answer["error"]["type"] in ("invalid_json", "invalid_client_id"), body
    status, answer = server.json("PATCH", "/internal/logs/subscribe", raw=b" " * (server.config.max_workflow_bytes + 1))
    assert status == 413 and answer["error"]["type"] == "too_large"


async def _logs_until(socket: aiohttp.ClientWebSocketResponse, text: str, timeout: float = 10.0) -> list[str]:
    lines: list[str] = []
    try:
        while True:
            message = await socket.receive(timeout=timeout)
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(message.data)
            if event["type"] == "logs":
                assert set(event["data"]["size"]) == {"cols", "rows"}
                lines += [entry["m"] for entry in event["data"]["entries"]]
                if any(text in line for line in lines):
                    return lines
    except TimeoutError:
        return lines


# templates -----------------------------------------------------------------------------------------------------
def test_the_template_index_lists_every_shipped_workflow(server):
    status, headers, data = server.request("GET", "/templates/index.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    index = json.loads(data)
    assert len(index) == 1 and index[0]["moduleName"] == "default" and index[0]["type"] == "image"
    assert index[0]["category"] == "Latent Loom"  # 1.37's browser lists only categories with a group (or essential)
    templates = index[0]["templates"]
    assert [t["name"] for t in templates] == SHIPPED
    txt2img = next(t for t in templates if t["name"] == "txt2img")
    workflow = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    assert txt2img["description"] == workflow["extra"]["description"] and txt2img["title"] == "Txt2img"
    assert all((t["mediaType"], t["mediaSubtype"]) == ("image", "webp") for t in templates)
    assert server.json("GET", "/api/templates/index.json")[1] == index
    assert server.json("GET", "/templates/index.fr.json")[1] == index
    assert server.json("GET", "/templates/index_logo.json") == (200, {})


def test_template_workflows_and_thumbnails_are_served_and_nothing_else(server):
    for name in SHIPPED:
        status, headers, data = server.request("GET", f"/templates/{name}.json")
        assert status == 200 and data == (ROOT / "workflows" / f"{name}.json").read_bytes(), name
        status, headers, data = server.request("GET", f"/templates/{name}-1.webp")
        assert status == 200 and headers["content-type"] == "image/webp", name
        with Image.open(io.BytesIO(data)) as thumbnail:
            assert thumbnail.size == workflow_templates.THUMBNAIL_SIZE
            assert len(thumbnail.convert("RGB").getcolors(1 << 16) or []) > 4, name  # something was drawn
    for path in ("/templates/..%2Fpyproject.toml", "/templates/..%2F..%2Fetc%2Fpasswd", "/templates/nothing.json",
                 "/templates/txt2img.json.bak", "/templates/nothing-1.webp", "/templates/%2Fetc%2Fpasswd"):
        status, body = server.json("GET", path)
        assert status == 404 and body["error"]["type"] == "not_found", path


def test_templates_stay_public_under_a_token_while_the_api_does_not(tmp_path):
    guarded = InProcessServer(tmp_path / "data", auth_token="s3cret").start()
    try:
        assert guarded.request("GET", "/templates/index.json")[0] == 200
        assert guarded.request("GET", "/templates/txt2img.json")[0] == 200
        for path in ("/api/i18n", "/api/experiment/models", "/internal/logs/raw", "/internal/folder_paths"):
            assert guarded.request("GET", path)[0] == 401, path
        assert guarded.request("GET", "/internal/folder_paths", headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        guarded.stop()


def test_a_thumbnail_draws_nodes_where_the_workflow_places_them():
    workflow = {"nodes": [{"id": 1, "type": "Left", "pos": [0, 0], "size": [200, 100]},
                          {"id": 2, "type": "Right", "pos": [1000, 0], "size": [200, 100]},
                          {"id": 3, "type": "Broken", "pos": "nowhere", "size": None}],
                "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 1, 0, 99, 0, "X"]]}
    image = workflow_templates.draw_thumbnail(workflow, (600, 200)).convert("RGB")
    body = Image.new("RGB", (1, 1), workflow_templates.NODE_BODY).getpixel((0, 0))
    link = Image.new("RGB", (1, 1), workflow_templates.LINK).getpixel((0, 0))
    background = Image.new("RGB", (1, 1), workflow_templates.BACKGROUND).getpixel((0, 0))
    row = [image.getpixel((x, 115)) for x in range(600)]  # through both nodes' bodies
    assert row[40] == body and row[560] == body and row[300] == background
    assert any(image.getpixel((300, y)) == link for y in range(200))  # the link crosses the gap
    empty = workflow_templates.draw_thumbnail({"nodes": "not a list"}, (60, 40))
    assert empty.getcolors() == [(60 * 40, background)]
