"""`latentloom serve --front-end comfyui`: the installed comfyui-frontend-package's static folder is found, served at
`/` (with the empty `/user.css` its page links), and a missing package is one line saying how to install it."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server import cli, front_end
from server.app import create_app
from server.state import ServerConfig


def test_missing_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(front_end, "PACKAGE", "latentloom_no_such_front_end_package")
    with pytest.raises(front_end.FrontEndMissing, match=r"pip install 'latentloom\[comfyui\]'"):
        front_end.comfyui_static_root()
    status = cli.main(["--data-dir", str(tmp_path / "data"), "serve", "--port", "0", "--front-end", "comfyui"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_USAGE
    assert err == ["error: --front-end comfyui needs ComfyUI's front end, which is not installed: "
                   "pip install 'latentloom[comfyui]'"]


def test_front_end_option_choices():
    assert cli.build_parser().parse_args(["serve"]).front_end == "latentloom"
    assert cli.build_parser().parse_args(["serve", "--front-end", "comfyui"]).front_end == "comfyui"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--front-end", "vue"])


needs_package = pytest.mark.skipif(importlib.util.find_spec(front_end.PACKAGE) is None,
                                   reason="comfyui-frontend-package is not installed (pip install -e '.[test]')")


@needs_package
def test_static_root_is_the_installed_package():
    root = front_end.comfyui_static_root()
    assert (root / "index.html").is_file() and root.name == "static"
    assert front_end.installed_version() == front_end.TESTED_VERSION


@needs_package
def test_app_serves_comfyui_index_and_user_css(tmp_path):
    root = front_end.comfyui_static_root()
    config = ServerConfig(data_dir=tmp_path / "data", web_root=root, front_end="comfyui", workers=1)

    async def probe() -> None:
        client = TestClient(TestServer(create_app(config)))
        await client.start_server()
        try:
            index = await client.get("/")
            assert index.status == 200 and await index.text() == (root / "index.html").read_text()
            assert index.headers["Cache-Control"] == "no-cache"
            css = await client.get("/user.css")
            assert css.status == 200 and css.content_type == "text/css"
            # the user's stylesheet and node templates: stand-ins while there are none, never a 404
            for path, kind, body in [("/api/userdata/user.css", "text/css", b""),
                                     ("/api/userdata/comfy.templates.json", "application/json", b"[]"),
                                     ("/api/userdata/workflows%2F.index.json", "application/json",
                                      b'{"favorites": []}')]:
                response = await client.get(path)
                assert (response.status, response.content_type, await response.read()) == (200, kind, body), path
            # writes still go to /userdata/{file}, and what was written is served back as a stylesheet
            stored = await client.post("/api/userdata/user.css", data=b"body { color: red }")
            assert stored.status == 200, await stored.text()
            css = await client.get("/api/userdata/user.css")
            assert css.content_type == "text/css" and await css.read() == b"body { color: red }"
            icon = await client.get("/favicon.ico")
            assert icon.status == 200 and await icon.read() == (root / "assets" / "favicon.ico").read_bytes()
            search = await client.get("/templates/fuse_options.json")
            assert search.status == 200 and {k["name"] for k in (await search.json())["keys"]} <= {
                "title", "description", "name"}  # fields our /templates/index.json has
            user = tmp_path / "data" / "user" / "default"
            assert (user / "workflows").is_dir() and (user / "subgraphs").is_dir()
            listing = await client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
            assert (listing.status, await listing.json()) == (200, [])
            (user / "comfy.templates.json").unlink(missing_ok=True)
            (tmp_path / "elsewhere.json").write_text("[1]")
            (user / "comfy.templates.json").symlink_to(tmp_path / "elsewhere.json")
            assert (await client.get("/api/userdata/comfy.templates.json")).status == 403
        finally:
            await client.close()

    asyncio.run(probe())


def test_our_canvas_has_no_user_css(tmp_path):
    async def probe() -> None:
        client = TestClient(TestServer(create_app(ServerConfig(data_dir=tmp_path / "data", workers=1))))
        await client.start_server()
        try:
            assert (await client.get("/user.css")).status == 404
        finally:
            await client.close()

    asyncio.run(probe())
