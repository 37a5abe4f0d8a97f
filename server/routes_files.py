"""Files: GET /view and the saved-workflows folder; the uploads are server/uploads.py's.

Every name from a request goes through server/file_names.py: a file name that is not a plain name (a path, a
control character, over 255 bytes) is a 400, a subfolder that leaves its folder is a 403 (as in ComfyUI).
/view serves allow-listed types inline and anything else as a download, naming the file in an RFC 6266
Content-Disposition. Saved workflows are bounded in size (--max-workflow-mb, 413) and count (--max-workflows, 507).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

from aiohttp import web
from PIL import Image

from nodes.environment import UnsafePathError, list_files, safe_join
from nodes.image_io import IMAGE_EXTENSIONS, list_input_images
from server.file_names import (
    WORKFLOW_NAME_PATTERN,
    check_file_name,
    check_text,
    content_disposition,
    folder_of,
    resolve,
    served_type,
)
from server.state import STATE, ApiError, ServerConfig, ServerState, read_json
from server.uploads import open_checked, upload_image, upload_mask

WORKFLOW_NAME = re.compile(WORKFLOW_NAME_PATTERN)


# /view ---------------------------------------------------------------------------------------------
def _converted(path: Path, name: str, preview: str | None, channel: str, config: ServerConfig) -> tuple[bytes, str]:
    """The file's first frame re-encoded (a preview, or one channel): only that frame is checked and decoded."""
    image = open_checked(path, name, config, all_frames=False)
    if channel == "a":
        image = (image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)).convert("RGBA")
        alpha = image.getchannel("R")
        image = Image.merge("RGBA", (alpha, alpha, alpha, Image.new("L", image.size, 255)))
    elif channel == "rgb":
        image = image.convert("RGB")
    fmt, quality = "png", 90
    if preview:
        fmt_name, _, q = preview.partition(";")
        fmt = fmt_name.lower() if fmt_name.lower() in ("webp", "jpeg", "png") else "webp"
        quality = int(q) if q.isdigit() and 1 <= int(q) <= 100 else 90
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue(), f"image/{fmt}"


async def view(request: web.Request) -> web.StreamResponse:
    """A file of input/, output/ or temp/: allow-listed types inline, any other as an attachment."""
    state = request.app[STATE]
    filename = request.query.get("filename")
    if not filename:
        raise ApiError(400, "invalid_filename", "'filename' is required")
    kind = request.query.get("type") or "output"
    suffix = re.search(r" \[(input|output|temp)\]$", filename)
    if suffix:
        filename, kind = filename[:suffix.start()], suffix.group(1)
    path = resolve(state, kind, request.query.get("subfolder", ""), filename)
    if not path.is_file() and kind == "input" and not request.query.get("subfolder"):
        path = state.env.input_file(filename, IMAGE_EXTENSIONS) or path  # a shipped example, as LoadImage lists
    if not path.is_file():
        raise ApiError(404, "not_found", f"{filename!r} does not exist in the {kind} folder")
    channel = request.query.get("channel", "rgba")
    if channel not in ("rgba", "rgb", "a"):
        raise ApiError(400, "invalid_channel", "channel must be rgba, rgb or a")
    preview = request.query.get("preview")
    if preview or channel != "rgba":
        data, content_type = await asyncio.to_thread(_converted, path, filename, preview, channel, state.config)
        return web.Response(body=data, content_type=content_type,
                            headers={"Content-Disposition": content_disposition("inline", filename)})
    content_type, disposition = served_type(filename)
    return web.FileResponse(path, headers={"Content-Disposition": content_disposition(disposition, filename),
                                           "Content-Type": content_type})


# saved workflows -----------------------------------------------------------------------------------
def workflow_path(state: ServerState, name: str) -> Path:
    check_text(name, "workflow name")
    if not WORKFLOW_NAME.fullmatch(name):
        raise ApiError(400, "invalid_name", f"invalid workflow name {name!r}: at most 128 characters, none of "
                                            f"<>:\"|?*/\\ or '..', not starting with '.', '-' or a space")
    name = name if name.endswith(".json") else name + ".json"
    check_file_name(name, "workflow name")
    try:
        return safe_join(state.workflows_dir, name)
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"workflow {name!r} is outside the workflows folder") from None


def _saved(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []


async def list_workflows(request: web.Request) -> web.Response:
    return web.json_response(_saved(request.app[STATE].workflows_dir))


async def get_workflow(request: web.Request) -> web.Response:
    path = workflow_path(request.app[STATE], request.match_info["name"])
    if not path.is_file():
        raise ApiError(404, "not_found", f"no saved workflow {path.name!r}")
    try:
        return web.json_response(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(409, "corrupt_workflow", f"saved workflow {path.name!r} is not valid JSON") from None


async def _workflow_body(request: web.Request, limit: int) -> object:
    """The JSON body, refused with a 413 past --max-workflow-mb (0: no limit but the server's body limit), before
    it is read when its length is declared."""
    too_large = ApiError(413, "too_large", f"a saved workflow may be at most {limit} bytes "
                                           f"(--max-workflow-mb {round(limit / (1 << 20), 3):g})",
                         limit="max_workflow_mb")
    if limit and request.content_length is not None and request.content_length > limit:
        raise too_large
    if limit and len(await request.read()) > limit:  # a chunked body: read (within the server's limit), then refused
        raise too_large
    return await read_json(request)


async def put_workflow(request: web.Request) -> web.Response:
    state = request.app[STATE]
    path = workflow_path(state, request.match_info["name"])
    body = await _workflow_body(request, state.config.max_workflow_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_workflow", "a workflow must be a JSON object")
    limit = state.config.max_workflows
    # No await from here to the write: two requests cannot both take the last free place.
    if limit and not path.exists() and len(_saved(state.workflows_dir)) >= limit:
        raise ApiError(507, "quota_exceeded", f"{limit} workflows are saved already, the limit of --max-workflows "
                                              f"{limit}: delete one first", limit="max_workflows", value=limit)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(body, indent=1), encoding="utf-8")
    temporary.replace(path)
    return web.json_response({"name": path.name})


async def delete_workflow(request: web.Request) -> web.Response:
    path = workflow_path(request.app[STATE], request.match_info["name"])
    if not path.is_file():
        raise ApiError(404, "not_found", f"no saved workflow {path.name!r}")
    path.unlink()
    return web.json_response({"deleted": path.name})


# /internal/files --------------------------------------------------------------------------------------
def _image_options(state: ServerState, kind: str) -> list[str]:
    """The images of a folder as LoadImage (input) and LoadImageOutput (output, `name [output]`) offer them,
    newest first: what ComfyUI's front end puts in the combo when its refresh button asks this route."""
    folder = folder_of(state, kind)
    names = list_input_images(state.env) if kind == "input" else list_files(folder, IMAGE_EXTENSIONS)

    def modified(name: str) -> float:
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            return 0.0
    annotation = "" if kind == "input" else f" [{kind}]"
    return [name + annotation for name in sorted(names, key=modified, reverse=True)]


async def internal_files(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(await asyncio.to_thread(_image_options, state, request.match_info["directory_type"]))


ROUTES = [
    ("GET", "/view", view),
    ("GET", "/internal/files/{directory_type}", internal_files),
    ("POST", "/upload/image", upload_image),
    ("POST", "/upload/mask", upload_mask),
    ("GET", "/workflows", list_workflows),
    ("GET", "/workflows/{name}", get_workflow),
    ("PUT", "/workflows/{name}", put_workflow),
    ("DELETE", "/workflows/{name}", delete_workflow),
]
