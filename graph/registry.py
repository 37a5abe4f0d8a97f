"""The node registry and plugin discovery.

Third-party node packages are found two ways: installed distributions that declare an entry point in
the group `latentloom.nodes`, and modules or packages in a `custom_nodes/` folder. Either exposes
`register(registry)`, a `NODE_CLASSES` list of `Node` subclasses, or a `NODE_CLASS_MAPPINGS` dict whose
classes are our `Node` subclasses or ComfyUI node classes (V1, translated by graph.comfy_v1; V3 ones through the
compatibility layer's `comfy_api`, which gives them V1's attributes), with `NODE_DISPLAY_NAME_MAPPINGS`, or
ComfyUI's V3 `comfy_entrypoint()`. A plugin that fails to import or register is logged, recorded in
`registry.load_errors`, and skipped; a node of a pack that cannot be declared, or that would replace a built-in
node, is skipped alone. Folder packs are imported by graph.pack_loader, with the compatibility layer installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import importlib.util
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from graph import pack_loader
from graph.comfy_v1 import translate_v1
from graph.node import Node

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "latentloom.nodes"
COMPAT_PACKAGE = "comfy_compat"  # the ComfyUI compatibility layer, for folder packs only


@dataclass
class PackInfo:
    """A node pack loaded from a custom_nodes/ folder: what the server serves for it."""

    name: str
    path: Path
    web_directory: Path | None = None
    node_types: tuple[str, ...] = ()


class RegistryError(ValueError):
    pass


class NodeRegistry:
    """Node types by their wire name. Built-in names cannot be replaced by plugins."""

    def __init__(self) -> None:
        self._nodes: dict[str, type[Node]] = {}
        self._protected: set[str] = set()
        self.load_errors: dict[str, str] = {}
        self.packs: dict[str, PackInfo] = {}
        # The compatibility layer's module once packs were loaded with it (the server asks it to mount packs'
        # routes and to deliver their messages); None when no folder of packs was discovered.
        self.pack_runtime: Any = None
        self._added: tuple[str, ...] = ()  # the node types the plugin being loaded added

    def register(self, node_class: type[Node], *, builtin: bool = False) -> type[Node]:
        if not (isinstance(node_class, type) and issubclass(node_class, Node)):
            raise RegistryError(f"{node_class!r} is not a Node subclass")
        name = node_class.node_type
        if name in self._protected and self._nodes[name] is not node_class:
            raise RegistryError(f"node type {name!r} is built in and cannot be replaced")
        self._nodes[name] = node_class
        if builtin:
            self._protected.add(name)
        return node_class

    def is_builtin(self, name: str) -> bool:
        return name in self._protected

    def get(self, name: str) -> type[Node] | None:
        return self._nodes.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def items(self) -> list[tuple[str, type[Node]]]:
        return list(self._nodes.items())

    def object_info(self, env: Any = None) -> dict[str, dict[str, Any]]:
        """Every declaration in ComfyUI's /object_info shape; a node whose declaration fails is logged
        and left out rather than breaking the whole listing."""
        info = {}
        for name, cls in self._nodes.items():
            try:
                info[name] = cls.info(env)
            except Exception as exc:
                log.error("node %s: could not render its declaration: %s: %s", name, type(exc).__name__, exc)
        return info

    # -- plugins -------------------------------------------------------------------------------------

    def register_module(self, module: ModuleType | Any, label: str = "") -> int:
        """Register the nodes a plugin module exposes; returns how many."""
        before = len(self._nodes)
        if callable(getattr(module, "register", None)):
            module.register(self)
        elif hasattr(module, "NODE_CLASSES"):
            for cls in module.NODE_CLASSES:
                self.register(cls)
        elif hasattr(module, "NODE_CLASS_MAPPINGS") or callable(getattr(module, "comfy_entrypoint", None)):
            mappings = dict(getattr(module, "NODE_CLASS_MAPPINGS", None) or {})
            names = dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {})
            if callable(getattr(module, "comfy_entrypoint", None)):
                for cls in _v3_node_classes(module):
                    node_id = getattr(cls, "NODE_ID", None) or cls.__name__
                    mappings[node_id] = cls
                    if getattr(cls, "DISPLAY_NAME", None):
                        names.setdefault(node_id, cls.DISPLAY_NAME)
            pack = label.removeprefix("custom_nodes/").removesuffix(".py")
            for name, cls in mappings.items():
                self._register_mapping(name, cls, names.get(name), pack or label, label)
        elif not hasattr(module, "WEB_DIRECTORY"):
            raise RegistryError("exposes none of register(), NODE_CLASSES, NODE_CLASS_MAPPINGS")
        return len(self._nodes) - before

    def _register_mapping(self, name: str, cls: Any, display_name: str | None, pack: str, label: str) -> None:
        """One NODE_CLASS_MAPPINGS entry; a bad one is reported and skipped, the pack's other nodes stay."""
        try:
            if isinstance(cls, type) and issubclass(cls, Node):
                if cls.node_type != name:
                    raise RegistryError(f"NODE_CLASS_MAPPINGS key {name!r} != node_type {cls.node_type!r}")
                self.register(cls)
                return
            if not isinstance(cls, type):
                raise RegistryError(f"NODE_CLASS_MAPPINGS[{name!r}] is {cls!r}, not a class")
            if name in self._protected:
                raise RegistryError(f"node type {name!r} is built in and cannot be replaced")
            node = translate_v1(cls, name, display_name, pack)
            node.registry = self
            self.register(node)
        except Exception as exc:
            key = f"{label} node {name}"
            self.load_errors[key] = f"{type(exc).__name__}: {exc}"
            log.error("plugin %s: node %s skipped: %s: %s", label, name, type(exc).__name__, exc)

    def _load_plugin(self, label: str, load: Any, missing: list[str] | None = None) -> ModuleType | None:
        try:
            before = set(self._nodes)
            module = load()
            count = self.register_module(module, label)
            log.info("plugin %s: %d node types", label, count)
            self._added = tuple(n for n in self._nodes if n not in before)
            return module
        except (Exception, SystemExit) as exc:  # a broken plugin must never stop the engine
            hint = f" (requirements not installed: {', '.join(missing)})" if missing else ""
            self.load_errors[label] = f"{type(exc).__name__}: {exc}{hint}"
            log.error("plugin %s failed to load and was skipped: %s: %s%s", label, type(exc).__name__, exc, hint)
            return None

    def discover_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in importlib.metadata.entry_points(group=group):
            self._load_plugin(f"entry point {ep.name}", ep.load)

    def discover_folder(self, folder: str | Path, env: Any = None) -> None:
        """Import each `*.py` file and each package in `folder` (names ending `.disabled` are skipped), with the
        ComfyUI compatibility layer installed for them (`env` is what its folder_paths maps onto)."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        try:
            compat, finder = pack_loader.install_compat(COMPAT_PACKAGE)
            compat.install(self, env)
            finder.add_root(folder)
            self.pack_runtime = compat
        except Exception as exc:  # without it, packs written for our own interface still load
            self.load_errors["compatibility layer"] = f"{type(exc).__name__}: {exc}"
            log.error("the ComfyUI compatibility layer failed to load: %s: %s", type(exc).__name__, exc)
            finder = None
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")) or path.name.endswith(".disabled"):
                continue
            if path.is_dir() and (path / "__init__.py").is_file():
                source = path / "__init__.py"
            elif path.suffix == ".py":
                source = path
            else:
                continue
            label = f"custom_nodes/{path.name}"
            missing = pack_loader.missing_requirements(path) if path.is_dir() else []
            if missing:
                log.warning("plugin %s: requirements not installed (we never install them; run pip install): %s",
                            label, ", ".join(missing))
            load = (lambda s=source, p=path: finder.import_pack(s, p)) if finder is not None else \
                (lambda s=source, p=path: _import_file(s, p))
            self._added = ()
            module = self._load_plugin(label, load, missing)
            if module is not None:
                self._record_pack(path, module, label)

    def _record_pack(self, path: Path, module: ModuleType, label: str) -> None:
        name = path.name.removesuffix(".py")
        try:
            web = pack_loader.web_directory(module, path) if path.is_dir() else None
        except ValueError as exc:
            self.load_errors[f"{label} WEB_DIRECTORY"] = str(exc)
            log.error("plugin %s: %s", label, exc)
            web = None
        self.packs[name] = PackInfo(name, path, web, tuple(self._added))


def _import_file(source: Path, path: Path) -> ModuleType:
    return pack_loader.import_file(f"{pack_loader.PACKS_PACKAGE}.{path.stem}", source, path, RegistryError)


def _v3_node_classes(module: ModuleType) -> list[type]:
    """The node classes of a V3 pack: `await comfy_entrypoint()` gives a ComfyExtension whose
    `get_node_list()` (a coroutine too) lists them. Run on a private event loop in a thread of its own:
    registration is synchronous, and may happen while the caller's thread runs a loop (an app factory)."""
    async def collect() -> list[type]:
        extension = module.comfy_entrypoint()
        if inspect.isawaitable(extension):
            extension = await extension
        on_load = getattr(extension, "on_load", None)
        if callable(on_load):
            done = on_load()
            if inspect.isawaitable(done):
                await done
        nodes = extension.get_node_list()
        if inspect.isawaitable(nodes):
            nodes = await nodes
        return list(nodes)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, collect()).result()
