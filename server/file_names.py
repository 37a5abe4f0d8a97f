"""Names of files that come in with requests, the paths they resolve to, and the headers that name files going out.

Every name from a request (an upload's file name and subfolder, a mask's original_ref, /view's filename and
subfolder, a saved workflow's name) is a 400 when it could not be a plain file name: empty, `.`/`..` or a path
separator in a file name, NUL or any other control character (CR or LF in a name breaks the response header that
names the file later, and a terminal that prints it), a lone surrogate (the bytes were not UTF-8), or more than
255 bytes of UTF-8 in one name (the file systems' limit: the OS's error would otherwise be a 500). A subfolder
that leaves its folder is a 403 (as in ComfyUI).

Served files get a content type from a short allow-list; anything else is `application/octet-stream` sent as an
attachment, so that a file someone put in output/ or input/ is never rendered by the browser as a page.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from urllib.parse import quote

from nodes.environment import UnsafePathError, safe_join
from server.state import ApiError, ServerState

FOLDER_TYPES = ("input", "output", "temp")
MAX_NAME_BYTES = 255  # one file or folder name (NAME_MAX of Linux, macOS and Windows file systems)
MAX_SUBFOLDER_BYTES = 1024
# A saved workflow's name: any text a file name may hold on Linux, macOS and Windows alike (no control character,
# path separator, '..' or any of <>:"|?*), not starting with '.', '-' or a space, at most 128 characters. Written
# without \w so that it means the same to Python's `re` and to the ECMA regexes of OpenAPI tools.
WORKFLOW_NAME_PATTERN = r'(?!.*\.\.)[^\x00-\x1f\x7f-\x9f/\\<>:"|?*. \-][^\x00-\x1f\x7f-\x9f/\\<>:"|?*]{0,127}'
SERVED_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
    ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".mp4": "video/mp4", ".webm": "video/webm",
    ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo",
    ".json": "application/json",
}


def check_text(value: str, what: str) -> str:
    """`value`, or a 400 if it holds a control character (NUL, CR, LF, tab, DEL, C1) or a lone surrogate."""
    for char in value:
        category = unicodedata.category(char)
        if category == "Cc":
            raise ApiError(400, "invalid_filename", f"{what} {value!r} contains a control character "
                                                    f"(U+{ord(char):04X})")
        if category == "Cs":
            raise ApiError(400, "invalid_filename", f"{what} {value!r} is not valid UTF-8")
    return value


def _check_length(part: str, what: str, value: str) -> None:
    size = len(part.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ApiError(400, "invalid_filename", f"{what} {value[:40]!r}... is {size} bytes long in UTF-8, over the "
                                                f"limit of {MAX_NAME_BYTES} bytes of a file name")


def check_file_name(name: str, what: str = "file name") -> str:
    """A plain file name (no folder part), or a 400 that says what is wrong with it."""
    if not isinstance(name, str) or not name:
        raise ApiError(400, "invalid_filename", f"a {what} is required")
    check_text(name, what)
    if name in (".", "..") or ".." in name or "/" in name or "\\" in name:
        raise ApiError(400, "invalid_filename", f"invalid {what} {name!r}: no '/', '\\' or '..' in a file name")
    _check_length(name, what, name)
    return name


def check_subfolder(subfolder: str) -> str:
    """A subfolder's text: no control characters, each part a name of at most 255 bytes (leaving the folder
    is `resolve`'s 403)."""
    if not isinstance(subfolder, str):
        raise ApiError(400, "invalid_subfolder", "the subfolder must be text")
    check_text(subfolder, "subfolder")
    if len(subfolder.encode("utf-8")) > MAX_SUBFOLDER_BYTES:
        raise ApiError(400, "invalid_filename", f"subfolder {subfolder[:40]!r}... is over the limit of "
                                                f"{MAX_SUBFOLDER_BYTES} bytes")
    for part in subfolder.replace("\\", "/").split("/"):
        _check_length(part, "subfolder part", part)
    return subfolder


def folder_of(state: ServerState, kind: str) -> Path:
    if kind not in FOLDER_TYPES:
        raise ApiError(400, "invalid_type", f"type must be one of {', '.join(FOLDER_TYPES)}, not {kind!r}")
    return {"input": state.env.input_dir, "output": state.env.output_dir, "temp": state.env.temp_dir}[kind]


def resolve(state: ServerState, kind: str, subfolder: str, filename: str) -> Path:
    """The file's path; 400 for a bad file name or subfolder text, 403 for a subfolder that leaves the folder."""
    root = folder_of(state, kind)
    check_file_name(filename)
    check_subfolder(subfolder)
    try:
        folder = safe_join(root, subfolder) if subfolder else root.resolve()
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"subfolder {subfolder!r} is outside the {kind} folder") from None
    try:
        return safe_join(folder, filename)
    except UnsafePathError:
        raise ApiError(403, "forbidden_path", f"{filename!r} resolves outside the {kind} folder") from None


def content_disposition(disposition: str, name: str) -> str:
    """`inline` or `attachment` with the name twice (RFC 6266): `filename="..."`, printable ASCII with quotes,
    backslashes and anything else replaced by '_', for old clients; `filename*=UTF-8''...`, percent-encoded, exact."""
    fallback = "".join(char if " " <= char <= "~" and char not in '"\\' else "_" for char in name)
    exact = quote(name, safe="", errors="replace")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


def served_type(name: str) -> tuple[str, str]:
    """(content type, disposition) for serving a file: an allow-listed type inline, anything else as
    `application/octet-stream` to download."""
    content_type = SERVED_TYPES.get(Path(name).suffix.lower())
    return (content_type, "inline") if content_type else ("application/octet-stream", "attachment")
