"""ComfyUI's `server` module for packs: `PromptServer.instance` with `routes` (an aiohttp RouteTableDef a pack
adds its HTTP routes to at import), `send_sync` (a message to the WebSocket clients) and `client_id` (the
client of the prompt running now).

The routes are mounted when our server starts (server/extensions.py calls `comfy_compat.attach`), at `/path`
and `/api/path`, behind the same middlewares as our own routes: the origin check and, when configured, the
bearer token.
"""

from __future__ import annotations

import io
import logging
import struct
from typing import Any

from aiohttp import web

from comfy_compat._state import STATE, context

log = logging.getLogger(__name__)


class BinaryEventTypes:
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3


class PromptServer:
    """The one server object packs talk to (`PromptServer.instance`)."""

    instance: PromptServer
    # We serve packs' WEB_DIRECTORY ourselves: packs that check for it skip copying their scripts elsewhere.
    supports = frozenset({"custom_nodes_from_web"})

    def __init__(self) -> None:
        self.routes = web.RouteTableDef()
        self.app: web.Application | None = None
        self.last_node_id: str | None = None
        self._mounted: set[int] = set()

    @property
    def client_id(self) -> str | None:
        ctx = context()
        return (getattr(ctx, "extra_data", None) or {}).get("client_id") if ctx is not None else None

    def attach(self, app: web.Application, publish: Any) -> None:
        """Mount the routes packs declared (once per app) and deliver messages through `publish` too."""
        self.app = app
        if id(app) in self._mounted:
            return
        STATE.publishers.append(publish)

        async def detach(app: web.Application) -> None:
            if publish in STATE.publishers:
                STATE.publishers.remove(publish)

        app.on_cleanup.append(detach)
        self._mounted.add(id(app))
        latest: dict[tuple[str, str], web.RouteDef] = {}
        for route in self.routes:  # a pack imported again (another registry) declares its routes again
            if not isinstance(route, web.RouteDef):
                log.warning("pack route %r is not a plain route and was not mounted", route)
                continue
            latest.pop((route.method, route.path), None)
            latest[(route.method, route.path)] = route
        for route in latest.values():
            for prefix in ("", "/api"):
                app.router.add_route(route.method, prefix + route.path, route.handler, **route.kwargs)

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Send `{"type": event, "data": data}` to the client `sid`, or to every client when None (as ComfyUI).
        An int `event` (BinaryEventTypes) sends a binary frame `[u32 event][payload]` (big-endian, as ComfyUI):
        `data` is the payload bytes, or for PREVIEW_IMAGE / UNENCODED_PREVIEW_IMAGE an `(image_type, PIL image,
        max_size)` tuple, sent as a PREVIEW_IMAGE frame `[u32 1][u32 format: 1 JPEG, 2 PNG][image]`.
        Without a server (a prompt run from the CLI) the message is logged at debug level and dropped; every
        server of the process gets it (a client id is one server's)."""
        if isinstance(event, int):
            event, data = binary_payload(event, data)
        if not STATE.publishers:
            log.debug("pack message %s dropped: no server", event)
        for publish in STATE.publishers:  # one server per process, but tests start several
            publish(event, data, sid)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_bytes(self, event: int, data: bytes, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        """A TEXT frame ComfyUI's front end shows on node `node_id`: [u32 3][u32 len(node id)][node id][text]."""
        node = str(node_id).encode("utf-8", "replace")
        body = text if isinstance(text, bytes) else str(text).encode("utf-8", "replace")  # lone surrogates: '?
        self.send_sync(BinaryEventTypes.TEXT, struct.pack(">I", len(node)) + node + body, sid)

    def add_on_prompt_handler(self, handler: Any) -> None:
        log.warning("a pack's on-prompt handler was not installed: Latent Loom does not offer it")


def binary_payload(event: int, data: Any) -> tuple[int, bytes]:
    """(event, payload) of a binary message; image tuples are encoded (ComfyUI's send_image)."""
    if event in (BinaryEventTypes.PREVIEW_IMAGE, BinaryEventTypes.UNENCODED_PREVIEW_IMAGE) and isinstance(
            data, tuple | list):
        return BinaryEventTypes.PREVIEW_IMAGE, _encode_image(*data)
    if isinstance(data, bytes | bytearray | memoryview):
        return int(event), bytes(data)
    raise TypeError(f"PromptServer.send_sync({event}, ...): a binary event takes bytes (or an (image_type, image, "
                    f"max_size) tuple for previews), got {type(data).__name__}")


def _encode_image(image_type: str, image: Any, max_size: int | None = None) -> bytes:
    """[u32 format][image bytes]: JPEG (1) or PNG (2), the image shrunk to fit `max_size` when given."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"a preview image must be a PIL image, got {type(image).__name__}")
    if max_size:
        image = image.copy()
        image.thumbnail((max_size, max_size))
    kind = str(image_type).upper()
    if kind not in ("JPEG", "PNG"):
        raise ValueError(f"preview image type {image_type!r}: JPEG or PNG")
    buffer = io.BytesIO()
    (image.convert("RGB") if kind == "JPEG" else image).save(buffer, format=kind, quality=95)
    return struct.pack(">I", 1 if kind == "JPEG" else 2) + buffer.getvalue()


PromptServer.instance = PromptServer()
