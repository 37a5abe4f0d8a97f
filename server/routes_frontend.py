"""What ComfyUI's front end asks the server for besides prompts and files: translations, extensions, the model
library, model metadata and previews, the server log, folder paths and the workflow templates.

Shapes are those the front end reads (`comfyui-frontend-package`, the version pinned in pyproject). Where ComfyUI
would show a folder's absolute path (`/experiment/models`, `/internal/folder_paths`), we show the public name every
other message uses (`models/checkpoints`, `<extra checkpoints: sd>`), never where the data directory is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
from pathlib import Path

from aiohttp import web
from PIL import Image

from nodes.environment import (
    MODEL_FOLDERS,
    UnsafePathError,
    check_name_parts,
    list_files,
    model_metadata,
    name_paths,
    safe_join,
)
from server import workflow_templates
from server.extensions import script_urls
from server.file_names import check_text
from server.log_buffer import LOG_BUFFER, LogBuffer
from server.routes_info import MODEL_EXTENSIONS
from server.routes_user import read_json_limited
from server.state import ROOT, STATE, ApiError, ServerState
from server.uploads import open_checked

TEMPLATES_DIR = ROOT / "workflows"
PREVIEW_EXTENSIONS = (".webp", ".png", ".jpg", ".jpeg", ".gif")
PREVIEW_SIZE = 512  # longest side of a model preview, as the model library shows it
SAFETENSORS = (".safetensors", ".sft")
THUMBNAIL = re.compile(r"(?P<name>.+?)(?:-1)?\.webp")
LOCALIZED_INDEX = re.compile(r"index\.[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})?\.json")


def setup(app: web.Application) -> None:
    """Give the app its log buffer, attached to the root logger while the app runs."""
    buffer = LogBuffer(app[STATE].hub)
    app[LOG_BUFFER] = buffer

    async def attach(app: web.Application) -> None:
        buffer.attach()

    async def detach(app: web.Application) -> None:
        buffer.detach()

    app.on_startup.append(attach)
    app.on_cleanup.append(detach)


# static answers ----------------------------------------------------------------------------------------------
async def i18n(request: web.Request) -> web.Response:
    """Node packs' translations by locale (ComfyUI gathers their `locales/` folders): none of ours ship any."""
    return web.json_response({})


async def extensions(request: web.Request) -> web.Response:
    """The node packs' front-end extension scripts to import (their WEB_DIRECTORY, server/extensions.py; the
    front end's own core extensions are bundled in it and skipped by it)."""
    return web.json_response(script_urls(request.app))


async def workflow_templates_of_packs(request: web.Request) -> web.Response:
    """Node packs' example workflows by pack (ComfyUI reads their `example_workflows/`): none."""
    return web.json_response({})


# model library ---------------------------------------------------------------------------------------------------
def _model_folder(folder: str) -> str:
    if folder not in MODEL_FOLDERS:
        raise ApiError(404, "not_found", f"unknown model folder {folder!r}; known: {', '.join(MODEL_FOLDERS)}",
                       folder=folder)
    return folder


def _model_name(name: str, what: str = "filename") -> str:
    check_text(name, what)
    if not name:
        raise ApiError(400, "invalid_filename", f"'{what}' is required")
    try:
        check_name_parts(name)
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"{what} {name!r} leaves its model folder", path=name) from None
    return name


async def model_folders(request: web.Request) -> web.Response:
    env = request.app[STATE].env
    return web.json_response([{"name": kind, "folders": [env.public_name(d) for d in env.model_dirs(kind)]}
                              for kind in MODEL_FOLDERS])


def _models_in(state: ServerState, kind: str) -> list[dict[str, object]]:
    return [{"name": name, "pathIndex": index} for index, folder in enumerate(state.env.model_dirs(kind))
            for name in list_files(folder, MODEL_EXTENSIONS)]


async def models_in(request: web.Request) -> web.Response:
    """The files of a model folder, each with the index of the folder (of those /experiment/models lists) it is in."""
    kind = _model_folder(request.match_info["folder"])
    return web.json_response(await asyncio.to_thread(_models_in, request.app[STATE], kind))


def _in_folder(root: Path, name: str) -> Path | None:
    try:
        path = safe_join(root, name)
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"{name!r} resolves outside its model folder", path=name) from None
    return path if path.is_file() else None


def _metadata(state: ServerState, kind: str, name: str) -> dict[str, str]:
    if not name.lower().endswith(SAFETENSORS):
        raise ApiError(404, "not_found", f"{name!r} is not a .safetensors file: only those carry metadata",
                       path=name)
    for folder in state.env.model_dirs(kind):
        path = _in_folder(folder, name)
        if path is not None:
            try:
                return model_metadata(path)
            except ValueError as exc:  # the reader's message names the file: publicly, never by absolute path
                reason = name_paths(str(exc), state.env.folder_names())
                raise ApiError(400, "invalid_model", f"{kind} model {name!r} has an unreadable header: "
                                                     f"{reason[-300:]}", path=name) from None
    raise ApiError(404, "not_found", f"{kind} model {name!r} not found", path=name)


async def view_metadata(request: web.Request) -> web.Response:
    """The `__metadata__` of a safetensors model (training details, a LoRA's trigger words)."""
    kind = _model_folder(request.match_info["folder"])
    name = _model_name(request.query.get("filename", ""))
    return web.json_response(await asyncio.to_thread(_metadata, request.app[STATE], kind, name))


