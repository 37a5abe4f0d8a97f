"""Read-only information: /object_info, /system_stats, /embeddings, /models, /features."""

from __future__ import annotations

import asyncio
import platform
import sys
from pathlib import Path

import torch
from aiohttp import web

from nodes.environment import MODEL_FOLDERS, list_files, ram_bytes
from server.front_end import TESTED_VERSION
from server.state import STATE, ApiError, ServerState

# The version of ComfyUI whose wire contract this server follows (clients read it from /system_stats).
CONTRACT_VERSION = "0.3.64"
MODEL_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".yaml", ".json", ".onnx"}


async def object_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(await asyncio.to_thread(state.registry.object_info, state.env))


async def object_info_one(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cls = state.registry.get(request.match_info["node_class"])
    if cls is None:
        return web.json_response({})
    return web.json_response({cls.node_type: await asyncio.to_thread(cls.info, state.env)})


def system_stats_data(state: ServerState) -> dict:
    total, free = ram_bytes()
    return {
        "system": {"os": sys.platform, "ram_total": total, "ram_free": free, "comfyui_version": CONTRACT_VERSION,
                   # ComfyUI's front end warns when it is older than this: the version our browser tests ran
                   "required_frontend_version": TESTED_VERSION,
                   "python_version": sys.version, "pytorch_version": torch.__version__,
                   "embedded_python": False, "argv": sys.argv, "platform": platform.platform()},
        "devices": state.env.device_stats(),
        **({"workers": state.pool.worker_stats()} if hasattr(state.pool, "worker_stats") else {}),
    }


async def system_stats(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(system_stats_data, request.app[STATE]))


def model_files(state: ServerState, kind: str) -> list[str]:
    """Relative paths of the model files of a kind, in every folder searched for it (sorted, unique)."""
    names: set[str] = set()
    for folder in state.env.model_dirs(kind):
        names.update(list_files(folder, MODEL_EXTENSIONS))  # never a symlink leading out of the folder
    return sorted(names)


async def embeddings(request: web.Request) -> web.Response:
    files = await asyncio.to_thread(model_files, request.app[STATE], "embeddings")
    return web.json_response(sorted({str(Path(name).with_suffix("")) for name in files}))


async def models(request: web.Request) -> web.Response:
    return web.json_response(list(MODEL_FOLDERS))


async def models_in(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    if folder not in MODEL_FOLDERS:
        raise ApiError(404, "not_found", f"unknown model folder {folder!r}; known: {', '.join(MODEL_FOLDERS)}")
    return web.json_response(await asyncio.to_thread(model_files, request.app[STATE], folder))


async def features(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].features)


ROUTES = [
    ("GET", "/object_info", object_info),
    ("GET", "/object_info/{node_class}", object_info_one),
    ("GET", "/system_stats", system_stats),
    ("GET", "/embeddings", embeddings),
    ("GET", "/models", models),
    ("GET", "/models/{folder}", models_in),
    ("GET", "/features", features),
]
