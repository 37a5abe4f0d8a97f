"""Prompt, queue, history, interrupt, free and cancel routes, with ComfyUI's request and response shapes.

Validation runs before the 200 (in a thread: a big workflow takes milliseconds), and the 200 goes out only after
the prompt is committed to SQLite by the submission writer's thread, so a disk sync never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import uuid
from typing import Any

from aiohttp import web

from graph.ui_format import ui_to_api
from graph.validation import validate_prompt
from graph.workflow import WorkflowFormatError, is_ui_workflow
from server.json_values import dumps
from server.prompt_run import delete_temp_files
from server.state import STATE, ApiError, ServerState, read_json_object
from server.store import AddRequest, DuplicatePromptId, QueueItem
from server.webhook import WebhookRefused, check_webhook_url

log = logging.getLogger(__name__)

MAX_WAIT_S = 3600.0
MAX_PROMPT_ID = 200
MAX_NUMBER = 1e15  # queue positions are stored as REAL: beyond 2**53 neighbouring integers would compare equal
MAX_QUERY_INT = 2**63 - 1  # SQLite's integers are 64-bit


def _prompt_error(type_: str, message: str, details: str = "") -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message, "details": details, "extra_info": {}},
                              "node_errors": {}}, status=400)


def _number(body: dict[str, Any]) -> float | None:
    value = body.get("number")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_NUMBER:
        raise ApiError(400, "invalid_number", f"'number' must be a number between -{MAX_NUMBER:g} and {MAX_NUMBER:g}")
    return float(value)


def check_prompt(state: ServerState, body: dict[str, Any], prompt_id: str) -> tuple[AddRequest, dict[str, Any]] \
        | web.Response:
    """Convert and validate a submitted prompt (runs in a thread). Returns the row to commit and the node
    errors of dropped outputs, or the 400 response."""
    if body.get("prompt") is None:
        return _prompt_error("no_prompt", "No prompt provided", "No prompt provided")
    prompt = body["prompt"]
    extra_data = body.get("extra_data") if body.get("extra_data") is not None else {}
    if not isinstance(extra_data, dict):
        raise ApiError(400, "invalid_extra_data", "'extra_data' must be a JSON object")
    extra_data = dict(extra_data)
    if body.get("front") is not None and not isinstance(body["front"], bool):
        raise ApiError(400, "invalid_request", "'front' must be true or false")
    if is_ui_workflow(prompt):
        pnginfo = extra_data.get("extra_pnginfo") if isinstance(extra_data.get("extra_pnginfo"), dict) else {}
        extra_data["extra_pnginfo"] = {"workflow": prompt, **pnginfo}
        try:
            prompt = ui_to_api(prompt, state.registry, state.env)
        except WorkflowFormatError as exc:
            return _prompt_error("invalid_prompt", "Invalid UI-format workflow", str(exc))
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str | int) for t in targets)):
        raise ApiError(400, "invalid_targets", "'partial_execution_targets' must be a list of node ids")
    validation = validate_prompt(prompt, state.registry, state.env, targets)
    if not validation.ok:
        return web.json_response(validation.response(), status=400, dumps=dumps)
    from server.admission import refuse  # memory admission control: a prompt over the device's budget is a 400

    if (refused := refuse(state, validation)) is not None:
        return refused
    client_id = body.get("client_id")
    if client_id is not None:
        if not isinstance(client_id, str):
            raise ApiError(400, "invalid_client_id", "'client_id' must be a string")
        extra_data["client_id"] = client_id
    if "webhook" in extra_data:
        try:
            check_webhook_url(extra_data["webhook"], state.config.webhook_hosts, state.config.host, state.config.port)
        except WebhookRefused as exc:
            raise ApiError(400, "webhook_refused", str(exc)) from None
    request = AddRequest(prompt_id, prompt, extra_data, list(validation.prompt.outputs), number=_number(body),
                         front=bool(body.get("front")))
    return request, validation.node_errors


def _wait_seconds(request: web.Request) -> float | None:
    raw = request.query.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw) if raw else MAX_WAIT_S
    except ValueError:
        raise ApiError(400, "invalid_wait", "'wait' must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, "invalid_wait", "'wait' must be a number of seconds")
    return min(value, MAX_WAIT_S)


async def post_prompt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    wait = _wait_seconds(request)
    body = await read_json_object(request)
    prompt_id = body.get("prompt_id") or str(uuid.uuid4())  # dashed, as ComfyUI mints them
    if not isinstance(prompt_id, str) or len(prompt_id) > MAX_PROMPT_ID:
        raise ApiError(400, "invalid_prompt_id", f"'prompt_id' must be a string of at most {MAX_PROMPT_ID} characters")
    future: asyncio.Future | None = None
    if wait is not None:  # registered before the commit, so a fast finish cannot be missed
        future = asyncio.get_running_loop().create_future()
        state.waiters.setdefault(prompt_id, []).append(future)
    try:
        checked = await asyncio.get_running_loop().run_in_executor(state.submit_pool, check_prompt, state, body,
                                                                   prompt_id)
        if isinstance(checked, web.Response):
            _drop_waiter(state, prompt_id, future)
            return checked
        request, node_errors = checked
        item = await _commit(state, request)
    except BaseException:
        _drop_waiter(state, prompt_id, future)
        raise
    state.pool.wake()
    state.hub.broadcast_status()
    reply: dict[str, Any] = {"prompt_id": item.prompt_id, "number": item.number, "node_errors": node_errors}
    if future is None:
        return web.json_response(reply)
    try:
        entry = await asyncio.wait_for(asyncio.shield(future), wait)
    except TimeoutError:
        _drop_waiter(state, prompt_id, future)
        return web.json_response(reply, status=202)
    return web.json_response(dict(reply, outputs=entry["outputs"], status=entry["status"]), dumps=dumps)


async def _commit(state: ServerState, request: AddRequest) -> QueueItem:
    """The writer's commit of this request; an error it got is this request's alone (see Store._write)."""
    try:
        return await state.writer.add(request)
    except DuplicatePromptId as exc:
        raise ApiError(400, "duplicate_prompt_id", str(exc)) from None
    except (sqlite3.Error, ValueError, TypeError) as exc:  # the database refused this request's data
        log.warning("prompt %r could not be stored: %s", request.prompt_id, exc)
        raise ApiError(400, "invalid_prompt", f"the prompt could not be stored: {exc}") from None


def _drop_waiter(state: ServerState, prompt_id: str, future: asyncio.Future | None) -> None:
    if future is None:
        return
    waiting = state.waiters.get(prompt_id, [])
    if future in waiting:
        waiting.remove(future)
    if not waiting:
        state.waiters.pop(prompt_id, None)


async def get_prompt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    remaining = await asyncio.to_thread(state.store.queue_remaining)
    return web.json_response({"exec_info": {"queue_remaining": remaining}})


async def delete_prompt(request: web.Request) -> web.Response:
    """Cancel one prompt, pending or running; no other prompt is touched."""
    state = request.app[STATE]
    prompt_id = request.match_info["prompt_id"]
    outcome = await asyncio.to_thread(state.pool.cancel, prompt_id)
    if outcome is None:
        raise ApiError(404, "not_found", f"prompt {prompt_id!r} is neither pending nor running")
    return web.json_response({"prompt_id": prompt_id, "cancelled": outcome})


async def get_queue(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    running, pending = await asyncio.to_thread(lambda: (store.running(), store.pending()))
    return web.json_response({"queue_running": [i.wire() for i in running],
                              "queue_pending": [i.wire() for i in pending]}, dumps=dumps)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "invalid_request", f"'{key}' must be true or false")
    return bool(value)


def _id_list(body: dict[str, Any], key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, "invalid_request", f"'{key}' must be a list of prompt ids")
    return value


async def post_queue(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    clear, delete = _flag(body, "clear"), _id_list(body, "delete")

    def change() -> None:
        if clear:
            state.store.clear_pending()
        if delete:
            state.store.delete_pending(delete)
    await asyncio.to_thread(change)
    state.hub.broadcast_status()
    return web.Response(status=200)


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_query", f"'{name}' must be an integer") from None
    if value < 0:
        if name == "offset":  # ComfyUI's clients send -1 for "no offset"
            return None
        raise ApiError(400, "invalid_query", f"'{name}' must not be negative")
    return min(value, MAX_QUERY_INT)  # more than there can be: everything, or nothing past the end


async def get_history(request: web.Request) -> web.Response:
    state = request.app[STATE]
    max_items, offset = _query_int(request, "max_items"), _query_int(request, "offset")
    return web.json_response(await asyncio.to_thread(state.store.history, max_items, offset), dumps=dumps)


async def get_history_entry(request: web.Request) -> web.Response:
    state = request.app[STATE]
    prompt_id = request.match_info["prompt_id"]
    entry = await asyncio.to_thread(state.store.history_entry, prompt_id)
    return web.json_response({prompt_id: entry} if entry is not None else {}, dumps=dumps)


async def post_history(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    clear, delete = _flag(body, "clear"), _id_list(body, "delete")

    def change() -> None:
        deleted = []
        if clear:
            deleted += state.store.delete_history(None)
        if delete:
            deleted += state.store.delete_history(delete)
        delete_temp_files(state.env.temp_dir, deleted)
    await asyncio.to_thread(change)
    return web.Response(status=200)


async def post_interrupt(request: web.Request) -> web.Response:
    """Without a prompt_id: interrupt whatever runs; with one: only that prompt, if it is running."""
    state = request.app[STATE]
    body = await read_json_object(request, default={})
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not isinstance(prompt_id, str):
        raise ApiError(400, "invalid_request", "'prompt_id' must be a string")
    state.pool.interrupt(prompt_id)
    return web.Response(status=200)


async def post_free(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)  # {} frees nothing: the body says what to free
    state.pool.request_free(_flag(body, "unload_models"), _flag(body, "free_memory"))
    return web.Response(status=200)


ROUTES = [
    ("POST", "/prompt", post_prompt),
    ("GET", "/prompt", get_prompt),
    ("DELETE", "/prompt/{prompt_id}", delete_prompt),
    ("GET", "/queue", get_queue),
    ("POST", "/queue", post_queue),
    ("GET", "/history", get_history),
    ("GET", "/history/{prompt_id}", get_history_entry),
    ("POST", "/history", post_history),
    ("POST", "/interrupt", post_interrupt),
    ("POST", "/free", post_free),
]
