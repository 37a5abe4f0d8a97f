"""The node registry and plugin discovery.

Third-party node packages are found two ways: installed distributions that declare an entry point in
the group `latentloom.nodes`, and modules or packages in a `custom_nodes/` folder. Either exposes
`register(registry)`, a `NODE_CLASSES` list of `Node` subclasses, or a `NODE_CLASS_MAPPINGS` dict. A
plugin that fails to import or register is logged, recorded in `registry.load_errors`, and skipped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from graph.node import Node

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "latentloom.nodes"


class RegistryError(ValueError):
    pass


class NodeRegistry:
    """Node types by their wire name. Built-in names cannot be replaced by plugins."""

    def __init__(self) -> None:
        self._nodes: dict[str, type[Node]] = {}
        self._protected: set[str] = set()
        self.load_errors: dict[str, str] = {}

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

    def register_module(self, module: ModuleType | Any) -> int:
        """Register the nodes a plugin module exposes; returns how many."""
        before = len(self._nodes)
        if callable(getattr(module, "register", None)):
            module.register(self)
        elif hasattr(module, "NODE_CLASSES"):
            for cls in module.NODE_CLASSES:
                self.register(cls)
        elif hasattr(module, "NODE_CLASS_MAPPINGS"):
            for name, cls in module.NODE_CLASS_MAPPINGS.items():
                if cls.node_type != name:
                    raise RegistryError(f"NODE_CLASS_MAPPINGS key {name!r} != node_type {cls.node_type!r}")
                self.register(cls)
        else:
            raise RegistryError("exposes none of register(), NODE_CLASSES, NODE_CLASS_MAPPINGS")
        return len(self._nodes) - before

    def _load_plugin(self, label: str, load: Any) -> None:
        try:
            count = self.register_module(load())
            log.info("plugin %s: %d node types", label, count)
        except (Exception, SystemExit) as exc:  # a broken plugin must never stop the engine
            self.load_errors[label] = f"{type(exc).__name__}: {exc}"
            log.error("plugin %s failed to load and was skipped: %s: %s", label, type(exc).__name__, exc)

    def discover_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in importlib.metadata.entry_points(group=group):
            self._load_plugin(f"entry point {ep.name}", ep.load)

    def discover_folder(self, folder: str | Path) -> None:
        """Import each `*.py` file and each package in `folder` (names ending `.disabled` are skipped)."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")) or path.name.endswith(".disabled"):
                continue
            if path.is_dir() and (path / "__init__.py").is_file():
                source = path / "__init__.py"
            elif path.suffix == ".py":
                source = path
            else:
                continue
            self._load_plugin(f"custom_nodes/{path.name}", lambda s=source, p=path: _import_file(s, p))


def _import_file(source: Path, path: Path) -> ModuleType:
    name = f"latentloom_custom_nodes.{path.stem}"
    is_package = source.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(path)] if is_package else None)
    if spec is None or spec.loader is None:
        raise RegistryError(f"cannot import {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
