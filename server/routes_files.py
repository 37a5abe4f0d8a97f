"""Files: GET /view, POST /upload/image and /upload/mask, and the saved-workflows folder.

Every name from a request goes through `safe_join`: a file name that tries to leave its folder is a 400,
a subfolder that does is a 403 (as in ComfyUI). Images are checked before they are decoded: a header
that announces more pixels than the configured limit is refused (decompression bombs).
"""

from __future__ import annotations

import asyncio
import io
import json
import mimetypes
import re
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from nodes.environment import UnsafePathError, safe_join
from server.state import STATE, ApiError, ServerState, read_json

FOLDER_TYPES = ("input", "output", "temp")
UNSAFE_MIMETYPES = {"text/html", "text/javascript", "application/javascript", "text/css", "image/svg+xml"}
WORKFLOW_NAME = re.compile(r"^[\w][\w .\-]{0,127}$")


def folder_of(state: ServerState, kind: str) -> Path:
    if kind not in FOLDER_TYPES:
        raise ApiError(400, "invalid_type", f"type must be one of {', '.join(FOLDER_TYPES)}, not {kind!r}")
    return {"input": state.env.input_dir, "output": state.env.output_dir, "temp": state.env.temp_dir}[kind]


def check_file_name(name: str) -> str:
    if not name or "\0" in name or name.startswith(("/", "\\")) or ".." in name or "/" in name or "\\" in name:
        raise ApiError(400, "invalid_filename", f"invalid file name {name!r}")
    return name


def resolve(state: ServerState, kind: str, subfolder: str, filename: str) -> Path:
    """The file's path; 400 for a bad file name, 403 for a subfolder that leaves the folder."""
    root = folder_of(state, kind)
    check_file_name(filename)
    try:
        folder = safe_join(root, subfolder) if subfolder else root.resolve()
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"subfolder {subfolder!r} is outside the {kind} folder") from None
    try:
        return safe_join(folder, filename)
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"{filename!r} resolves outside the {kind} folder") from None


def open_checked(data: bytes | Path, max_pixels: int) -> Image.Image:
    """Open an image, refusing non-images and headers announcing more than max_pixels, before decoding."""
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", "the image announces too many pixels to decode safely") from None
    except (UnidentifiedImageError, OSError):
        raise ApiError(400, "invalid_image", "not a readable image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"image of {width}x{height} pixels exceeds the limit of "
                                               f"{max_pixels} pixels")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError):
        raise ApiError(400, "invalid_image", "the image could not be decoded") from None
    return image


# /view ---------------------------------------------------------------------------------------------
def _converted(path: Path, preview: str | None, channel: str, max_pixels: int) -> tuple[bytes, str]:
    image = open_checked(path, max_pixels)
    if channel == "a":
        image = (image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)).convert("RGBA")
        alpha = image.getchannel("R")
        image = Image.merge("RGBA", (alpha, alpha, alpha, Image.new("L", image.size, 255)))
    elif channel == "rgb":
        image = image.convert("RGB")
    fmt, quality = "png", 90
    if preview:
        name, _, q = preview.partition(";")
        fmt = name.lower() if name.lower() in ("webp", "jpeg", "png") else "webp"
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
    state = request.app[STATE]
    filename = request.query.get("filename")
    if not filename:
        raise ApiError(400, "invalid_filename", "'filename' is required")
    kind = request.query.get("type") or "output"
    suffix = re.search(r" \[(input|output|temp)\]$", filename)
    if suffix:
        filename, kind = filename[:suffix.start()], suffix.group(1)
    path = resolve(state, kind, request.query.get("subfolder", ""), filename)
    if not path.is_file():
        raise ApiError(404, "not_found", f"{filename!r} does not exist in the {kind} folder")
    channel = request.query.get("channel", "rgba")
    if channel not in ("rgba", "rgb", "a"):
        raise ApiError(400, "invalid_channel", "channel must be rgba, rgb or a")
    preview = request.query.get("preview")
    disposition = {"Content-Disposition": f'filename="{path.name}"'}
    if preview or channel != "rgba":
        data, content_type = await asyncio.to_thread(_converted, path, preview, channel,
                                                     state.config.max_image_pixels)
        return web.Response(body=data, content_type=content_type, headers=disposition)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type in UNSAFE_MIMETYPES:
        content_type = "application/octet-stream"
    return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})


