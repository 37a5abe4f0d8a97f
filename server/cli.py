"""The `latentloom` command line: run and validate workflows headless, list node types.

    latentloom run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--output DIR]
    latentloom validate WORKFLOW.json
    latentloom nodes [--json]
    latentloom serve [--host 127.0.0.1] [--port 8188] [--data-dir DIR] [--auth-token TOKEN] [--cache ...]
                     [--workers N|ray|ray://HOST:PORT]

Every user error (missing file, invalid JSON, unknown node, invalid value) ends in one clear line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from graph.executor import Executor
from graph.registry import NodeRegistry
from graph.ui_format import to_api_prompt
from graph.validation import Validation, validate_prompt
from graph.workflow import WorkflowFormatError, is_ui_workflow
from nodes import build_registry
from nodes.environment import Environment
from nodes.model_paths import ModelPathsError, read_extra_model_paths
from server.admission import add_memory_option, cli_refusal

EXIT_INVALID = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def default_data_dir() -> Path:
    return Path(os.environ.get("LATENTLOOM_DATA_DIR", "data"))


def read_workflow(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not a UTF-8 text file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def apply_overrides(prompt: dict[str, Any], overrides: list[str]) -> None:
    """`NODE_ID.INPUT=VALUE`; VALUE is read as JSON when it parses, else as a string."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise CliError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE")
        if node_id not in prompt or not isinstance(prompt[node_id], dict):
            raise CliError(f"--set {item!r}: there is no node {node_id!r} in the workflow")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = {"__value__": value}
        prompt[node_id].setdefault("inputs", {})[name] = value


def describe_errors(validation: Validation) -> list[str]:
    """Plain-words lines: which node, which input, what was wrong."""
    lines = []
    if validation.error and validation.error["type"] != "prompt_outputs_failed_validation":
        err = validation.error
        lines.append(f"{err['message']} {err['details']}".strip())
    for node_id, entry in validation.node_errors.items():
        for err in entry["errors"]:
            where = f"node {node_id} ({entry['class_type']})"
            input_name = err.get("extra_info", {}).get("input_name")
            if input_name:
                where += f", input '{input_name}'"
            detail = err["details"] if err["details"] and err["details"] != input_name else ""
            lines.append(f"{where}: {err['message']}" + (f" ({detail})" if detail else ""))
    return lines


def load(path: str, registry: NodeRegistry, overrides: list[str] | None = None,
         env: Environment | None = None) -> tuple[Any, dict[str, Any]]:
    """The file's JSON as read, and the API-format prompt (converted, with overrides applied). `env` lists the
    model files a model combo saved without a value defaults to (the first, as ComfyUI's front end picks)."""
    data = read_workflow(path)
    try:
        prompt = to_api_prompt(data, registry, env)
    except WorkflowFormatError as exc:
        raise CliError(f"{path}: {exc}") from None
    if not isinstance(prompt, dict):
        raise CliError(f"{path}: a workflow must be a JSON object")
    prompt = json.loads(json.dumps(prompt))  # our own copy to edit
    apply_overrides(prompt, overrides or [])
    return data, prompt


class ProgressPrinter:
    """Draws node and step progress on stderr."""

    def __init__(self, prompt: dict[str, Any], stream: Any = sys.stderr) -> None:
        self.prompt = prompt
        self.stream = stream
        self.interactive = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "executing" and data.get("node") is not None:
            node = data["node"]
            self._line(f"running node {node} ({self.prompt.get(node, {}).get('class_type', '?')})")
        elif event == "progress":
            done, total = data["value"], max(1, data["max"])
            width = 30
            filled = int(width * done / total)
            text = f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
            if self.interactive:
                self.stream.write("\r" + text + ("\n" if done >= total else ""))
                self.stream.flush()
            elif done >= total:
                self._line(text)

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def output_lines(outputs: dict[str, dict[str, Any]], env: Environment, prompt: dict[str, Any]) -> list[str]:
    folders = {"output": env.output_dir, "temp": env.temp_dir, "input": env.input_dir}
    lines = []
    for node_id, ui in outputs.items():
        files = [item for value in ui.values() if isinstance(value, list) for item in value
                 if isinstance(item, dict) and "filename" in item]
        label = f"node {node_id} ({prompt.get(node_id, {}).get('class_type', '?')})"
        if files:
            for item in files:
                folder = folders.get(item.get("type", "output"), env.output_dir)
                lines.append(f"{label}: {folder / item.get('subfolder', '') / item['filename']}")
        else:
            lines.append(f"{label}: {json.dumps(ui, default=str)}")
    return lines


def cmd_run(args: argparse.Namespace, env: Environment, registry: NodeRegistry) -> int:
    data, prompt = load(args.workflow, registry, args.set, env)
    validation = validate_prompt(prompt, registry, env)
    if not validation.ok:
        for line in describe_errors(validation):
            print(f"invalid: {line}", file=sys.stderr)
        return EXIT_INVALID
    if refused := cli_refusal(validation.prompt, env, args.max_prompt_memory):
        print("\n".join(f"invalid: {line}" for line in refused), file=sys.stderr)
        return EXIT_INVALID
    for line in describe_errors(validation):
        print(f"skipped output: {line}", file=sys.stderr)
    env.ensure_dirs()
    extra = {"extra_pnginfo": {"workflow": data}} if is_ui_workflow(data) else {}
    result = Executor(env=env).execute(validation.prompt, str(uuid.uuid4()), ProgressPrinter(prompt), extra)
    if result.status == "error":
        err = result.error or {}
        print(f"error in node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}",
              file=sys.stderr)
        return EXIT_INVALID
    for line in output_lines(result.outputs, env, prompt):
        print(line)
    return 0


