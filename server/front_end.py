"""ComfyUI's front end, served instead of our canvas when `latentloom serve --front-end comfyui`.

The front end is the PyPI package `comfyui-frontend-package` (static files: `index.html`, `assets/`, ...). It is
GPL-3.0, so it is never part of this repository: the user installs it (`pip install 'latentloom[comfyui]'`, which
pins the version the browser tests run against) and the server finds its `static/` folder through the import
system, as ComfyUI does. Everything it calls over HTTP is an ordinary API route (routes_*.py); this module locates
the files and adds what the page asks for on every load besides the API, so that a fresh data directory loads with
no failed request: `/user.css`, `/favicon.ico`, the template browser's search options, and stand-ins for the user
files and folders it reads before the user has any (where ComfyUI answers 404, which the browser logs as an error).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from pathlib import Path

from aiohttp import web

from server.state import STATE, ApiError

log = logging.getLogger(__name__)

PACKAGE = "comfyui_frontend_package"
# The version the browser tests (tests/web/test_comfyui_frontend.py) ran against; pyproject's `comfyui` extra pins it.
TESTED_VERSION = "1.37.11"
INSTALL_HINT = "pip install 'latentloom[comfyui]'"
FRONT_ENDS = ("latentloom", "comfyui")


class FrontEndMissing(Exception):
    """`--front-end comfyui` without the package (or with a broken install): one line saying how to install it."""


def comfyui_static_root() -> Path:
    """The `static/` folder of the installed `comfyui-frontend-package`.

    Found through `importlib.util.find_spec`, without importing the package (its `__init__` reads metadata only,
    but finding is enough), so an install in any site-packages or a `pip install -e` of a checkout works.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FrontEndMissing(f"--front-end comfyui needs ComfyUI's front end, which is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        static = Path(location) / "static"
        if (static / "index.html").is_file():
            return static
    raise FrontEndMissing(f"the installed {PACKAGE} has no static/index.html (a broken install?); reinstall it: "
                          f"{INSTALL_HINT}")


def installed_version() -> str | None:
    """The installed front end's version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


# Files of the user directory the page asks for on every load, with what stands for them while the user has none.
# ComfyUI answers a missing one with a 404, which the front end reads as "none" but the browser logs as an error (and,
# for the stylesheet its index.html links, refuses unless served as text/css).
PAGE_USER_FILES = {"user.css": ("text/css", b""), "comfy.templates.json": ("application/json", b"[]"),
                   "workflows/.index.json": ("application/json", b'{"favorites": []}')}  # bookmarked workflows
# Folders the front end lists on every load (a missing one is a 404 in ComfyUI too).
PAGE_USER_FOLDERS = ("workflows", "subgraphs")
MAX_PAGE_FILE_BYTES = 1 << 20


def prepare_user_dir(user_dir: Path) -> None:
    """The folders the front end lists on every load, so that a fresh data directory answers them (empty)."""
    for name in PAGE_USER_FOLDERS:
        (user_dir / name).mkdir(parents=True, exist_ok=True)


def read_page_file(user_dir: Path, name: str) -> tuple[str, bytes]:
    """(content type, bytes) of a PAGE_USER_FILES file: the user's own, else its stand-in. A file that leads out of
    the user directory (a symlink) or is over MAX_PAGE_FILE_BYTES is refused, never read."""
    content_type, empty = PAGE_USER_FILES[name]
    path = user_dir / name
    if not path.exists():
        return content_type, empty
    real = os.path.realpath(path)
    if os.path.commonpath([real, os.path.realpath(user_dir)]) != os.path.realpath(user_dir) or not path.is_file():
        raise ApiError(403, "forbidden", f"user/default/{name} is not a file inside the user directory")
    if path.stat().st_size > MAX_PAGE_FILE_BYTES:
        raise ApiError(413, "too_large", f"user/default/{name} is over {MAX_PAGE_FILE_BYTES >> 20} MiB")
    return content_type, path.read_bytes()


async def page_user_file(request: web.Request) -> web.Response:
    user_dir = request.app[STATE].config.user_root / "default"
    name = request.match_info.route.resource.canonical.split("/userdata/", 1)[1].replace("%2F", "/")
    content_type, body = await asyncio.to_thread(read_page_file, user_dir, name)
    return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})


# How the template browser's search (Fuse.js) weighs the fields of /templates/index.json. ComfyUI's templates package
# ships this file; ours search what our index has: the title and description first, then the file name.
TEMPLATE_SEARCH = {"keys": [{"name": "title", "weight": 0.5}, {"name": "description", "weight": 0.3},
                            {"name": "name", "weight": 0.2}],
                   "threshold": 0.35, "includeScore": True, "includeMatches": True}


async def template_search_options(request: web.Request) -> web.Response:
    """`/templates/fuse_options.json`: without it the template browser logs an error and searches with its own
    defaults, which weigh fields (tags, models) our index does not have."""
    return web.json_response(TEMPLATE_SEARCH, headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    """What the page needs besides the API. Added before the API's routes: `/userdata/user.css` and
    `/userdata/comfy.templates.json` (GET) answer here, every other method and file goes on to /userdata/{file}."""
    prepare_user_dir(app[STATE].config.user_root / "default")
    app.router.add_get("/user.css", user_css, name="front-end-user-css")
    app.router.add_get("/favicon.ico", favicon, name="front-end-favicon")
    for prefix in ("", "/api"):  # public, like the template files themselves
        app.router.add_get(f"{prefix}/templates/fuse_options.json", template_search_options,
                           name=f"front-end-template-search{prefix.replace('/', '-')}")
    for prefix in ("", "/api"):
        for name in PAGE_USER_FILES:
            app.router.add_get(f"{prefix}/userdata/{name.replace('/', '%2F')}", page_user_file)


async def favicon(request: web.Request) -> web.StreamResponse:
    """`/favicon.ico`, which browsers ask for on their own: the front end's icon (it lives under assets/)."""
    icon = request.app[STATE].config.web_root / "assets" / "favicon.ico"
    if not icon.is_file():
        return web.Response(status=204)
    return web.FileResponse(icon, headers={"Cache-Control": "max-age=86400"})


async def user_css(request: web.Request) -> web.Response:
    """`/user.css`, which ComfyUI's index.html links before its own styles.

    ComfyUI answers it with a 404, which the browser logs as a console error and refuses as a stylesheet; the
    user's own stylesheet is `user/default/user.css` (served by /userdata), so this file is always empty.
    """
    return web.Response(text="", content_type="text/css", headers={"Cache-Control": "no-cache"})

