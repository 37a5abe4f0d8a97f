"""Auth, origin checks, path traversal, size limits, decompression bombs and error bodies."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import aiohttp
import pytest
from PIL import Image

from tests.server.harness import multipart

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED = "http://allowed.example:5173"


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    web = tmp_path_factory.mktemp("web")
    (web / "index.html").write_text("<html>canvas</html>")
    (web / "app.js").write_text("// canvas code")
    return start_server("--auth-token", TOKEN, "--max-upload-mb", "0.25", "--max-image-pixels", "1000000",
                        "--web-root", str(web), "--allow-origin", ALLOWED)


def png_bytes(size=(4, 4), color=(0, 0, 255)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width=100_000, height=100_000):
    """A valid tiny PNG whose header announces width × height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def upload(server, fields, path="/upload/image"):
    body, content_type = multipart(fields)
    return server.json("POST", path, raw=body, headers={"Content-Type": content_type, **AUTH})


PROMPT = {"1": {"class_type": "Number", "inputs": {"value": 1}},
          "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def test_every_route_needs_the_token(server):
    for method, path in [("GET", "/queue"), ("GET", "/api/object_info"), ("GET", "/history"), ("POST", "/prompt"),
                         ("GET", "/view?filename=x.png"), ("GET", "/system_stats"), ("GET", "/openapi.json"),
                         ("GET", "/workflows"), ("POST", "/interrupt")]:
        status, body = server.json(method, path)
        assert status == 401 and body["error"]["type"] == "unauthorized", (method, path)
        assert server.json(method, path, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.json("GET", "/queue", headers={"Authorization": TOKEN})[0] == 401  # no "Bearer"
    assert server.json("GET", "/queue", headers=AUTH)[0] == 200
    assert server.json("GET", f"/queue?token={TOKEN}")[0] == 401  # query tokens only for /ws and /view
    status, body = server.json("POST", "/prompt?wait=20", {"prompt": PROMPT}, headers=AUTH)
    assert status == 200 and body["outputs"]["2"] == {"values": [1]}


def test_static_canvas_is_open(server):
    status, headers, data = server.request("GET", "/")
    assert status == 200 and data == b"<html>canvas</html>" and headers["cache-control"] == "no-cache"
    assert server.request("GET", "/app.js")[2] == b"// canvas code"


def test_view_and_ws_accept_a_query_token(server):
    (server.data_dir / "output" / "pic.png").write_bytes(png_bytes())
    assert server.request("GET", "/view?filename=pic.png")[0] == 401
    assert server.request("GET", f"/view?filename=pic.png&token={TOKEN}")[0] == 200

    async def connect(url):
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url) as ws:
                    return (await ws.receive_json())["type"]
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(connect(f"{server.url}/ws?clientId=a")) == 401
    assert asyncio.run(connect(f"{server.url}/ws?clientId=a&token=wrong")) == 401
    assert asyncio.run(connect(f"{server.url}/ws?clientId=a&token={TOKEN}")) == "status"


def test_cross_origin_requests_are_refused_unless_allowed(server):
    same = f"http://127.0.0.1:{server.port}"
    status, body = server.json("GET", "/queue", headers={**AUTH, "Origin": "http://evil.example"})
    assert status == 403 and body["error"]["type"] == "forbidden_origin"
    assert server.json("POST", "/prompt", {"prompt": PROMPT}, headers={**AUTH, "Origin": "http://localhost:1"})[0] \
        == 403
    assert server.json("GET", "/queue", headers={**AUTH, "Origin": same})[0] == 200
    status, headers, _ = server.request("GET", "/queue", headers={**AUTH, "Origin": ALLOWED})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    status, headers, _ = server.request("OPTIONS", "/prompt", headers={"Origin": ALLOWED,
                                                                      "Access-Control-Request-Method": "POST"})
    assert status == 200 and "POST" in headers["access-control-allow-methods"]


def test_view_traversal(server):
    for query, expected in [("filename=../latentloom.sqlite3", 400), ("filename=/etc/passwd", 400),
                            ("filename=..%2F..%2Fetc%2Fpasswd", 400), ("filename=x&subfolder=../..", 403),
                            ("filename=passwd&subfolder=/etc", 403), ("filename=x&type=secrets", 400),
                            ("filename=pic.png&channel=q", 400)]:
        status, body = server.json("GET", f"/view?{query}", headers=AUTH)
        assert status == expected, (query, body)
        assert "Traceback" not in str(body)


def test_upload_traversal_size_bombs_and_non_images(server):
    assert upload(server, {"image": ("../evil.png", png_bytes())})[0] == 400
    assert upload(server, {"image": ("a/b.png", png_bytes())})[0] == 400
    assert upload(server, {"image": ("ok.png", png_bytes()), "subfolder": "../../x"})[0] == 403
    assert upload(server, {"image": ("ok.png", png_bytes()), "type": "models"})[0] == 400
    assert upload(server, {"image": ("notes.png", b"not an image at all")})[0] == 400
    status, body = upload(server, {"image": ("bomb.png", bomb_png())})
    assert status == 413 and body["error"]["type"] == "image_too_large"
    assert not (server.data_dir / "input" / "bomb.png").exists()
    status, body = upload(server, {"image": ("wide.png", bomb_png(2000, 2000))})  # over --max-image-pixels
    assert status == 413 and "1000000" in body["error"]["message"]
    big = png_bytes() + b"\0" * (300 << 10)
    status, body = upload(server, {"image": ("big.png", big)})
    assert status == 413 and "Traceback" not in str(body)
    mask_ref = '{"filename": "../../latentloom.sqlite3", "type": "input"}'
    assert upload(server, {"image": ("m.png", png_bytes()), "original_ref": mask_ref}, "/upload/mask")[0] == 400
    assert upload(server, {"image": ("m.png", png_bytes()), "original_ref": "{bad"}, "/upload/mask")[0] == 400
    assert upload(server, {"image": ("ok.png", png_bytes())}) == (200, {"name": "ok.png", "subfolder": "",
                                                                        "type": "input"})


def test_request_body_size_limit(server):
    status, body = server.json("POST", "/prompt", {"prompt": PROMPT, "padding": "x" * (400 << 10)}, headers=AUTH)
    assert status == 413 and body["error"]["type"] == "too_large"


def test_workflow_name_traversal(server):
    for name in ["..%2F..%2Fescape", "..", "%2Fetc%2Fpasswd", "a%5Cb", ".hidden"]:
        assert server.json("PUT", f"/workflows/{name}", {"nodes": []}, headers=AUTH)[0] in (400, 404), name
    assert not (server.data_dir.parent / "escape.json").exists()
    assert server.json("GET", "/workflows/..%2Flatentloom.sqlite3", headers=AUTH)[0] in (400, 404)


def test_node_inputs_that_name_files_cannot_leave_their_folder(server):
    (server.data_dir / "secret.png").write_bytes(png_bytes())
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "../secret.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    status, body = server.json("POST", "/prompt", {"prompt": prompt}, headers=AUTH)
    assert status == 400 and "1" in body["node_errors"]
    save = {"1": {"class_type": "MakeImage", "inputs": {"width": 2, "height": 2, "value": 0.5}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../../escaped"}}}
    status, body = server.json("POST", "/prompt?wait=20", {"prompt": save}, headers=AUTH)
    assert status == 200 and body["status"]["status_str"] == "error"
    assert "outside the output folder" in body["status"]["messages"][-1][1]["exception_message"]
    assert not list(server.data_dir.parent.glob("escaped*"))


@pytest.mark.parametrize("method, path", [("POST", "/prompt"), ("POST", "/queue"), ("POST", "/history"),
                                          ("POST", "/interrupt"), ("POST", "/free"), ("PUT", "/workflows/w")])
def test_malformed_json_is_400(server, method, path):
    for raw in [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"']:
        status, body = server.json(method, path, raw=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert status == 400 and body["error"]["type"] in ("invalid_json", "invalid_workflow"), (raw, body)


def test_odd_requests_never_produce_a_500_or_a_traceback(server):
    odd = [("POST", "/prompt", {"prompt": []}), ("POST", "/prompt", {"prompt": {"1": 5}}),
           ("POST", "/prompt", {"prompt": {"1": {"class_type": 7, "inputs": []}}}),
           ("POST", "/prompt", {"prompt": PROMPT, "extra_data": "x"}),
           ("POST", "/prompt", {"prompt": PROMPT, "number": "first"}),
           ("POST", "/prompt", {"prompt": PROMPT, "prompt_id": 12}),
           ("POST", "/prompt", {"prompt": PROMPT, "client_id": ["a"]}),
           ("POST", "/prompt", {"prompt": PROMPT, "partial_execution_targets": "3"}),
           ("POST", "/prompt", {"prompt": {"nodes": "x", "links": []}}),
           ("POST", "/prompt", {"prompt": {"nodes": [{"id": 1}], "links": [[1]]}}),
           ("POST", "/queue", {"delete": [1, 2]}), ("POST", "/history", {"delete": {"a": 1}}),
           ("POST", "/interrupt", {"prompt_id": 5}), ("GET", "/history?offset=abc", None),
           ("GET", "/history/%00", None), ("DELETE", "/prompt/%00", None), ("GET", "/view", None),
           ("GET", "/view?filename=%00", None), ("POST", "/upload/image", None), ("GET", "/models/..", None),
           ("PATCH", "/prompt", {}), ("GET", "/object_info/%2e%2e", None)]
    for method, path, body in odd:
        status, _, data = server.request(method, path, body, headers=AUTH)
        assert 400 <= status < 500 or status == 200, (method, path, body, status, data)
        assert b"Traceback" not in data and b"File \"" not in data, (method, path, data)
    assert "Traceback" not in server.log() and "unhandled error" not in server.log()
