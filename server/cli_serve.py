"""`latentloom serve`: its flags, and running the HTTP + WebSocket server until SIGINT or SIGTERM.

Split from server/cli.py; like it, this module imports the engine (torch, aiohttp's app) only once the command
runs, so `latentloom serve --help` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import os
import signal
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.cli_options import (
    CliError,
    add_engine_options,
    add_memory_option,
    add_server_flags,
    browser_url,
    preview_method,
    resolve_hosts,
)

if TYPE_CHECKING:
    from graph.registry import NodeRegistry
    from nodes.environment import Environment
    from server.state import ServerConfig


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP + WebSocket server (ComfyUI-compatible API)")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8188, help="port (0: any free port; the line "
                                                                "'listening on URL' says which)")
    serve.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="as the global --data-dir")
    serve.add_argument("--auth-token", default=os.environ.get("LATENTLOOM_AUTH_TOKEN") or None,
                       help="require 'Authorization: Bearer TOKEN' on every route but the canvas "
                            "(default: $LATENTLOOM_AUTH_TOKEN)")
    serve.add_argument("--cache", choices=("workflow", "lru", "none"), default="workflow",
                       help="node output cache: keep what the current workflow uses (default), an LRU bounded "
                            "by --cache-bytes, or nothing")
    serve.add_argument("--cache-bytes", type=int, default=None, help="byte budget of --cache lru")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="let web pages from ORIGIN (e.g. http://localhost:5173, or *) call the API; repeatable")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another name of a loopback-bound server that requests may use as Host (e.g. a "
                            "hosts-file alias); repeatable. Others are refused (DNS rebinding)")
    serve.add_argument("--webhook-host", action="append", default=None, metavar="HOST",
                       help="hosts extra_data.webhook may call (default: loopback only); repeatable, * for any")
    serve.add_argument("--max-upload-mb", "--max-upload-size", type=limit_option(0, float), default=100.0,
                       metavar="MB", help="request size limit (default 100)")
    serve.add_argument("--max-image-pixels", type=int, default=64 << 20,
                       help="refuse images whose frames together hold more pixels than this, in uploads and "
                            "LoadImage (default 64 Mi)")
    serve.add_argument("--max-image-frames", type=limit_option(1), default=1024,
                       help="refuse images of more frames than this (default 1024)")
    serve.add_argument("--max-input-mb", type=limit_option(0, float), default=2048,
                       help="uploads may not take the input folder past this many MiB (default 2048; 0: no limit)")
    serve.add_argument("--max-input-files", type=limit_option(), default=10_000,
                       help="uploads may not take the input folder past this many files (default 10000; 0: no limit)")
    serve.add_argument("--max-workflows", type=limit_option(), default=1000,
                       help="saved workflows at most (default 1000; 0: no limit)")
    serve.add_argument("--max-history", type=limit_option(), default=10_000,
                       help="history entries kept (default 10000, as ComfyUI; the oldest go first, with their temp "
                            "files; 0: no limit)")
    serve.add_argument("--max-workflow-mb", type=limit_option(0, float), default=16,
                       help="size limit of one saved workflow in MiB (default 16; 0: only --max-upload-mb's)")
    serve.add_argument("--web-root", type=Path, default=None, help="folder of the canvas (default: web/)")
    serve.add_argument("--front-end", choices=("latentloom", "comfyui"), default="latentloom",
                       help="the page at /: our canvas (default), or ComfyUI's front end from the installed "
                            "comfyui-frontend-package (pip install 'latentloom[comfyui]')")
    serve.add_argument("--workers", type=workers_option, default=None, metavar="N|ray|ray://HOST:PORT",
                       help="N worker threads (default: one per device), or run prompts on Ray actors, one per GPU "
                            "(per CPU where there is none): 'ray' starts a local Ray or joins $RAY_ADDRESS, "
                            "ray://HOST:PORT connects to a cluster (pip install 'latentloom[ray]')")
    add_memory_option(serve)
    add_server_flags(serve)
    add_engine_options(serve, suppress=True)


def limit_option(minimum: int = 0, kind: type = int) -> Any:
    """An argparse type for a count (int) or size (float, MiB) limit of at least `minimum`."""
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not minimum <= number < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number of at least {minimum}, got {value}")
        return number
    return parse


def workers_option(value: str) -> int | str:
    """`--workers`: a count of threads, `ray`, or `ray://HOST:PORT`."""
    if value == "ray" or (value.startswith("ray://") and len(value) > len("ray://")):
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'ray' or 'ray://HOST:PORT', got {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"the number of workers must be at least 1, got {count}")
    return count


async def _serve(app: Any, hosts: list[str], port: int, on_listening: Callable[[str], Any] | None = None) -> None:
    """Serve on every address of `hosts`, one port for all (with --port 0, the one the first address got), until
    SIGINT or SIGTERM; `on_listening(url)` runs once the sockets accept connections (the browser of --auto-launch
    opens then, never before the page can load)."""
    from aiohttp import web

    from server.state import STATE

    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    for host in hosts:
        await web.TCPSite(runner, host, port).start()
        port = int(runner.addresses[0][1])
    # What exists now (torch, the node registry, the app) lives as long as the process. Freezing it keeps the
    # collector's full passes to objects made since: a full pass over the ~400k start-up objects holds the GIL
    # for 200+ ms, a stall for every request in flight (bench/server.py's p99 was 300 ms because of it).
    gc.collect()
    gc.freeze()
    app[STATE].config.port = port  # --port 0: the port bound (the webhook rules refuse it)
    for address in runner.addresses:
        shown = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
        print(f"listening on http://{shown}:{address[1]}", flush=True)
    if on_listening is not None:
        on_listening(browser_url(str(runner.addresses[0][0]), port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def server_config(args: argparse.Namespace, env: Environment) -> ServerConfig:
    """The ServerConfig the serve flags describe, the engine flags taken from `env` (make_environment's). A public
    bind without --auth-token is allowed, with the warning line --host has always given."""
    from server.state import ServerConfig
    from server.webhook import is_loopback_host

    if isinstance(args.workers, str) and importlib.util.find_spec("ray") is None:
        raise CliError(f"--workers {args.workers} needs Ray: pip install 'latentloom[ray]'")
    hosts = resolve_hosts(args)
    public = [h for h in hosts if not is_loopback_host(h)]
    # The rules that depend on where the server listens (Host names, webhooks) follow its most public address.
    config = ServerConfig(data_dir=env.data_dir, host=(public or hosts)[0], hosts=hosts, port=args.port,
                          auth_token=args.auth_token,
                          device=env.device, vram=env.vram, precision=env.precision,
                          unet_precision=env.unet_precision, vae_precision=env.vae_precision,
                          compile_models=env.compile_models, weight_cache_bytes=env.weight_cache_bytes,
                          output_dir=env.output_dir_override, input_dir=env.input_dir_override,
                          temp_dir=env.temp_dir_override, user_dir=args.user_directory,
                          preview_method=preview_method(args),
                          cache=args.cache, cache_bytes=args.cache_bytes, allow_origins=args.allow_origin,
                          allow_hosts=args.allow_host,
                          webhook_hosts=args.webhook_host,
                          max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                          max_image_pixels=args.max_image_pixels, workers=args.workers,
                          max_image_frames=args.max_image_frames, max_input_bytes=int(args.max_input_mb * (1 << 20)),
                          max_input_files=args.max_input_files, max_workflows=args.max_workflows,
                          max_history=args.max_history,
                          max_workflow_bytes=int(args.max_workflow_mb * (1 << 20)),
                          extra_model_dirs=env.extra_model_dirs, max_prompt_memory=args.max_prompt_memory)
    if args.front_end == "comfyui":
        from server.front_end import FrontEndMissing, comfyui_static_root

        try:
            config.web_root, config.front_end = comfyui_static_root(), "comfyui"
        except FrontEndMissing as exc:
            raise CliError(str(exc)) from None
    if args.web_root is not None:
        config.web_root = args.web_root
    if public and not args.auth_token:
        logging.getLogger("latentloom").warning("listening on %s without --auth-token: anyone who can reach "
                                                "this address can run workflows", ", ".join(public))
    return config


def cmd_serve(args: argparse.Namespace, env: Environment, registry: NodeRegistry) -> int:
    from server.app import create_app

    config = server_config(args, env)
    try:
        app = create_app(config, registry)
    except OSError as exc:
        raise CliError(f"cannot open the data directory {env.data_dir}: {exc}") from None
    opener = open_browser if args.auto_launch else None
    try:
        asyncio.run(_serve(app, config.bind_hosts, args.port, opener))
    except ConnectionError as exc:  # --workers ray: the cluster cannot be reached
        raise CliError(str(exc)) from None
    except OSError as exc:
        where = ",".join(config.bind_hosts)
        raise CliError(f"cannot listen on {where} port {args.port}: {exc.strerror or exc}") from None
    return 0


def open_browser(url: str) -> None:
    """--auto-launch: the canvas in the default browser (a machine without one logs that and serves on)."""
    if not webbrowser.open(url):
        logging.getLogger("latentloom").warning("--auto-launch: no browser could be opened; visit %s", url)
