"""User data and settings, as ComfyUI's front end stores them: /users, /userdata, /v2/userdata, /settings.

The files live in the user directory (server/user_data.py: `DATA_DIR/user/default/`, ComfyUI's layout). File
names arrive URL-encoded in the path (`/userdata/workflows%2Fa.json`) and are checked there; bodies are bounded by
--max-workflow-mb (413) and the directory's file count by --max-workflows (507); a write never replaces an existing
file when `overwrite=false` (409, as ComfyUI). One user, `default`: ComfyUI without `--multi-user` keeps one too.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.file_names import check_text, content_disposition, served_type
from server.json_values import JsonValueError, parse_json
from server.state import STATE, ApiError
from server.user_data import USER_ID, UserData, file_info, is_true, parse_flag

USER_DATA = web.AppKey("user_data", UserData)
MAX_SETTING_ID = 256
CHUNK = 1 << 16


def setup(app: web.Application) -> None:
    """Give the app its user directory (bounded as the saved workflows are)."""
    config = app[STATE].config
    app[USER_DATA] = UserData(config.data_dir, max_files=config.max_workflows, user_dir=config.user_root)


def _user_data(request: web.Request) -> UserData:
    return request.app[USER_DATA]


async def read_body(request: web.Request, what: str) -> bytes:
    """The request body, refused with a 413 as soon as it passes --max-workflow-mb (announced or streamed)."""
    limit = request.app[STATE].config.max_workflow_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"{what} is {request.content_length} bytes, over the limit of {limit} "
                                         f"bytes (--max-workflow-mb)", limit=limit)
    data = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "too_large", f"{what} is over the limit of {limit} bytes (--max-workflow-mb)",
                           limit=limit)
    return bytes(data)


async def read_json_limited(request: web.Request, what: str) -> object:
    """The body as JSON checked by server/json_values.py, bounded like read_body; a 400 that says what is wrong."""
    raw = await read_body(request, what)
    if not raw.strip():
        raise ApiError(400, "invalid_json", f"{what} must be JSON (the body is empty)")
    try:
        return parse_json(raw)
    except JsonValueError as exc:
        raise ApiError(400, "invalid_json", f"{what}: {exc}") from None


# users -------------------------------------------------------------------------------------------------
async def get_users(request: web.Request) -> web.Response:
    """Single-user storage on the server, as ComfyUI answers without --multi-user; `migrated` once the user
    directory exists (before that the front end moves settings it kept in the browser to the server)."""
    return web.json_response({"storage": "server", "migrated": _user_data(request).root.is_dir()})


async def post_users(request: web.Request) -> web.Response:
    body = await read_json_limited(request, "the new user")
    if not isinstance(body, dict) or not isinstance(body.get("username"), str):
        raise ApiError(400, "invalid_json", "the body must be {\"username\": NAME}")
    raise ApiError(403, "single_user", f"this server has one user, {USER_ID!r} (no multi-user mode): its files are "
                                       f"in user/{USER_ID}/ of the data directory")


# user files ----------------------------------------------------------------------------------------------
async def list_userdata(request: web.Request) -> web.Response:
    directory = request.query.get("dir", "")
    if not directory:
        raise ApiError(400, "invalid_filename", "'dir' is required: the folder to list, e.g. dir=workflows")
    listing = await asyncio.to_thread(_user_data(request).listing, directory, is_true(request.query.get("recurse")),
                                      is_true(request.query.get("full_info")), is_true(request.query.get("split")))
    return web.json_response(listing)


async def list_userdata_v2(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(_user_data(request).listing_v2, request.query.get("path", "")))


async def get_userdata(request: web.Request) -> web.StreamResponse:
    """A user file: allow-listed types (JSON, images) inline, anything else as a download, never as a page."""
    name = request.match_info["file"]
    path = await asyncio.to_thread(_user_data(request).existing_file, name)
    content_type, disposition = served_type(path.name)
    return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                           "Content-Disposition": content_disposition(disposition, path.name)})


def _answer(user_data: UserData, target, full_info: bool) -> web.Response:
    """What a write answers, as ComfyUI: the file's info with `full_info=true`, else its path in the directory."""
    if full_info:
        return web.json_response(file_info(target, user_data.root.resolve()))
    return web.json_response(user_data.relative(target))


async def post_userdata(request: web.Request) -> web.Response:
    user_data, name = _user_data(request), request.match_info["file"]
    user_data.resolve(name)  # a bad name is refused before the body is read
    overwrite = parse_flag(request.query.get("overwrite"), True)
    data = await read_body(request, f"user file {name!r}")
    target = await asyncio.to_thread(user_data.store, name, data, overwrite)
    return _answer(user_data, target, is_true(request.query.get("full_info")))


async def delete_userdata(request: web.Request) -> web.Response:
    await asyncio.to_thread(_user_data(request).delete, request.match_info["file"])
    return web.Response(status=204)


async def move_userdata(request: web.Request) -> web.Response:
    user_data = _user_data(request)
    source, dest = request.match_info["file"], request.match_info["dest"]
    overwrite = parse_flag(request.query.get("overwrite"), True)
    target = await asyncio.to_thread(user_data.move, source, dest, overwrite)
    return _answer(user_data, target, is_true(request.query.get("full_info")))


# settings --------------------------------------------------------------------------------------------------
def _setting_id(request: web.Request) -> str:
    setting = request.match_info["id"]
    check_text(setting, "setting id")
    if not setting or len(setting) > MAX_SETTING_ID:
        raise ApiError(400, "invalid_setting", f"a setting id is 1 to {MAX_SETTING_ID} characters, not "
                                               f"{len(setting)}")
    return setting


async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(_user_data(request).settings))


async def get_setting(request: web.Request) -> web.Response:
    setting = _setting_id(request)
    settings = await asyncio.to_thread(_user_data(request).settings)
    return web.json_response(settings.get(setting))


async def post_settings(request: web.Request) -> web.Response:
    changes = await read_json_limited(request, "the settings")
    if not isinstance(changes, dict):
        raise ApiError(400, "invalid_json", f"the settings must be a JSON object of id → value, not a "
                                            f"{type(changes).__name__}")
    await asyncio.to_thread(_user_data(request).update_settings, changes)
    return web.Response(status=200)


async def post_setting(request: web.Request) -> web.Response:
    setting = _setting_id(request)
    value = await read_json_limited(request, f"setting {setting!r}")
    await asyncio.to_thread(_user_data(request).update_settings, {setting: value})
    return web.Response(status=200)


ROUTES = [
    ("GET", "/users", get_users),
    ("POST", "/users", post_users),
    ("GET", "/userdata", list_userdata),
    ("GET", "/v2/userdata", list_userdata_v2),
    ("GET", "/userdata/{file}", get_userdata),
    ("POST", "/userdata/{file}", post_userdata),
    ("DELETE", "/userdata/{file}", delete_userdata),
    ("POST", "/userdata/{file}/move/{dest}", move_userdata),
    ("GET", "/settings", get_settings),
    ("POST", "/settings", post_settings),
    ("GET", "/settings/{id}", get_setting),
    ("POST", "/settings/{id}", post_setting),
]
