"""The user directory of ComfyUI's front end: `DATA_DIR/user/default/`, laid out as ComfyUI lays it out.

ComfyUI keeps what its front end saves per user under `user/<user>/`: saved workflows in `workflows/*.json`,
settings in `comfy.settings.json`, subgraph blueprints, keybindings and whatever else an extension stores. Using
the same layout means a ComfyUI user copies their `user/default/` folder into our data directory and finds their
workflows and settings again. Like ComfyUI without `--multi-user`, there is one user, `default`.

Every path comes from a request, so each is checked before it touches the disk: control characters and NUL are
a 400, a path that leaves the user directory (absolute, `..`, a symlink that resolves outside) is a 403, each
name is at most 255 bytes. Writes are atomic (a hidden temporary file in the same folder, flushed, then renamed
over the target), so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from nodes.environment import UnsafePathError, is_inside, safe_join
from server.file_names import MAX_NAME_BYTES, MAX_SUBFOLDER_BYTES, check_text
from server.json_values import JsonValueError, dumps, parse_json
from server.state import ApiError

USER_ID = "default"
SETTINGS_FILE = "comfy.settings.json"


def _refuse(status: int, kind: str, message: str, path: str) -> ApiError:
    return ApiError(status, kind, message, path=path)


def check_user_path(path: str, what: str = "user file") -> str:
    """`path` (relative, '/'-separated) when it may name something in the user directory; else a 400 (malformed)
    or a 403 (it would leave the directory). Symlinks are checked when the path is resolved."""
    if not isinstance(path, str) or not path:
        raise _refuse(400, "invalid_filename", f"a {what} path is required", "")
    try:
        check_text(path, f"{what} path")
    except ApiError as exc:  # the error names the path in extra_info too, as the others here do
        exc.extra["path"] = path
        raise
    if "\\" in path:
        raise _refuse(400, "invalid_filename", f"{what} path {path!r} contains '\\' (use '/' between folders)", path)
    if len(path.encode("utf-8")) > MAX_SUBFOLDER_BYTES:
        raise _refuse(400, "invalid_filename", f"{what} path {path[:40]!r}... is over the limit of "
                                               f"{MAX_SUBFOLDER_BYTES} bytes", path[:40])
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise _refuse(403, "forbidden_path", f"{what} path {path!r} is absolute: it must lie inside the user "
                                             f"directory", path)
    parts = path.split("/")
    if ".." in parts:
        raise _refuse(403, "forbidden_path", f"{what} path {path!r} leaves the user directory ('..')", path)
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise _refuse(400, "invalid_filename", f"a name in {what} path {path[:40]!r}... is over "
                                                   f"{MAX_NAME_BYTES} bytes", path[:40])
    return path


def file_info(path: Path, relative_to: Path) -> dict[str, Any]:
    """ComfyUI's file info: path relative to `relative_to` with '/', size in bytes, modified and created times in
    seconds since the epoch (what the front end shows and sorts its workflow list by)."""
    status = path.stat()
    return {"path": path.relative_to(relative_to).as_posix(), "size": status.st_size,
            "modified": status.st_mtime, "created": status.st_ctime}


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` all at once: a hidden temporary file beside it, flushed to disk, then renamed over
    it (a rename within a folder is atomic), so a reader or a crash sees the old content or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class UserData:
    """The user directory of one server (kept on the app's state, never module-global), and its settings file.

    The lock serialises read-modify-write of the settings and quota checks with the write that follows them."""

    def __init__(self, data_dir: Path, max_files: int = 0, user_dir: Path | None = None) -> None:
        self.root = Path(user_dir if user_dir is not None else Path(data_dir) / "user") / USER_ID  # --user-directory
        self.max_files = max_files  # files in the user directory together; 0: no limit
        self.lock = threading.Lock()

    def ensure(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def resolve(self, path: str, what: str = "user file") -> Path:
        """The absolute path of `path` inside the user directory (see check_user_path); 403 for a symlink out."""
        check_user_path(path, what)
        try:
            return safe_join(self.ensure(), *[part for part in path.split("/") if part])
        except UnsafePathError:
            raise _refuse(403, "forbidden_path", f"{what} path {path!r} resolves outside the user directory",
                          path) from None

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root.resolve()).as_posix()

    # listing -------------------------------------------------------------------------------------------
    def walk(self, folder: Path, recurse: bool) -> list[Path]:
        """Files under `folder` (sorted), as ComfyUI's glob lists them: hidden names (a leading '.') skipped,
        subfolders entered when `recurse`; never an entry whose real path leaves the user directory."""
        root_real = os.path.realpath(self.root)
        found: list[Path] = []
        pending, seen = [folder], {os.path.realpath(folder)}
        while pending:
            current = pending.pop()
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not is_inside(entry.path, root_real):
                    continue
                try:
                    if entry.is_dir():
                        real = os.path.realpath(entry.path)
                        if recurse and real not in seen:
                            seen.add(real)
                            pending.append(Path(entry.path))
                    elif entry.is_file():
                        found.append(Path(entry.path))
                except OSError:
                    continue
        return sorted(found)

    def listing(self, directory: str, recurse: bool, full_info: bool, split: bool) -> list[Any]:
        """GET /userdata?dir=: the files of a folder, relative to it; as file infos, or split into their parts."""
        folder = self.resolve(directory.rstrip("/") or directory, "folder")
        if not folder.exists():
            raise _refuse(404, "not_found", f"no folder {directory!r} in the user directory", directory)
        if not folder.is_dir():
            raise _refuse(404, "not_found", f"{directory!r} is a file, not a folder", directory)
        result: list[Any] = []
        for path in self.walk(folder, recurse):
            if full_info:
                result.append(file_info(path, folder))
            else:
                relative = path.relative_to(folder).as_posix()
                result.append([relative, *relative.split("/")] if split else relative)
        return result

    def listing_v2(self, path: str) -> list[dict[str, Any]]:
        """GET /v2/userdata?path=: one folder's files and folders (not hidden ones), each with its path from the
        user directory; files with size and modification time."""
        folder = self.resolve(path, "folder") if path.strip("/") else self.ensure().resolve()
        if not folder.exists():
            raise _refuse(404, "not_found", f"no folder {path!r} in the user directory", path)
        if not folder.is_dir():
            raise _refuse(404, "not_found", f"{path!r} is a file, not a folder", path)
        root_real = os.path.realpath(self.root)
        items: list[dict[str, Any]] = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith(".") or not is_inside(entry.path, root_real):
                continue
            relative = self.relative(Path(entry.path))
            try:
                if entry.is_dir():
                    items.append({"name": entry.name, "path": relative, "type": "directory"})
                elif entry.is_file():
                    status = entry.stat()
                    items.append({"name": entry.name, "path": relative, "type": "file", "size": status.st_size,
                                  "modified": status.st_mtime})
            except OSError:
                continue
        return items

    # files ---------------------------------------------------------------------------------------------
    def existing_file(self, path: str) -> Path:
        target = self.resolve(path)
        if not target.exists():
            raise _refuse(404, "not_found", f"no file {path!r} in the user directory", path)
        if not target.is_file():
            raise _refuse(404, "not_found", f"{path!r} is a folder, not a file", path)
        return target

    def _count_files(self) -> int:
        return len(self.walk(self.ensure(), recurse=True))

    def _check_new_file(self, path: str, target: Path, overwrite: bool) -> None:
        """Before a write to `target`: 409 if it exists and `overwrite` is false or if it (or a folder of its
        path) is not what the path needs, 507 if a new file would pass the quota."""
        if target.is_dir():
            raise _refuse(409, "not_a_file", f"{path!r} is a folder, not a file", path)
        if target.exists():
            if not overwrite:
                raise _refuse(409, "file_exists", f"{path!r} already exists (overwrite=false)", path)
            return
        if self.max_files and self._count_files() >= self.max_files:
            raise ApiError(507, "quota_exceeded", f"the user directory holds {self.max_files} files, the limit "
                                                  f"(--max-workflows); delete some first", limit=self.max_files,
                           path=path)
        for parent in target.parents:  # a file where a folder of the path should be
            if parent == self.root.resolve():
                break
            if parent.exists() and not parent.is_dir():
                raise _refuse(409, "not_a_folder", f"{self.relative(parent)!r} in {path!r} is a file, not a "
                                                   f"folder", path)

    def store(self, path: str, data: bytes, overwrite: bool) -> Path:
        target = self.resolve(path)
        with self.lock:
            self._check_new_file(path, target, overwrite)
            write_atomic(target, data)
        return target

    def delete(self, path: str) -> None:
        target = self.existing_file(path)
        target.unlink()

    def move(self, source: str, dest: str, overwrite: bool) -> Path:
        origin = self.existing_file(source)
        target = self.resolve(dest, "destination")
        with self.lock:
            if target == origin:
                return target
            self._check_new_file(dest, target, overwrite)
            if not stat.S_ISREG(origin.stat().st_mode):
                raise _refuse(404, "not_found", f"{source!r} is not a regular file", source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(origin, target)  # atomic within one file system, as the user directory is
        return target

    # settings ------------------------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    def settings(self) -> dict[str, Any]:
        """The settings (`{}` before any is stored). A file that is not a JSON object (edited by hand, or
        copied from elsewhere broken) is a 500 that names it, not silently replaced."""
        try:
            raw = self.settings_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            value = parse_json(raw)
        except JsonValueError as exc:
            raise ApiError(500, "invalid_settings_file", f"user/{USER_ID}/{SETTINGS_FILE} is not valid JSON "
                                                         f"({exc}); fix or remove it") from None
        if not isinstance(value, dict):
            raise ApiError(500, "invalid_settings_file", f"user/{USER_ID}/{SETTINGS_FILE} is not a JSON object; "
                                                         f"fix or remove it")
        return value

    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the settings (as ComfyUI: keys replaced, others kept) and write them atomically."""
        with self.lock:
            settings = self.settings()
            settings.update(changes)
            write_atomic(self.settings_path, dumps(settings, indent=4, ensure_ascii=False).encode("utf-8"))
        return settings


def parse_flag(value: str | None, default: bool) -> bool:
    """A query flag as ComfyUI's front end writes it (`true`/`false`); `0`/`no` also mean false."""
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("false", "0", "no")


def is_true(value: str | None) -> bool:
    """A listing flag: only `true` (any case) or `1` turns it on, as ComfyUI reads `recurse`, `split`, `full_info`."""
    return (value or "").strip().lower() in ("true", "1")

