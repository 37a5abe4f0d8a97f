"""ComfyUI's `server` module for packs: `PromptServer.instance` with `routes` (an aiohttp RouteTableDef a pack
adds its HTTP routes to at import), `send_sync` (a message to the WebSocket clients) and `client_id` (the
client of the prompt running now).

The routes are mounted when our server starts (server/extensions.py calls `comfy_compat.attach`), at `/path`
and `/api/path`, behind the same middlewares as our own routes: the origin check and, when configured, the
bearer token.
"""

from __future__ import annotations

import logging
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

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Send `{"type": event, "data": data}` to the client `sid`, or to every client when None (as ComfyUI).
        Without a server (a prompt run from the CLI) the message is logged at debug level and dropped; every
        server of the process gets it (a client id is one server's)."""
        if isinstance(event, int):
            log.debug("binary message %s from a pack dropped (not supported)", event)
            return
        if not STATE.publishers:
            log.debug("pack message %s dropped: no server", event)
        for publish in STATE.publishers:  # one server per process, but tests start several
            publish(event, data, sid)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def add_on_prompt_handler(self, handler: Any) -> None:
        log.warning("a pack's on-prompt handler was not installed: Latent Loom does not offer it")


PromptServer.instance = PromptServer()
