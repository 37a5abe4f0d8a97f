"""Our aiohttp app served in this process, on a thread of its own: routes are tested through real HTTP (the
middlewares, the router's decoding of `%2F`, the body limits) without the seconds a server process takes to start.
The client methods are harness.ServerProcess's."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from aiohttp import web

from graph.registry import NodeRegistry
from server.app import create_app
from server.state import ServerConfig
from tests.server.harness import ServerProcess, make_data_dir


class InProcessServer(ServerProcess):
    """`create_app(config)` listening on 127.0.0.1 on a free port until `stop()`; `app` is the application."""

    def __init__(self, data_dir: Path, **config: object) -> None:
        super().__init__(make_data_dir(data_dir))
        config.setdefault("web_root", data_dir.parent / "no-web-root")
        self.config = ServerConfig(data_dir=self.data_dir, **config)
        self.app: web.Application | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self, timeout: float = 60.0) -> InProcessServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout)
        return self

    async def _start(self) -> None:
        self.app = create_app(self.config, NodeRegistry())  # no nodes: these tests need none
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def call(self, function, *args):
        """`function(*args)` run on the server's event loop (hub methods must be)."""
        async def run():
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)
