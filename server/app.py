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
from server import (
    extensions,
    front_end,
    global_subgraphs,
    openapi,
    routes_files,
    routes_frontend,
    routes_info,
    routes_prompt,
    routes_user,
)
from server.state import LOOPBACK_NAMES, STATE, ApiError, Handler, ServerConfig, ServerState, json_error

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
        message = exc.reason if exc.text is None else exc.text.strip()
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
        response = json_error(exc.status, kind, message)
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
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
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
    """Refuse what a web page of another site could make a browser send.

    Whether the server is private is decided by the address it is bound to, never by the request's own
    `Host` header (which the page's DNS controls). A loopback server answers only requests whose `Host` is one
    of its names (`localhost`, a loopback address, or `--allow-host`): a page that rebinds its own domain to
    127.0.0.1 still sends its domain as `Host` and is refused (DNS rebinding). Cross-origin requests are
    refused unless `--allow-origin` permits them, on a loopback server and on any server without a token
    (a bearer token cannot be sent cross-origin without a preflight we do not grant).
    """
    allowed = set(config.allow_origins)
    allowed_hosts = {name.lower() for name in config.allow_hosts}
    loopback = _is_loopback(config.host)
    check_cross_origin = loopback or not config.auth_token

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        host_name, host_port = _host_port(host or "", None)
        if loopback and host is not None and not _is_loopback(host_name) and host_name not in allowed_hosts:
            return json_error(403, "forbidden_host",
                              f"Host {host!r} is not a name of this server, which listens on {config.host} only "
                              "(requests through other names are refused: DNS rebinding); use "
                              f"http://{config.host}:{host_port or config.port}/ or start it with --allow-host NAME")
        origin = request.headers.get("Origin")
        permitted = False
        if origin:
            permitted = "*" in allowed or origin in allowed
            origin_parts = urlsplit(origin)
            try:
                origin_port = origin_parts.port or {"http": 80, "https": 443}.get(origin_parts.scheme)
            except ValueError:
                origin_port = None
            same = (origin_parts.hostname or "").lower() == host_name and (host_port or 80) == origin_port
            if not same and not permitted and check_cross_origin:
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


STATIC_ROUTE_NAMES = frozenset({"canvas-index", "canvas-static", "canvas-templates", "canvas-templates-api",
                                "front-end-user-css", "front-end-favicon", "front-end-template-search",
                                "front-end-template-search-api", "pack-web", "pack-web-api"})


SESSION_COOKIE = "latentloom_session"


def session_value(token: str) -> str:
    """What the session cookie holds: derived from the token, so the cookie never carries the token itself."""
    return hmac.new(token.encode(), b"latentloom browser session", "sha256").hexdigest()


def auth_middleware(token: str) -> Any:
    """Every route but the pages needs the token: `Authorization: Bearer TOKEN`, `?token=` on `/ws` and `/view`
    (what a browser cannot send a header with), or the session cookie. The cookie is for front ends that cannot
    send the header at all (ComfyUI's): opening a page as `/?token=TOKEN` sets it (HttpOnly, SameSite=Strict, so
    no other site's page can send it) and redirects to the page without the token in its address."""
    expected = f"Bearer {token}".encode()
    session = session_value(token).encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if route.name in STATIC_ROUTE_NAMES or (route.resource is not None and
                                                route.resource.name in STATIC_ROUTE_NAMES):
            offered = request.query.get("token")
            if request.method == "GET" and offered is not None and hmac.compare_digest(offered.encode(),
                                                                                      token.encode()):
                query = {k: v for k, v in request.query.items() if k != "token"}
                response = web.HTTPSeeOther(str(request.rel_url.with_query(query)))
                response.set_cookie(SESSION_COOKIE, session.decode(), httponly=True, samesite="Strict", path="/",
                                    secure=request.secure)
                return response
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        ok = hmac.compare_digest(given, expected)
        if not ok and request.path in ("/ws", "/view", "/api/ws", "/api/view"):
            ok = hmac.compare_digest(request.query.get("token", "").encode(), token.encode())
        if not ok and hmac.compare_digest(request.cookies.get(SESSION_COOKIE, "").encode(), session):
            # SameSite keeps other sites' pages out, but not another port of this host: a cookie counts only
            # from this origin's own pages (a browser names the page's origin on every cross-origin request).
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
                return json_error(403, "forbidden_origin", f"the session cookie is not accepted from {origin}")
            ok = True
        if not ok:
            return json_error(401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' header is required "
                                                   "(or open the page once as /?token=TOKEN)")
        return await handler(request)

    return check_token


async def _api_methods(request: web.Request) -> set[str]:
    """The methods the API routes (not the canvas' static files) serve at this request's path."""
    methods: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name not in STATIC_ROUTE_NAMES:
            methods |= (await resource.resolve(request))[1]
    return methods


@web.middleware
async def api_method_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A method an API path does not serve is a 405 whose `Allow` lists only the API's methods.

    The canvas' static route matches every path for GET and HEAD, so without this `GET /interrupt` would be
    a 404 from the static folder and `PUT /interrupt`'s `Allow` would list GET and HEAD.
    """
    route = request.match_info.route
    static = route.resource is not None and route.resource.name == "canvas-static"
    if static or isinstance(request.match_info.http_exception, web.HTTPMethodNotAllowed):
        methods = await _api_methods(request)
        if methods and request.method not in methods:
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
    return await handler(request)


async def _no_sniffing(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"


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
    return [*routes_prompt.ROUTES, *routes_files.ROUTES, *routes_info.ROUTES, *routes_user.ROUTES,
            *routes_frontend.ROUTES, *global_subgraphs.ROUTES, ("GET", "/openapi.json", openapi.handle),
            ("GET", "/ws", websocket_handler)]


def create_app(config: ServerConfig, registry: NodeRegistry | None = None) -> web.Application:
    """The application, its state built (database opened, crashed prompts recovered); workers start with it."""
    middlewares: list[Any] = [error_middleware, origin_middleware(config), api_method_middleware]
    if config.auth_token:
        middlewares.append(auth_middleware(config.auth_token))
    # Room for the multipart envelope around an upload of the maximum size.
    app = web.Application(middlewares=middlewares, client_max_size=config.max_upload_bytes + (64 << 10))
    app[STATE] = ServerState(config, registry)
    routes_user.setup(app)  # the user directory (ComfyUI's front end keeps workflows and settings there)
    routes_frontend.setup(app)  # the log buffer behind /internal/logs
    extensions.setup(app)  # node packs' web folders and HTTP routes (before the catch-all static route)
    if config.front_end == "comfyui":  # what ComfyUI's page asks for besides the API (server/front_end.py)
        front_end.add_routes(app)
    for method, path, handler in api_routes():
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
            if method == "GET" and path != "/ws":  # HEAD is GET without the body (aiohttp leaves it out)
                app.router.add_route("HEAD", prefix + path, handler)
    app.router.add_get("/", canvas_index, name="canvas-index")
    # The shipped workflows (the canvas opens templates/txt2img.json on first visit) and, for ComfyUI's template
    # browser, their index and thumbnails; public like the page itself (no token).
    for prefix, name in (("", "canvas-templates"), ("/api", "canvas-templates-api")):
        app.router.add_get(prefix + "/templates/{file}", routes_frontend.template_file, name=name)
    # web/ holds the canvas and, in web/node_modules, the graph library npm installed (`npm ci --prefix web`).
    if config.web_root.is_dir():
        app.router.add_static("/", config.web_root, name="canvas-static")
    app.on_response_prepare.append(_no_sniffing)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app
