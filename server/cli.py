"""The `latentloom` command line: run and validate workflows headless, list node types.

    latentloom run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--output DIR]
    latentloom validate WORKFLOW.json
    latentloom nodes [--json]
    latentloom serve [--host 127.0.0.1 | --listen [ADDR]] [--port 8188] [--data-dir DIR] [--auth-token TOKEN]
                     [--cache ...] [--workers N|ray|ray://HOST:PORT]

plus the device, precision, memory and folder flags of server/cli_options.py (ComfyUI's names among them), before
or after the command. Every user error (missing file, invalid JSON, unknown node, invalid value, contradicting
flags) ends in one clear line on stderr and a non-zero exit status, never a traceback.

The engine (torch, the nodes) is imported only once a command runs: `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.cli_options import (
    CliError,
    add_engine_options,
    add_memory_option,
    resolve_device,
    resolve_folders,
    resolve_hosts,
    resolve_precision,
    resolve_vram,
)
from server.cli_serve import add_serve_parser, cmd_serve

if TYPE_CHECKING:
    from graph.registry import NodeRegistry
    from graph.validation import Validation
    from nodes.environment import Environment

EXIT_INVALID = 1
EXIT_USAGE = 2


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


def parse_override(item: str) -> tuple[str, str, Any]:
    """`NODE_ID.INPUT=VALUE` -> (node id, input, value); VALUE is read as JSON when it parses, else as a string."""
    target, sep, raw = item.partition("=")
    node_id, dot, name = target.partition(".")
    if not sep or not dot or not node_id or not name:
        raise CliError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node_id, name, {"__value__": value} if isinstance(value, list) else value


def apply_overrides(prompt: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        node_id, name, value = parse_override(item)
        if node_id not in prompt or not isinstance(prompt[node_id], dict):
            raise CliError(f"--set {item!r}: there is no node {node_id!r} in the workflow")
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
    return convert(path, read_workflow(path), registry, overrides, env)


def convert(path: str, data: Any, registry: NodeRegistry, overrides: list[str] | None = None,
            env: Environment | None = None) -> tuple[Any, dict[str, Any]]:
    """`load` for a file already read: `path` names it in errors."""
    from graph.ui_format import to_api_prompt
    from graph.workflow import WorkflowFormatError

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
    from graph.executor import Executor
    from graph.validation import validate_prompt
    from graph.workflow import is_ui_workflow
    from server.admission import cli_refusal

    data, prompt = convert(args.workflow, args.workflow_data, registry, args.set, env)
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
    from graph.validation import validate_prompt
    from server.admission import cli_refusal

    _, prompt = convert(args.workflow, args.workflow_data, registry, env=env)
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
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_engine_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow (API or UI format) headless")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (VALUE as JSON, else a string); repeatable")
    run.add_argument("--output", type=Path, help="write outputs here instead of DATA_DIR/output")
    add_memory_option(run)
    add_engine_options(run, suppress=True)
    validate = sub.add_parser("validate", help="check a workflow and print its errors")
    validate.add_argument("workflow")
    add_memory_option(validate)
    add_engine_options(validate, suppress=True)
    nodes = sub.add_parser("nodes", help="list the node types and their inputs")
    nodes.add_argument("--json", action="store_true", help="print /object_info's JSON")
    add_serve_parser(sub)
    return parser


def read_model_paths(args: argparse.Namespace, data_dir: Path) -> dict[str, list[Path]]:
    """Extra model folders from each --extra-model-paths file in turn (a later file's folders after an earlier
    one's), else from the data directory's extra_model_paths.yaml (or .toml) when there is one."""
    from nodes.model_paths import ModelPathsError, read_extra_model_paths

    files = args.extra_model_paths or []
    if not files:
        files = [p for p in (data_dir / "extra_model_paths.yaml", data_dir / "extra_model_paths.toml")
                 if p.is_file()][:1]
    extra: dict[str, list[Path]] = {}
    for file in files:
        try:
            for kind, folders in read_extra_model_paths(file).items():
                extra.setdefault(kind, []).extend(f for f in folders if f not in extra.get(kind, []))
        except ModelPathsError as exc:
            raise CliError(str(exc)) from None
    return extra


def make_environment(args: argparse.Namespace) -> Environment:
    """The data directory, its folder overrides, extra model folders, and the device, precision and memory
    flags (server/cli_options.py). A device that is not there is a user error here, before anything loads."""
    from nodes.environment import Environment

    data_dir = args.data_dir or default_data_dir()
    device, device_flag = resolve_device(args)
    env = Environment(data_dir, extra_model_dirs=read_model_paths(args, data_dir), device=device,
                      vram=resolve_vram(args), compile_models=bool(getattr(args, "compile", False)),
                      weight_cache_bytes=int(getattr(args, "weight_cache_gb", 8.0) * (1 << 30)),
                      **resolve_precision(args), **resolve_folders(args))
    if device is not None:
        try:
            env.model_manager()
        except ValueError as exc:
            raise CliError(f"{device_flag}: {exc}") from None
    return env


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "nodes": cmd_nodes, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            resolve_hosts(args)  # contradicting flags fail before the engine loads
        if args.command in ("run", "validate"):  # a mistyped path or --set answers before torch is imported
            for resolve in (resolve_device, resolve_precision, resolve_vram, resolve_folders):
                resolve(args)  # contradicting flags are named first, as make_environment would
            args.workflow_data = read_workflow(args.workflow)
            for item in getattr(args, "set", []):
                parse_override(item)
        env = make_environment(args)
        from nodes import build_registry

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
