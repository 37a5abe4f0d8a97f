"""Output files from Ray workers, written into the server's data directory under names free there.

Every worker counts `<prefix>_<NNNNN>_.png` in its own scratch folder, so two workers would both call
their first image `..._00001_.png`. The server takes the counter afresh in its own folder when it writes
the file (under one lock, with exclusive creation, so concurrent prompts never overwrite each other) and
remembers which name each worker's file got, so the ui of an "executed" event, the history entry, and
later cached reports of the same file all name the file that is really there.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from nodes.environment import Environment, safe_join
from nodes.image_io import next_counter

log = logging.getLogger(__name__)

COUNTED_NAME = re.compile(r"^(?P<name>.+)_(?P<counter>\d{5,})_\.(?P<ext>[A-Za-z0-9]+)$")
FileKey = tuple[str, str, str, str]  # worker id, type, subfolder, file name on the worker


class OutputLanding:
    """Writes workers' files under the server's output/ and temp/ and maps their names."""

    def __init__(self, env: Environment, remember: int = 100_000) -> None:
        self.env = env
        self.remember = remember
        self.names: OrderedDict[FileKey, str] = OrderedDict()
        self.lock = threading.Lock()

    def root(self, kind: str) -> Path:
        if kind == "output":
            return self.env.output_dir
        if kind == "temp":
            return self.env.temp_dir
        raise ValueError(f"a worker sent a file of type {kind!r}; only output and temp files are accepted")

    def land(self, worker_id: str, files: list[dict[str, Any]]) -> None:
        """Write each file that comes with bytes; files without bytes were landed before."""
        for item in files:
            data = item.get("data")
            if data is None:
                continue
            key = (worker_id, item["type"], item.get("subfolder") or "", item["filename"])
            root = self.root(item["type"])
            folder = safe_join(root, key[2]) if key[2] else root
            with self.lock:
                name = _write_free(folder, item["filename"], data)
                self.names[key] = name
                self.names.move_to_end(key)
                while len(self.names) > self.remember:
                    self.names.popitem(last=False)

    def rename_ui(self, worker_id: str, ui: dict[str, Any]) -> dict[str, Any]:
        """A copy of a node's ui whose file entries name the landed files."""
        renamed: dict[str, Any] = {}
        for field, value in ui.items():
            if isinstance(value, list):
                value = [self._rename(worker_id, item) for item in value]
            renamed[field] = value
        return renamed

    def rename_outputs(self, worker_id: str, outputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {node: self.rename_ui(worker_id, ui) for node, ui in outputs.items()}

    def forget_worker(self, worker_id: str) -> None:
        """A worker that is gone reports nothing more: its names are dropped."""
        with self.lock:
            for key in [k for k in self.names if k[0] == worker_id]:
                del self.names[key]

    def _rename(self, worker_id: str, item: Any) -> Any:
        if not (isinstance(item, dict) and isinstance(item.get("filename"), str) and item.get("type") in
                ("output", "temp")):
            return item
        key = (worker_id, item["type"], item.get("subfolder") or "", item["filename"])
        with self.lock:
            name = self.names.get(key)
        if name is None:
            log.warning("worker %s reported %s, which the server never received", worker_id, key[1:])
            return item
        return dict(item, filename=name)


def _write_free(folder: Path, filename: str, data: bytes) -> str:
    """Write data as `filename` in folder, or under the next free counter (or `_N` suffix); the name used."""
    target = safe_join(folder, filename)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    match = COUNTED_NAME.match(target.name)
    if match:
        name, ext = match["name"], match["ext"]
        counter = next_counter(folder, name, ext)
        candidates = (f"{name}_{counter + i:05}_.{ext}" for i in range(1 << 30))
    else:
        candidates = (target.name if i == 0 else f"{target.stem}_{i}{target.suffix}" for i in range(1 << 30))
    for candidate in candidates:
        try:
            with open(folder / candidate, "xb") as handle:
                handle.write(data)
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free file name for {filename} in {folder}")
