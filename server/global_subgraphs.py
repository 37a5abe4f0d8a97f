"""Subgraph blueprints shipped by node packs: `GET /global_subgraphs` and `GET /global_subgraphs/{id}`.

ComfyUI's front end (1.3x) offers, besides the blueprints a user saved in `user/default/subgraphs/`, the ones node
packs ship as `subgraphs/*.json` inside their folder; it lists them on start-up and fetches each one's JSON
separately. A pack here is a folder in `DATA_DIR/custom_nodes/`; a blueprint is any `.json` file directly in its
`subgraphs/` folder (a symlink that leads out of that folder is neither listed nor read, as for every file route).
The id is a hash of the pack and file name, stable across restarts, so the front end's per-id request never needs a
path from the client.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from aiohttp import web

from nodes.environment import list_files
from server.state import STATE, ApiError

MAX_BLUEPRINT_BYTES = 16 << 20  # as a saved workflow (--max-workflow-mb's default)


def blueprint_files(custom_nodes: Path) -> dict[str, tuple[str, Path]]:
    """`{id: (pack, file)}` of every pack's `subgraphs/*.json`, in pack and file order."""
    found: dict[str, tuple[str, Path]] = {}
    if not custom_nodes.is_dir():
        return found
    for pack in sorted(p for p in custom_nodes.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        folder = pack / "subgraphs"
        for name in list_files(folder, {".json"}, recursive=False):
            key = hashlib.sha256(f"custom_node:{pack.name}/{name}".encode()).hexdigest()
            found[key] = (pack.name, folder / name)
    return found


def _entry(pack: str, path: Path) -> dict[str, Any]:
    return {"source": "custom_node", "name": path.stem, "info": {"node_pack": pack}}


def list_blueprints(custom_nodes: Path) -> dict[str, dict[str, Any]]:
    return {key: _entry(pack, path) for key, (pack, path) in blueprint_files(custom_nodes).items()}


def read_blueprint(custom_nodes: Path, key: str) -> dict[str, Any]:
    """The entry of one blueprint with `data`, its JSON text (what the front end parses as a workflow)."""
    found = blueprint_files(custom_nodes).get(key)
    if found is None:
        raise ApiError(404, "not_found", f"no subgraph blueprint with id {key!r}")
    pack, path = found
    if path.stat().st_size > MAX_BLUEPRINT_BYTES:
        raise ApiError(413, "too_large", f"the subgraph blueprint custom_nodes/{pack}/subgraphs/{path.name} is over "
                                         f"{MAX_BLUEPRINT_BYTES >> 20} MiB")
    try:
        data = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_file", f"custom_nodes/{pack}/subgraphs/{path.name} is not UTF-8 text") from None
    return dict(_entry(pack, path), data=data)


async def global_subgraphs(request: web.Request) -> web.Response:
    folder = request.app[STATE].env.custom_nodes_dir
    return web.json_response(await asyncio.to_thread(list_blueprints, folder))


async def global_subgraph(request: web.Request) -> web.Response:
    folder = request.app[STATE].env.custom_nodes_dir
    return web.json_response(await asyncio.to_thread(read_blueprint, folder, request.match_info["id"]))


ROUTES = [
    ("GET", "/global_subgraphs", global_subgraphs),
    ("GET", "/global_subgraphs/{id}", global_subgraph),
]