def cmd_validate(args: argparse.Namespace, env: Environment, registry: NodeRegistry) -> int:
    _, prompt = load(args.workflow, registry, env=env)
    validation = validate_prompt(prompt, registry, env)
    for line in describe_errors(validation):
        print(line, file=sys.stderr if not validation.ok else sys.stdout)
    if not validation.ok:
        return EXIT_INVALID
    if refused := cli_refusal(validation.prompt, env, args.max_prompt_memory):
        print("\n".join(refused), file=sys.stderr)
        return EXIT_INVALID
    print(f"valid: {len(validation.prompt.nodes)} nodes to run, outputs {', '.join(validation.prompt.outputs)}")
    return 0


def cmd_nodes(args: argparse.Namespace, env: Environment, registry: NodeRegistry) -> int:
    info = registry.object_info(env)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for name in sorted(info):
        entry = info[name]
        inputs = []
        for section in ("required", "optional"):
            for input_name, spec in entry["input"].get(section, {}).items():
                type_name = "COMBO" if isinstance(spec[0], list) else spec[0]
                inputs.append(f"{input_name}: {type_name}" + ("?" if section == "optional" else ""))
        outputs = ", ".join(entry["output"]) or "-"
        print(f"{name} [{entry['category']}] ({', '.join(inputs)}) -> {outputs}")
    for label, reason in registry.load_errors.items():
        print(f"plugin {label} was skipped: {reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentloom", description="Latent Loom: a node-graph engine for "
                                     "Stable Diffusion that speaks ComfyUI's wire contract.")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="models, input, output, temp and custom_nodes live here (default: ./data, "
                             "or $LATENTLOOM_DATA_DIR)")
    parser.add_argument("--extra-model-paths", type=Path, default=None, metavar="FILE",
                        help="YAML or TOML file of extra model folders (ComfyUI's extra_model_paths.yaml format); "
                             "default: DATA_DIR/extra_model_paths.yaml when present")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow (API or UI format) headless")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (VALUE as JSON, else a string); repeatable")
    run.add_argument("--output", type=Path, help="write outputs here instead of DATA_DIR/output")
    add_memory_option(run)
    validate = sub.add_parser("validate", help="check a workflow and print its errors")
    validate.add_argument("workflow")
    add_memory_option(validate)
    nodes = sub.add_parser("nodes", help="list the node types and their inputs")
    nodes.add_argument("--json", action="store_true", help="print /object_info's JSON")
    add_serve_parser(sub)
    return parser


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP + WebSocket server (ComfyUI-compatible API)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
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
    serve.add_argument("--max-upload-mb", type=float, default=100.0, help="request size limit (default 100)")
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


async def _serve(app: Any, host: str, port: int) -> None:
    from aiohttp import web

    from server.state import STATE

    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # What exists now (torch, the node registry, the app) lives as long as the process. Freezing it keeps the
    # collector's full passes to objects made since: a full pass over the ~400k start-up objects holds the GIL
    # for 200+ ms, a stall for every request in flight (bench/server.py's p99 was 300 ms because of it).
    gc.collect()
    gc.freeze()
    address = runner.addresses[0]
    app[STATE].config.port = int(address[1])  # --port 0: the port bound (the webhook rules refuse it)
    shown = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
    print(f"listening on http://{shown}:{address[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def cmd_serve(args: argparse.Namespace, env: Environment, registry: NodeRegistry) -> int:
    from server.app import create_app
    from server.state import LOOPBACK_NAMES, ServerConfig

    if isinstance(args.workers, str) and importlib.util.find_spec("ray") is None:
        raise CliError(f"--workers {args.workers} needs Ray: pip install 'latentloom[ray]'")
    config = ServerConfig(data_dir=env.data_dir, host=args.host, port=args.port, auth_token=args.auth_token,
                          cache=args.cache, cache_bytes=args.cache_bytes, allow_origins=args.allow_origin,
                          allow_hosts=args.allow_host,
                          webhook_hosts=args.webhook_host,
                          max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                          max_image_pixels=args.max_image_pixels, workers=args.workers,
                          max_image_frames=args.max_image_frames, max_input_bytes=int(args.max_input_mb * (1 << 20)),
                          max_input_files=args.max_input_files, max_workflows=args.max_workflows,
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
    if args.host not in LOOPBACK_NAMES and not args.auth_token:
        logging.getLogger("latentloom").warning("listening on %s without --auth-token: anyone who can reach "
                                                "this address can run workflows", args.host)
    try:
        app = create_app(config, registry)
    except OSError as exc:
        raise CliError(f"cannot open the data directory {env.data_dir}: {exc}") from None
    try:
        asyncio.run(_serve(app, args.host, args.port))
    except ConnectionError as exc:  # --workers ray: the cluster cannot be reached
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def make_environment(args: argparse.Namespace) -> Environment:
    """The data directory plus extra model folders from --extra-model-paths, else from the data directory's
    extra_model_paths.yaml (or .toml) when there is one."""
    data_dir = args.data_dir or default_data_dir()
    config = args.extra_model_paths
    if config is None:
        config = next((p for p in (data_dir / "extra_model_paths.yaml", data_dir / "extra_model_paths.toml")
                       if p.is_file()), None)
    try:
        extra = read_extra_model_paths(config) if config is not None else {}
    except ModelPathsError as exc:
        raise CliError(str(exc)) from None
    return Environment(data_dir, output_dir_override=getattr(args, "output", None), extra_model_dirs=extra)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "nodes": cmd_nodes, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        env = make_environment(args)
        registry = build_registry(env)
        return COMMANDS[args.command](args, env, registry)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
