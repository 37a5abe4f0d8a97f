"""WebSocket clients and event fan-out.

Each client id owns an outbox (a bounded deque) drained by one sender task per connected socket, so a
slow socket delays only itself: publishing is an append, on the event loop; worker threads hand their events
over in bursts (one `call_soon_threadsafe` per burst). While a client is disconnected its outbox keeps
filling (up to its bound); reconnecting with the same `clientId` resumes from there, so no event of its
prompts is missed in a short disconnect. Events for a client id that has not connected yet are kept the
same way (a script may submit first and connect second).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from server.json_values import dumps

log = logging.getLogger(__name__)

PREVIEW_IMAGE, TEXT, PREVIEW_IMAGE_WITH_METADATA = 1, 3, 4  # binary message types
JPEG, PNG = 1, 2
OUTBOX_LIMIT = 2000  # messages kept per client (the oldest go first)
PREVIEW_BACKLOG_LIMIT = 32  # previews are dropped, not queued, for a client this far behind
KEEP_DISCONNECTED_S = 300.0


@dataclass
class Preview:
    """A preview image already encoded (JPEG or PNG) plus what the metadata frame carries."""

    image: bytes
    image_format: int
    metadata: dict[str, Any]

    def frame(self, with_metadata: bool) -> bytes:
        if with_metadata:
            meta = json.dumps(dict(self.metadata, image_type="image/jpeg" if self.image_format == JPEG
                                   else "image/png")).encode()
            return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + self.image
        return struct.pack(">II", PREVIEW_IMAGE, self.image_format) + self.image


@dataclass
class BinaryFrame:
    """A binary message other than a preview: `[u32 event][payload]` (ComfyUI's framing), never dropped."""

    event: int
    payload: bytes

    def frame(self, with_metadata: bool) -> bytes:
        return struct.pack(">I", self.event) + self.payload


def progress_text_frame(node: str, text: str) -> BinaryFrame:
    """ComfyUI's TEXT message, which its front end shows on node `node`: [u32 3][u32 len(node)][node][text]
    (UTF-8; a character that has none, such as a lone surrogate, becomes '?')."""
    node_bytes = str(node).encode("utf-8", "replace")
    return BinaryFrame(TEXT, struct.pack(">I", len(node_bytes)) + node_bytes + str(text).encode("utf-8", "replace"))


@dataclass
class Client:
    client_id: str
    outbox: deque = field(default_factory=lambda: deque(maxlen=OUTBOX_LIMIT))
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    socket: web.WebSocketResponse | None = None
    sender: asyncio.Task | None = None
    supports_preview_metadata: bool = False
    disconnected_at: float = field(default_factory=time.monotonic)


Message = str | Preview | BinaryFrame  # what a client's outbox holds: JSON text, or a binary frame


def text_message(event: str, data: dict[str, Any]) -> str:
    return dumps({"type": event, "data": data}, default=str)


class Hub:
    """The connected (and recently connected) clients; every method runs on the event loop."""

    def __init__(self, status: Callable[[], dict[str, Any]], server_flags: dict[str, Any],
                 running_node: Callable[[str], tuple[str, str | None] | None]) -> None:
        self.clients: dict[str, Client] = {}
        self._status = status
        self._server_flags = server_flags
        self._running_node = running_node
        self.loop: asyncio.AbstractEventLoop | None = None
        # Messages from other threads wait here; one loop callback delivers all that arrived since the last, so a
        # burst of events costs one wake-up of the loop, not one per event.
        self._inbox: list[tuple[Message, str | None]] = []
        self._inbox_lock = threading.Lock()
        self._delivery_scheduled = False

    # publishing ------------------------------------------------------------------------------------
    def publish_threadsafe(self, message: Message, to: str | None) -> None:
        """From any thread: queue a message for one client id (None: everyone)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with self._inbox_lock:
            self._inbox.append((message, to))
            if self._delivery_scheduled:
                return
            self._delivery_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop closed in between (shutdown)
            loop.call_soon_threadsafe(self._deliver_inbox)

    def _deliver_inbox(self) -> None:
        with self._inbox_lock:
            messages, self._inbox = self._inbox, []
            self._delivery_scheduled = False
        for message, to in messages:
            self.publish(message, to)

    def publish(self, message: Message, to: str | None) -> None:
        if to is None:
            for client in list(self.clients.values()):
                if client.socket is not None:
                    self._enqueue(client, message)
            return
        client = self.clients.get(to)
        if client is None:
            client = self._client(to)
        self._enqueue(client, message)

    def broadcast_status(self) -> None:
        self.publish(text_message("status", self._status()), None)

    def _enqueue(self, client: Client, message: Message) -> None:
        # A latent preview (JPEG) can be skipped for a client that is behind; a PNG is a whole image an output node
        # sends (SaveImageWebsocket): the client's result, never dropped.
        if isinstance(message, Preview) and message.image_format == JPEG and len(client.outbox) > PREVIEW_BACKLOG_LIMIT:
            return
        client.outbox.append(message)
        client.wakeup.set()

    def _client(self, client_id: str) -> Client:
        self._forget_stale()
        client = Client(client_id)
        self.clients[client_id] = client
        return client

    def _forget_stale(self) -> None:
        now = time.monotonic()
        stale = [cid for cid, c in self.clients.items()
                 if c.socket is None and now - c.disconnected_at > KEEP_DISCONNECTED_S]
        for cid in stale:
            del self.clients[cid]

    # connections -----------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        socket = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
        await socket.prepare(request)
        client = self.clients.get(client_id) or self._client(client_id)
        old_socket, old_sender = client.socket, client.sender
        if old_sender is not None:
            old_sender.cancel()
        if old_socket is not None:
            await old_socket.close(message=b"replaced by a newer connection with this clientId")
        status = self._status()
        status["sid"] = client_id
        replay = list(client.outbox)
        client.outbox.clear()
        client.outbox.append(text_message("status", status))
        running = self._running_node(client_id)
        if running is not None and not replay:
            prompt_id, node = running
            client.outbox.append(text_message("executing", {"node": node, "display_node": node,
                                                            "prompt_id": prompt_id}))
        client.outbox.extend(replay)
        client.socket = socket
        client.sender = asyncio.create_task(self._send_loop(client, socket))
        client.wakeup.set()
        try:
            await self._receive_loop(client, socket)
        finally:
            if client.socket is socket:
                client.socket = None
                client.disconnected_at = time.monotonic()
                if client.sender is not None:
                    client.sender.cancel()
                client.sender = None
        return socket

    async def _receive_loop(self, client: Client, socket: web.WebSocketResponse) -> None:
        first = True
        async for msg in socket:
            if msg.type != WSMsgType.TEXT:
                continue
            if first:
                first = False
                try:
                    data = json.loads(msg.data)
                except (ValueError, RecursionError):
                    continue
                if isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data") if isinstance(data.get("data"), dict) else {}
                    client.supports_preview_metadata = bool(flags.get("supports_preview_metadata"))
                    self._enqueue(client, text_message("feature_flags", self._server_flags))

    async def _send_loop(self, client: Client, socket: web.WebSocketResponse) -> None:
        try:
            while not socket.closed:
                await client.wakeup.wait()
                client.wakeup.clear()
                while client.outbox and not socket.closed:
                    message = client.outbox[0]
                    if isinstance(message, str):
                        await socket.send_str(message)
                    else:
                        await socket.send_bytes(message.frame(client.supports_preview_metadata))
                    if client.outbox and client.outbox[0] is message:
                        client.outbox.popleft()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a closed or broken socket: the client will reconnect or be forgotten
            log.debug("websocket %s: send failed (%s)", client.client_id, exc)

    async def close_all(self) -> None:
        for client in list(self.clients.values()):
            if client.sender is not None:
                client.sender.cancel()
            if client.socket is not None:
                await client.socket.close()
