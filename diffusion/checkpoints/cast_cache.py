"""A checkpoint's weights kept on disk already cast to the dtype a load asks for (DATA_DIR/cache/weights).

Loading an fp16 SD1.5 file as bf16 casts 1.07 billion values: most of a cold start's load phase (10 of 13 s at
load 6 on the project's 2-core machine; the rest of the first image costs what a warm one does). The cast values
are written once, next to nothing else, as a safetensors file; later loads of the same file map that file instead
and cast nothing, so their weights are lazy views read on first use like those of a file stored in the wanted
dtype. It holds only the tensors a load had to cast, each under `<dtype>/<part>/<key>`, so loads asking for other
dtypes (--fp32-vae, another precision) add theirs to the same file.

A cache file belongs to one source file, identified by its resolved path, size and modification time (hashing
2 GB would cost what the cache saves): a changed file gets a new cache file and the old one is removed. It is read
through files.py's safe reader like any checkpoint, written to a temporary name and renamed, and any error reading
or writing it costs only the cache (a warning; the load casts as before). Disk cost: the cast tensors' size (about
2.1 GB for an SD1.5 file loaded as bf16); the folder keeps at most `limit` bytes (8 GiB by default), the files used
least recently removed first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from .files import CheckpointError, read_state_dict, write_safetensors

log = logging.getLogger(__name__)

Tensor = torch.Tensor
VERSION = 1  # bump when what a cached tensor holds changes (the cast itself, the key scheme)
SUFFIX = ".cast.safetensors"
LIMIT = 8 << 30  # bytes of cache files a folder keeps


def cache_path(folder: Path, source: Path) -> Path:
    """The cache file of `source` in `folder`: its stem, then a digest of its identity (path, size, mtime)."""
    stat = source.stat()
    identity = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, VERSION])
    return folder / f"{source.stem}.{hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()}{SUFFIX}"


class CastCache:
    """Cast tensors of one source file: those stored by an earlier load (views into the cache file) and those
    this load had to cast (written by `save`)."""

    def __init__(self, folder: str | os.PathLike, source: str | os.PathLike, limit: int | None = None) -> None:
        self.folder, self.source = Path(folder), Path(source)
        self.limit = LIMIT if limit is None else limit
        self.path = cache_path(self.folder, self.source)
        self.stored: dict[str, Tensor] = {}
        self.new: dict[str, Tensor] = {}
        if self.path.is_file():
            try:
                self.stored = read_state_dict(self.path)
                os.utime(self.path)  # used now: the last to go when the folder is over its limit
            except (CheckpointError, OSError) as exc:
                log.warning("cast weights cache %s unreadable (%s); casting again", self.path, exc)

    def get(self, part: str, key: str, like: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The stored cast of `part`'s tensor `key` (the source tensor `like`) to `dtype`, if it matches its shape."""
        hit = self.stored.get(_name(part, key, dtype))
        if hit is None or hit.dtype != dtype or hit.shape != like.shape:
            return None
        return hit

    def put(self, part: str, key: str, value: Tensor) -> None:
        self.new[_name(part, key, value.dtype)] = value

    def save(self) -> None:
        """Writes stored and new tensors to the cache file when this load cast anything (atomically), and removes
        cache files of earlier versions of the source file and, over the folder's limit, the least recently used."""
        if not self.new:
            return
        tensors = {**self.stored, **self.new}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.limit:  # the file alone would be over the folder's limit: cast again next time instead
            log.info("cast weights of %s (%.1f GB) not cached: over the %.1f GB limit", self.source.name,
                     size / 1e9, self.limit / 1e9)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as f:
                temporary = Path(f.name)
            try:
                write_safetensors(temporary, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()},
                                  tensors.__getitem__, {"source": self.source.name, "version": str(VERSION)})
                os.replace(temporary, self.path)
            finally:
                temporary.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cast weights not cached in %s: %s", self.folder, exc)
            return
        for old in self.folder.glob(f"{self.source.stem}.*{SUFFIX}"):
            if old != self.path and old.name[len(self.source.stem) + 1:].count(".") == 2:  # same stem, other digest
                old.unlink(missing_ok=True)
        self._trim()
        log.info("cached %d cast weights of %s in %s", len(self.new), self.source.name, self.path)

    def _trim(self) -> None:
        """Removes the least recently used cache files (never this one) until the folder is within its limit."""
        try:
            files = sorted(((p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.glob(f"*{SUFFIX}")),
                           key=lambda entry: entry[0])
        except OSError:
            return
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.limit:
                break
            if path != self.path:
                path.unlink(missing_ok=True)
                total -= size


def _name(part: str, key: str, dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')}/{part}/{key}"
