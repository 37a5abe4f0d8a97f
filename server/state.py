"""The server's configuration and the state its handlers share (store, hub, workers, prompt waiters)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from graph.cache import make_cache
from graph.registry import NodeRegistry
from nodes import build_registry
from nodes.environment import Environment
from server.json_values import JsonValueError, parse_json
from server.prompt_run import delete_temp_files
from server.store import Store
from server.submissions import SubmissionWriter
from server.webhook import WebhookSender
from server.websocket import Hub
from server.worker import WorkerPool

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"  # where the host and webhook rules consider the server to listen: its most public address
    hosts: list[str] = field(default_factory=list)  # every address bound (serve --listen A,B); empty: host alone
    port: int = 8188
    auth_token: str | None = None
    cache: str = "workflow"
    cache_bytes: int | None = None
    allow_origins: list[str] = field(default_factory=list)  # "*" allows any origin
    allow_hosts: list[str] = field(default_factory=list)  # Host names a loopback server answers besides its own
    webhook_hosts: list[str] | None = None  # None: loopback names, not named explicitly (see server/webhook.py)
    max_upload_bytes: int = 100 << 20
    max_image_pixels: int = 64 << 20  # all frames of an image together
    max_image_frames: int = 1024
    max_input_bytes: int = 2048 << 20  # files under input/ together; 0: no limit
    max_input_files: int = 10_000  # files under input/ (LoadImage's list shows each one); 0: no limit
    max_workflows: int = 1000  # saved workflows in DATA_DIR/workflows; 0: no limit
    max_history: int = 10_000  # history entries kept, as ComfyUI; the oldest go, with their temp files; 0: no limit
    max_workflow_bytes: int = 16 << 20  # one PUT /workflows/{name} body
    web_root: Path = ROOT / "web"
    front_end: str = "latentloom"  # or "comfyui": web_root is comfyui-frontend-package's static/ (server/front_end.py)
    workers: int | str | None = None  # None: one per compute device; "ray" or "ray://HOST:PORT": Ray actors
    extra_model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    # --max-prompt-memory as written ("4GB", "512MB", "0.5", "off"); None: 75% of the device (server/admission.py)
    max_prompt_memory: str | None = None
    # The engine flags (server/cli_options.py), passed on to the Environment: compute device (None: the best
    # present), vram mode, weight precisions (None: the device's rule), folders (None: under data_dir).
    device: str | None = None
    vram: str = "normal"
    precision: str | None = None
    unet_precision: str | None = None
    vae_precision: str | None = None
    compile_models: bool = False  # --compile
    weight_cache_bytes: int = 8 << 30  # --weight-cache-gb (diffusion/checkpoints/cast_cache.py); 0: off
    output_dir: Path | None = None
    input_dir: Path | None = None
    temp_dir: Path | None = None
    user_dir: Path | None = None  # --user-directory: the front end's files in user_dir/default (DATA_DIR/user)
    # "none": no sampler previews are made or sent. An embedding program's default is the cheap linear map; `latentloom
    # serve` passes its --preview-method, "auto" unless given (a tiny decoder where models/vae_approx has one).
    preview_method: str = "latent2rgb"

    @property
    def bind_hosts(self) -> list[str]:
        return self.hosts or [self.host]

    @property
    def user_root(self) -> Path:
        return self.user_dir if self.user_dir is not None else self.data_dir / "user"


class ServerState:
    """What handlers share: configuration, environment, registry, store, hub, workers, prompt waiters."""

    def __init__(self, config: ServerConfig, registry: NodeRegistry | None = None) -> None:
        self.config = config
        self.env = Environment(config.data_dir, extra_model_dirs=config.extra_model_dirs,
                               max_image_pixels=config.max_image_pixels, max_image_frames=config.max_image_frames,
                               device=config.device, vram=config.vram, precision=config.precision,
                               unet_precision=config.unet_precision, vae_precision=config.vae_precision,
                               output_dir_override=config.output_dir, input_dir_override=config.input_dir,
                               temp_dir_override=config.temp_dir, preview_method=config.preview_method,
                               compile_models=config.compile_models,
                               weight_cache_bytes=config.weight_cache_bytes)
        self.env.ensure_dirs()
        self.workflows_dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry if registry is not None else build_registry(self.env)
        cluster = None
        if isinstance(config.workers, str):  # prompts run on Ray actors; Ray is imported only then
            from server import ray_workers as cluster
        self.store = (cluster.ClusterStore if cluster else Store)(config.data_dir / "latentloom.sqlite3",
                                                                  max_history=config.max_history or None)
        recovered = self.store.recover()
        if recovered:
            log.warning("%d prompt(s) were running when the server stopped; recorded as failed: %s",
                        len(recovered), ", ".join(recovered))
        self.store.apply_history_limit()  # the last server may have kept more
        delete_temp_files(self.env.temp_dir, self.store.take_dropped())
        self.features = {"supports_preview_metadata": True, "max_upload_size": config.max_upload_bytes}
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.hub = Hub(self.status, self.features, lambda cid: self.pool.running_node(cid))
        if cluster:
            self.pool: WorkerPool | cluster.RayWorkerPool = cluster.RayWorkerPool(
                self.store, self.env, self.hub, self._finished, cache=config.cache, cache_bytes=config.cache_bytes,
                address=None if config.workers == "ray" else config.workers)
        else:
            devices = self.env.device_stats()
            if config.workers:
                devices = [devices[i % len(devices)] for i in range(int(config.workers))]
            self.pool = WorkerPool(self.store, self.registry, self.env, self.hub,
                                   lambda: make_cache(config.cache, config.cache_bytes), devices, self._finished,
                                   previews=config.preview_method != "none")
        self.webhooks = WebhookSender(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        # Validation is Python holding the GIL: two threads keep the event loop free without trading time slices
        # among dozens. The commit is the writer's (server/submissions.py).
        self.submit_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="submit")
        self.writer = SubmissionWriter(self.store)

    @property
    def workflows_dir(self) -> Path:
        return self.config.data_dir / "workflows"

    def status(self) -> dict[str, Any]:
        return self.pool.status()

    def _finished(self, prompt_id: str, entry: dict[str, Any], extra_data: dict[str, Any]) -> None:
        """Called from a worker thread once a prompt's history entry is committed."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._resolve, prompt_id, entry, extra_data)

    def _resolve(self, prompt_id: str, entry: dict[str, Any], extra_data: dict[str, Any]) -> None:
        for future in self.waiters.pop(prompt_id, []):
            if not future.done():
                future.set_result(entry)
        url = extra_data.get("webhook")
        if isinstance(url, str) and url:
            self.webhooks.schedule(url, {prompt_id: entry})


STATE = web.AppKey("state", ServerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, type_: str, message: str, **extra: Any) -> web.Response:
    """An error body shaped like ComfyUI's `{"error": {type, message, details, extra_info}}`."""
    return web.json_response({"error": {"type": type_, "message": message, "details": "", "extra_info": extra}},
                             status=status)


class ApiError(Exception):
    """A client error, answered as `json_error(status, type, message)` by the error middleware."""

    def __init__(self, status: int, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.extra = status, type_, message, extra

    def response(self) -> web.Response:
        return json_error(self.status, self.type, self.message, **self.extra)


async def read_json(request: web.Request, default: Any = None) -> Any:
    """The request's JSON body (`default` when empty); malformed or refused JSON (see json_values) is a 400 that
    says where."""
    raw = await request.read()
    if not raw.strip():
        if default is not None:
            return default
        raise ApiError(400, "invalid_json", "the request body must be JSON")
    try:
        return parse_json(raw)
    except JsonValueError as exc:
        raise ApiError(400, "invalid_json", str(exc)) from None


async def read_json_object(request: web.Request, default: dict[str, Any] | None = None) -> dict[str, Any]:
    body = await read_json(request, default)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return body
