"""POST /upload/image and /upload/mask: reading the form, checking the image, and the input folder's quotas.

The form is read by our own loop, so that every way a multipart body can be malformed (NUL, CR or LF in a part
header, a line over aiohttp's limits, a body cut short) is a 400 that says so, never a 500; its size is bounded
in total, not only per part. An image is checked from its headers before anything is decoded or stored: every
frame's pixels together against --max-image-pixels and the frame count against --max-image-frames
(nodes/image_limits.py), since LoadImage decodes every frame. What is stored under input/ is bounded by
--max-input-mb and --max-input-files (507, as for any full storage: the request itself was fine).
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from nodes.image_io import IMAGE_EXTENSIONS
from nodes.image_limits import ImageLimitError, check_frames
from nodes.video_io import VIDEO_EXTENSIONS, VideoUnavailableError, check_video
from server.file_names import MAX_NAME_BYTES, check_file_name, check_subfolder, resolve
from server.state import STATE, ApiError, ServerConfig, ServerState

log = logging.getLogger(__name__)

FORM_FIELDS = ("image", "type", "subfolder", "overwrite", "original_ref")
MAX_TEXT_FIELD = 64 << 10  # type, subfolder, overwrite, original_ref: short texts
FORM_ENVELOPE = 64 << 10  # part headers and boundaries around the file
# Quota check and write happen together, or two uploads could both fit alone and overflow together.
_STORE_LOCK = threading.Lock()


def open_checked(data: bytes | Path, name: str, config: ServerConfig, all_frames: bool = True) -> Image.Image:
    """Open an image, refusing non-images and, before decoding, files over the pixel or frame limits: counting
    every frame (as LoadImage will decode them) or, with `all_frames=False`, the first one (all that is used)."""
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"image {name!r} announces too many pixels to decode safely") \
            from None
    except (UnidentifiedImageError, OSError):
        raise ApiError(400, "invalid_image", f"{name!r} is not a readable image") from None
    try:
        check_frames(image, data, name, config.max_image_pixels, config.max_image_frames, first_only=not all_frames)
    except ImageLimitError as exc:
        image.close()
        raise ApiError(413, "image_too_large", str(exc), limit=exc.limit) from None
    except (OSError, ValueError, SyntaxError, IndexError, struct.error):
        image.close()
        raise ApiError(400, "invalid_image", f"{name!r} is not a readable image") from None
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError, IndexError, struct.error):
        image.close()
        raise ApiError(400, "invalid_image", f"image {name!r} could not be decoded") from None
    return image


def check_video_upload(data: bytes, name: str, config: ServerConfig) -> None:
    """A video (ComfyUI's front end uploads LoadVideo's files here too) is checked as LoadVideo will read it, from
    its headers and packets, nothing decoded: 413 over the pixel or frame limits (all its frames), 400 when it is
    no video or is cut short, 501 without PyAV."""
    try:
        check_video(data, name, config.max_image_pixels, config.max_image_frames)
    except VideoUnavailableError as exc:
        raise ApiError(501, "video_unavailable", str(exc)) from None
    except ImageLimitError as exc:
        raise ApiError(413, "image_too_large", str(exc), limit=exc.limit) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_video", str(exc)) from None


# the form ------------------------------------------------------------------------------------------
async def read_form(request: web.Request) -> dict[str, Any]:
    """The upload form's known fields: texts, and the file as (filename, bytes). A 413 past the upload limit
    (the file, each text, the whole body); a 400 for a malformed body, whatever aiohttp found wrong in it."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "invalid_form", "expected a multipart/form-data body")
    limit = request.app[STATE].config.max_upload_bytes
    try:
        return await _read_parts(request, limit)
    except LineTooLong as exc:
        raise ApiError(400, "invalid_form", f"a line of the multipart form is longer than {exc.args[1]} bytes") \
            from None
    except (BadHttpMessage, HttpProcessingError) as exc:
        reason = getattr(exc, "message", "") or type(exc).__name__
        raise ApiError(400, "invalid_form", f"malformed multipart part header: {reason.strip()[:200]} (no "
                                            f"control characters such as NUL, CR or LF in header values)") from None
    except (ValueError, AssertionError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_form", f"malformed or truncated multipart body: {str(exc)[:200]}") from None


async def _read_parts(request: web.Request, limit: int) -> dict[str, Any]:
    reader = await request.multipart()
    fields: dict[str, Any] = {}
    total = 0
    async for part in reader:
        if not isinstance(part, BodyPartReader):  # a nested multipart: not part of this form
            raise ApiError(400, "invalid_form", "nested multipart parts are not allowed in an upload form")
        is_file = part.filename is not None
        part_limit = limit if is_file else MAX_TEXT_FIELD
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            total += len(chunk)
            if total > limit + FORM_ENVELOPE:
                raise ApiError(413, "too_large", f"upload exceeds the limit of {limit} bytes")
            if part.name not in FORM_FIELDS:
                continue  # read past, kept nowhere
            data += chunk
            if len(data) > part_limit:
                what = "upload" if is_file else f"form field {part.name!r}"
                raise ApiError(413, "too_large", f"{what} exceeds the limit of {part_limit} bytes")
        if part.name in FORM_FIELDS:
            fields[part.name] = (part.filename, bytes(data)) if is_file else data.decode(errors="replace")
    return fields


def _text(fields: dict[str, Any], name: str, default: str = "") -> str:
    value = fields.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ApiError(400, "invalid_form", f"form field {name!r} must be text, not a file")
    return value


# storing -------------------------------------------------------------------------------------------
def _fit(stem: str, tail: str) -> str:
    """`stem + tail`, the stem shortened until the whole is a file name of at most 255 bytes."""
    while stem and len((stem + tail).encode("utf-8")) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem + tail


def _free_name(folder: Path, name: str) -> str:
    """`name`, or `stem (n).ext` for the first n that is free."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while (folder / candidate).exists():
        candidate = _fit(stem, f" ({n}){dot}{ext}")
        n += 1
    return candidate


def folder_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) under `folder`, subfolders included, symlinks not followed nor counted."""
    total = count = 0
    pending = [folder]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        count += 1
        except OSError as exc:  # a folder removed meanwhile or unreadable: what is left is counted
            log.debug("input quota: cannot list %s: %s", exc.filename, exc.strerror)
    return total, count


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def check_input_quota(config: ServerConfig, input_dir: Path, path: Path, size: int) -> None:
    """507 when writing `size` bytes to `path` would take the input folder past --max-input-files or
    --max-input-mb (a file replaced in place frees its own size and takes no new slot)."""
    if not config.max_input_bytes and not config.max_input_files:
        return
    used, files = folder_usage(input_dir)
    if path.is_file():
        used -= path.stat().st_size
    else:
        files += 1
    if config.max_input_files and files > config.max_input_files:
        raise ApiError(507, "quota_exceeded", f"the input folder already holds {files - 1} files, the limit of "
                                              f"--max-input-files {config.max_input_files}",
                       limit="max_input_files", value=config.max_input_files)
    limit_mb = round(config.max_input_bytes / (1 << 20), 3)
    if config.max_input_bytes and used + size > config.max_input_bytes:
        raise ApiError(507, "quota_exceeded", f"this upload of {_mib(size)} would bring the input folder to "
                                              f"{_mib(used + size)}, over the limit of --max-input-mb {limit_mb:g}",
                       limit="max_input_mb", value=limit_mb)


def _write(path: Path, payload: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, "insufficient_storage", "the server's disk is full") from None
        if exc.errno in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
            raise ApiError(400, "invalid_filename", f"cannot store {path.name!r} there: {exc.strerror}") from None
        raise


def store_upload(state: ServerState, fields: dict[str, Any], mask: bool) -> dict[str, str]:
    """Check the upload (names, image, limits) and write it; {name, subfolder, type} as ComfyUI answers."""
    upload = fields.get("image")
    if not isinstance(upload, tuple) or not upload[0]:
        raise ApiError(400, "no_file", "the form needs a file in the 'image' field")
    filename, data = upload
    check_file_name(filename)
    kind = _text(fields, "type", "input")
    subfolder = check_subfolder(_text(fields, "subfolder"))
    path = resolve(state, kind, subfolder, filename)
    if path.is_dir():
        raise ApiError(400, "invalid_filename", f"{filename!r} is a folder")
    if not mask and Path(filename).suffix.lower() in VIDEO_EXTENSIONS:
        check_video_upload(data, filename, state.config)
        image = None
    else:
        image = open_checked(data, filename, state.config)
    overwrite = _text(fields, "overwrite").lower() in ("true", "1")
    if mask:
        composed, info = _apply_mask(state, fields, image)
        buffer = io.BytesIO()
        composed.save(buffer, format="PNG", pnginfo=info)
        payload = buffer.getvalue()
    else:
        payload = data
    with _STORE_LOCK:
        if not overwrite and path.exists():
            path = path.parent / _free_name(path.parent, path.name)
        if kind == "input":
            check_input_quota(state.config, state.env.input_dir, path, len(payload))
        _write(path, payload)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def _apply_mask(state: ServerState, fields: dict[str, Any], mask: Image.Image) -> tuple[Image.Image, PngInfo]:
    """The original image (from `original_ref`) with the mask's alpha as its alpha; text chunks kept."""
    try:
        ref = json.loads(_text(fields, "original_ref"))
    except ValueError:
        raise ApiError(400, "invalid_original_ref", "'original_ref' must be JSON {filename, subfolder, type}") \
            from None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise ApiError(400, "invalid_original_ref", "'original_ref' must name a filename")
    kind, subfolder = str(ref.get("type") or "input"), str(ref.get("subfolder") or "")
    original_path = resolve(state, kind, subfolder, ref["filename"])
    if not original_path.is_file() and kind == "input" and not subfolder:  # a shipped example, as LoadImage lists
        original_path = state.env.input_file(ref["filename"], IMAGE_EXTENSIONS) or original_path
    if not original_path.is_file():
        raise ApiError(404, "not_found", f"original image {ref['filename']!r} does not exist")
    original = open_checked(original_path, ref["filename"], state.config, all_frames=False)
    info = PngInfo()
    for key, value in getattr(original, "text", {}).items():
        info.add_text(key, value)
    original = ImageOps.exif_transpose(original).convert("RGBA")
    alpha = mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L")
    original.putalpha(alpha.resize(original.size, Image.Resampling.LANCZOS))
    return original, info


async def upload_image(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fields = await read_form(request)
    return web.json_response(await asyncio.to_thread(store_upload, state, fields, False))


async def upload_mask(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fields = await read_form(request)
    return web.json_response(await asyncio.to_thread(store_upload, state, fields, True))
