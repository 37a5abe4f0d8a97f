"""Node packs on the server: their front-end extensions (`WEB_DIRECTORY`) and their own HTTP routes.

A pack's `WEB_DIRECTORY` is served at `/extensions/<pack>/<file>`, public like the canvas itself (a browser
imports the scripts without a token), and `GET /extensions` lists its `.js` files for ComfyUI's front end to
import. Only files inside the pack's web folder are served: a name with `..`, or a link out of the folder, is a
404. A pack's own routes (added to `PromptServer.instance.routes` when it was imported) are mounted by the
compatibility layer at `/path` and `/api/path`, behind our origin check and bearer token like every API route;
`PromptServer.send_sync` reaches the WebSocket clients through `publish` below: text events as `{type, data}`,
binary ones (an int event) as the frame `[u32 event][payload]` ComfyUI sends, never dropped for a slow client.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from server.state import STATE
from server.websocket import BinaryFrame, text_message

log = logging.getLogger(__name__)


ROUTE_NAME = "pack-web"  # (and "pack-web-api") in server.app.STATIC_ROUTE_NAMES: no token, as the canvas' scripts


def _web_directories(app: web.Application) -> dict[str, Path]:
    registry = app[STATE].registry
    packs = getattr(registry, "packs", {}) or {}
    return {name: pack.web_directory for name, pack in packs.items() if pack.web_directory is not None}


def script_urls(app: web.Application) -> list[str]:
    """`/extensions/<pack>/<path>.js` for every script in the packs' web folders, sorted."""
    urls = []
    for name, folder in sorted(_web_directories(app).items()):
        root = os.path.realpath(folder)
        for dirpath, _dirs, files in os.walk(folder, followlinks=False):
            for file in files:
                path = os.path.join(dirpath, file)
                if file.endswith(".js") and os.path.realpath(path).startswith(root + os.sep):
                    urls.append(f"/extensions/{name}/{Path(os.path.relpath(path, folder)).as_posix()}")
    return sorted(urls)


async def pack_file(request: web.Request) -> web.StreamResponse:
    """One file of a pack's web folder."""
    name, rel = request.match_info["pack"], request.match_info["path"]
    folder = _web_directories(request.app).get(name)
    if folder is None:
        raise web.HTTPNotFound(text=f"no node pack {name!r} with a web folder")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(root + os.sep) or ".." in Path(rel).parts or not os.path.isfile(path):
        raise web.HTTPNotFound(text=f"no file {rel!r} in the web folder of node pack {name!r}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


def setup(app: web.Application) -> None:
    """Serve the packs' web folders and mount their routes; call before the canvas' catch-all static route."""
    for prefix in ("", "/api"):  # as every route (the front end loads the root form)
        app.router.add_get(prefix + "/extensions/{pack}/{path:.+}", pack_file,
                           name=ROUTE_NAME + prefix.replace("/", "-"))
    state = app[STATE]
    runtime = getattr(state.registry, "pack_runtime", None)
    if runtime is None or not getattr(state.registry, "packs", None):
        return  # no packs in this app's registry: none of the process's pack routes belong on it

    def publish(event: str | int, data: Any, client_id: str | None) -> None:
        message = BinaryFrame(event, data) if isinstance(event, int) else text_message(event, data)
        state.hub.publish_threadsafe(message, client_id)

    try:
        runtime.attach(app, publish)
    except Exception:  # a pack's broken route must not stop the server
        log.exception("mounting the node packs' routes failed")
