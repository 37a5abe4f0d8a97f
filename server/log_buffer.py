"""The server's recent log lines, kept for ComfyUI's front end (its Logs panel), and sent live to subscribers.

One LogBuffer per app (kept on the app, attached to the root logger while the app runs and detached after): it
holds the last MAX_ENTRIES formatted records, each cut to MAX_MESSAGE characters, so its memory is bounded
whatever is logged. `GET /internal/logs/raw` reads them; a client that subscribed (`PATCH
/internal/logs/subscribe`) gets each new line as a WebSocket `logs` event `{entries: [{t, m}], size}`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from server.websocket import Hub, text_message

MAX_ENTRIES = 1000
MAX_MESSAGE = 8192
MAX_SUBSCRIBERS = 64
FORMAT = "%(levelname)s %(name)s: %(message)s"


class LogBuffer(logging.Handler):
    """A bounded in-memory log handler that also forwards new lines to subscribed WebSocket clients."""

    def __init__(self, hub: Hub | None, capacity: int = MAX_ENTRIES) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(FORMAT))
        self._entries: deque[dict[str, str]] = deque(maxlen=capacity)
        self._subscribers: dict[str, None] = {}  # insertion-ordered: the oldest first
        self._hub = hub
        self._sending = threading.local()

    # the handler ---------------------------------------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._sending, "active", False):  # a line logged while forwarding a line: not forwarded again
            return
        try:
            message = self.format(record)
        except Exception:  # a bad format string in someone's log call must not break logging
            message = f"{record.levelname} {record.name}: {record.msg!r}"
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + " [...]"
        entry = {"t": datetime.fromtimestamp(record.created, UTC).isoformat(), "m": message + "\n"}
        self._entries.append(entry)  # emit runs under the handler's lock (logging.Handler.handle)
        if self._subscribers and self._hub is not None:
            self._sending.active = True
            try:
                self._forward(entry)
            finally:
                self._sending.active = False

    def _forward(self, entry: dict[str, str]) -> None:
        hub = self._hub
        assert hub is not None
        message = text_message("logs", {"entries": [entry], "size": self.size()})
        connected = hub.clients  # read from another thread: membership only, a stale answer costs one line
        for client_id in list(self._subscribers):
            client = connected.get(client_id)
            if client is not None and client.socket is not None:
                hub.publish_threadsafe(message, client_id)

    # readers -------------------------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, str]]:
        with self.lock:  # type: ignore[union-attr]  (logging.Handler creates it)
            return list(self._entries)

    def subscribe(self, client_id: str, enabled: bool) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not enabled:
                self._subscribers.pop(client_id, None)
                return
            if client_id not in self._subscribers and len(self._subscribers) >= MAX_SUBSCRIBERS:
                # the oldest subscription gives way (most likely a client that left without unsubscribing)
                self._subscribers.pop(next(iter(self._subscribers)))
            self._subscribers[client_id] = None

    @property
    def subscribers(self) -> frozenset[str]:
        return frozenset(self._subscribers)

    @staticmethod
    def size() -> dict[str, Any]:
        """The terminal the server runs in (the front end sizes its log view to it); 120x30 without one."""
        columns, rows = shutil.get_terminal_size((120, 30))
        return {"cols": columns, "rows": rows}

    # attaching -----------------------------------------------------------------------------------------------
    def attach(self, logger: logging.Logger | None = None) -> None:
        (logger or logging.getLogger()).addHandler(self)

    def detach(self, logger: logging.Logger | None = None) -> None:
        (logger or logging.getLogger()).removeHandler(self)


LOG_BUFFER = web.AppKey("log_buffer", LogBuffer)