def _preview(state: ServerState, kind: str, index: int, name: str) -> bytes:
    """A model's preview as WebP: an image beside the model (`x.png`, `x.preview.png`, ...), else the first cover
    image in its safetensors metadata (`ssmd_cover_images`, base64), at most PREVIEW_SIZE pixels a side."""
    folders = state.env.model_dirs(kind)
    if not 0 <= index < len(folders):
        raise ApiError(404, "not_found", f"{kind} has {len(folders)} folders; no folder {index}")
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    image: Image.Image | None = None
    for suffix in (*PREVIEW_EXTENSIONS, *(".preview" + ext for ext in PREVIEW_EXTENSIONS)):
        path = _in_folder(folders[index], stem + suffix)
        if path is not None:
            image = open_checked(path, Path(name).name, state.config, all_frames=False)
            break
    else:
        for suffix in SAFETENSORS:
            path = _in_folder(folders[index], stem + suffix)
            if path is None:
                continue
            try:
                covers = json.loads(model_metadata(path).get("ssmd_cover_images") or "[]")
                data = base64.b64decode(covers[0], validate=True) if covers and isinstance(covers[0], str) else b""
            except (ValueError, binascii.Error, TypeError, IndexError):
                data = b""
            if data:
                image = open_checked(data, Path(name).name, state.config, all_frames=False)
                break
    if image is None:
        raise ApiError(404, "not_found", f"no preview image for {kind} model {stem!r}", path=name)
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    buffer = io.BytesIO()
    image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="WEBP", quality=85)
    return buffer.getvalue()


async def model_preview(request: web.Request) -> web.Response:
    kind = _model_folder(request.match_info["folder"])
    raw_index = request.match_info["path_index"]
    if not raw_index.isdigit():
        raise ApiError(400, "invalid_path_index", f"path_index must be a folder's number, not {raw_index!r}")
    name = _model_name(request.match_info["filename"])
    index = int(raw_index) if len(raw_index) <= 6 else -1  # more folders than that: none
    data = await asyncio.to_thread(_preview, request.app[STATE], kind, index, name)
    return web.Response(body=data, content_type="image/webp", headers={"Cache-Control": "no-cache"})


# internal ------------------------------------------------------------------------------------------------------
async def logs_text(request: web.Request) -> web.Response:
    """The recent log as one text (a JSON string), each line prefixed by its time, as ComfyUI answers."""
    return web.json_response("".join(f"{entry['t']} - {entry['m']}" for entry in request.app[LOG_BUFFER].entries()))


async def logs_raw(request: web.Request) -> web.Response:
    buffer = request.app[LOG_BUFFER]
    return web.json_response({"entries": buffer.entries(), "size": buffer.size()})


async def logs_subscribe(request: web.Request) -> web.Response:
    """`{clientId, enabled}`: send (or stop sending) new log lines to that WebSocket client as `logs` events."""
    body = await read_json_limited(request, "the subscription")
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be {\"clientId\": ID, \"enabled\": true|false}")
    client_id, enabled = body.get("clientId"), body.get("enabled")
    if not isinstance(client_id, str) or not 0 < len(client_id) <= 200:
        raise ApiError(400, "invalid_client_id", "'clientId' must be the WebSocket's client id (1 to 200 characters)")
    if not isinstance(enabled, bool):
        raise ApiError(400, "invalid_json", "'enabled' must be true or false")
    request.app[LOG_BUFFER].subscribe(client_id, enabled)
    return web.Response(status=200)


async def folder_paths(request: web.Request) -> web.Response:
    """Where each kind of model is looked for (the missing-models dialog shows it), by public name."""
    env = request.app[STATE].env
    return web.json_response({kind: [env.public_name(d) for d in env.model_dirs(kind)] for kind in MODEL_FOLDERS})


# templates -----------------------------------------------------------------------------------------------------
async def template_file(request: web.Request) -> web.StreamResponse:
    """`/templates/index.json` (also `index.<locale>.json`: ours are in English), `index_logo.json` (no logos),
    a shipped workflow `<name>.json`, or its drawn thumbnail `<name>-1.webp`."""
    file = request.match_info["file"]
    if file == "index.json" or LOCALIZED_INDEX.fullmatch(file):
        return web.json_response(await asyncio.to_thread(workflow_templates.index, TEMPLATES_DIR),
                                 headers={"Cache-Control": "no-cache"})
    if file == "index_logo.json":
        return web.json_response({})
    shipped = await asyncio.to_thread(workflow_templates.shipped, TEMPLATES_DIR)
    if file.endswith(".json") and file[:-5] in shipped:
        return web.FileResponse(shipped[file[:-5]], headers={"Content-Type": "application/json",
                                                            "Cache-Control": "no-cache"})
    match = THUMBNAIL.fullmatch(file)
    if match and match.group("name") in shipped:
        data = await asyncio.to_thread(workflow_templates.thumbnail, shipped[match.group("name")])
        return web.Response(body=data, content_type="image/webp")
    raise ApiError(404, "not_found", f"no template file {file!r}; the templates are "
                                     f"{', '.join(sorted(shipped)) or 'none'}", path=file)


ROUTES = [
    ("GET", "/i18n", i18n),
    ("GET", "/extensions", extensions),
    ("GET", "/workflow_templates", workflow_templates_of_packs),
    ("GET", "/experiment/models", model_folders),
    ("GET", "/experiment/models/{folder}", models_in),
    ("GET", "/experiment/models/preview/{folder}/{path_index}/{filename:[\\s\\S]+}", model_preview),  # newlines too
    ("GET", "/view_metadata/{folder}", view_metadata),
    ("GET", "/internal/logs", logs_text),
    ("GET", "/internal/logs/raw", logs_raw),
    ("PATCH", "/internal/logs/subscribe", logs_subscribe),
    ("GET", "/internal/folder_paths", folder_paths),
]