# uploads -------------------------------------------------------------------------------------------
async def _multipart(request: web.Request) -> dict[str, Any]:
    """The form's fields: strings, and files as (filename, bytes); the body size limit is enforced."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "invalid_form", "expected a multipart/form-data body")
    limit = request.app[STATE].config.max_upload_bytes
    reader = await request.multipart()
    fields: dict[str, Any] = {}
    async for part in reader:
        if not isinstance(part, BodyPartReader) or not part.name:
            continue
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            if len(data) > limit:
                raise ApiError(413, "too_large", f"upload exceeds the limit of {limit} bytes")
        fields[part.name] = (part.filename, bytes(data)) if part.filename is not None else data.decode(errors="replace")
    return fields


def _free_name(folder: Path, name: str) -> str:
    """`name`, or `stem (n).ext` for the first n that is free."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while (folder / candidate).exists():
        candidate = f"{stem} ({n}){dot}{ext}"
        n += 1
    return candidate


def _store_upload(state: ServerState, fields: dict[str, Any], mask: bool) -> dict[str, str]:
    upload = fields.get("image")
    if not isinstance(upload, tuple) or not upload[0]:
        raise ApiError(400, "no_file", "the form needs a file in the 'image' field")
    filename, data = upload
    check_file_name(filename)
    kind = fields.get("type") or "input"
    subfolder = fields.get("subfolder") or ""
    path = resolve(state, kind, subfolder, filename)
    image = open_checked(data, state.config.max_image_pixels)
    overwrite = str(fields.get("overwrite", "")).lower() in ("true", "1")
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        image = _apply_mask(state, fields, image)
        if not overwrite:
            path = path.parent / _free_name(path.parent, path.name)
        image[0].save(path, format="PNG", pnginfo=image[1])
    else:
        if not overwrite and path.exists():
            path = path.parent / _free_name(path.parent, path.name)
        path.write_bytes(data)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def _apply_mask(state: ServerState, fields: dict[str, Any], mask: Image.Image) -> tuple[Image.Image, PngInfo]:
    """The original image (from `original_ref`) with the mask's alpha as its alpha; text chunks kept."""
    try:
        ref = json.loads(fields.get("original_ref") or "")
    except ValueError:
        raise ApiError(400, "invalid_original_ref", "'original_ref' must be JSON {filename, subfolder, type}") \
            from None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise ApiError(400, "invalid_original_ref", "'original_ref' must name a filename")
    original_path = resolve(state, str(ref.get("type") or "input"), str(ref.get("subfolder") or ""), ref["filename"])
    if not original_path.is_file():
        raise ApiError(404, "not_found", f"original image {ref['filename']!r} does not exist")
    original = open_checked(original_path, state.config.max_image_pixels)
    info = PngInfo()
    for key, value in getattr(original, "text", {}).items():
        info.add_text(key, value)
    original = ImageOps.exif_transpose(original).convert("RGBA")
    alpha = mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L")
    original.putalpha(alpha.resize(original.size, Image.Resampling.LANCZOS))
    return original, info


async def upload_image(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fields = await _multipart(request)
    return web.json_response(await asyncio.to_thread(_store_upload, state, fields, False))


async def upload_mask(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fields = await _multipart(request)
    return web.json_response(await asyncio.to_thread(_store_upload, state, fields, True))


# saved workflows -----------------------------------------------------------------------------------
def workflow_path(state: ServerState, name: str) -> Path:
    if not WORKFLOW_NAME.match(name) or ".." in name:
        raise ApiError(400, "invalid_name", f"invalid workflow name {name!r}: letters, digits, space, '.', "
                                            f"'-' and '_' only")
    name = name if name.endswith(".json") else name + ".json"
    try:
        return safe_join(state.workflows_dir, name)
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"workflow {name!r} is outside the workflows folder") from None


async def list_workflows(request: web.Request) -> web.Response:
    folder = request.app[STATE].workflows_dir
    names = sorted(p.name for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []
    return web.json_response(names)


async def get_workflow(request: web.Request) -> web.Response:
    path = workflow_path(request.app[STATE], request.match_info["name"])
    if not path.is_file():
        raise ApiError(404, "not_found", f"no saved workflow {path.name!r}")
    try:
        return web.json_response(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(409, "corrupt_workflow", f"saved workflow {path.name!r} is not valid JSON") from None


async def put_workflow(request: web.Request) -> web.Response:
    state = request.app[STATE]
    path = workflow_path(state, request.match_info["name"])
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_workflow", "a workflow must be a JSON object")
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


ROUTES = [
    ("GET", "/view", view),
    ("POST", "/upload/image", upload_image),
    ("POST", "/upload/mask", upload_mask),
    ("GET", "/workflows", list_workflows),
    ("GET", "/workflows/{name}", get_workflow),
    ("PUT", "/workflows/{name}", put_workflow),
    ("DELETE", "/workflows/{name}", delete_workflow),
]
