"""The aiohttp application: configuration, shared state, middlewares and the app factory.

Middlewares, outermost first: errors → JSON (no traceback ever reaches a response body), origin check
(a browser page from another origin may not drive a loopback server unless allowed), bearer-token auth
(when configured; constant-time comparison). Every API route is registered at `/path` and `/api/path`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from graph.registry import NodeRegistry
from server import openapi, routes_files, routes_info, routes_prompt
from server.state import LOOPBACK_NAMES, ROOT, STATE, ApiError, Handler, ServerConfig, ServerState, json_error

log = logging.getLogger(__name__)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "bad_request")
        response = json_error(exc.status, kind, exc.reason if exc.text is None else exc.text.strip())
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal_error", "internal server error (details are in the server log)")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(value: str, default_port: int | None) -> tuple[str, int | None]:
    parts = urlsplit("//" + value)
    try:
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:
        return (parts.hostname or "").lower(), default_port


def origin_middleware(config: ServerConfig) -> Any:
    """Refuse cross-origin requests to a loopback server (CSRF from any web page), unless allowed."""
    allowed = set(config.allow_origins)

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        permitted = False
        if origin:
            permitted = "*" in allowed or origin in allowed
            host = request.headers.get("Host", "")
            host_name, host_port = _host_port(host, None)
            origin_parts = urlsplit(origin)
            try:
                origin_port = origin_parts.port or {"http": 80, "https": 443}.get(origin_parts.scheme)
            except ValueError:
                origin_port = None
            same = (origin_parts.hostname or "").lower() == host_name and (host_port or 80) == origin_port
            if not same and not permitted and _is_loopback(host_name or config.host):
                return json_error(403, "forbidden_origin", f"cross-origin request from {origin} refused")
        if request.method == "OPTIONS" and origin:
            response: web.StreamResponse = web.Response()
        else:
            response = await handler(request)
        if permitted and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin if "*" not in allowed else "*"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        return response

    return check_origin


STATIC_ROUTE_NAMES = frozenset({"canvas-index", "canvas-static", "canvas-templates"})


def auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if route.name in STATIC_ROUTE_NAMES or (route.resource is not None and
                                                route.resource.name in STATIC_ROUTE_NAMES):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        ok = hmac.compare_digest(given, expected)
        if not ok and request.path in ("/ws", "/view", "/api/ws", "/api/view"):
            ok = hmac.compare_digest(request.query.get("token", "").encode(), token.encode())
        if not ok:
            return json_error(401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' header is required")
        return await handler(request)

    return check_token


async def canvas_index(request: web.Request) -> web.StreamResponse:
    index = request.app[STATE].config.web_root / "index.html"
    if not index.is_file():
        return json_error(404, "not_found", "the web canvas is not installed (no web/index.html)")
    return web.FileResponse(index, headers={"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"})


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].hub.handle(request)


async def _on_startup(app: web.Application) -> None:
    state = app[STATE]
    state.loop = asyncio.get_running_loop()
    state.hub.loop = state.loop
    state.pool.start()


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    await asyncio.to_thread(state.pool.stop)
    await state.hub.close_all()
    await state.webhooks.close()
    state.submit_pool.shutdown(wait=True)
    state.writer.close()
    state.store.close()


def api_routes() -> list[tuple[str, str, Handler]]:
    return [*routes_prompt.ROUTES, *routes_files.ROUTES, *routes_info.ROUTES, ("GET", "/openapi.json", openapi.handle),
            ("GET", "/ws", websocket_handler)]


def create_app(config: ServerConfig, registry: NodeRegistry | None = None) -> web.Application:
    """The application, its state built (database opened, crashed prompts recovered); workers start with it."""
    middlewares: list[Any] = [error_middleware, origin_middleware(config)]
    if config.auth_token:
        middlewares.append(auth_middleware(config.auth_token))
    # Room for the multipart envelope around an upload of the maximum size.
    app = web.Application(middlewares=middlewares, client_max_size=config.max_upload_bytes + (64 << 10))
    app[STATE] = ServerState(config, registry)
    for method, path, handler in api_routes():
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
    app.router.add_get("/", canvas_index, name="canvas-index")
    # The shipped workflows (the canvas opens templates/txt2img.json on first visit), read-only.
    if (ROOT / "workflows").is_dir():
        app.router.add_static("/templates", ROOT / "workflows", name="canvas-templates")
    # web/ holds the canvas and, in web/node_modules, the graph library npm installed (`npm ci --prefix web`).
    if config.web_root.is_dir():
        app.router.add_static("/", config.web_root, name="canvas-static")
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app
