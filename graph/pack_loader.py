"""Importing ComfyUI node packs from a custom_nodes/ folder, each seeing the names ComfyUI gives its packs.

A pack writes `import folder_paths`, `import comfy.utils`, `import nodes` or `from server import PromptServer`.
The first two kinds of name are not ours: the compatibility layer's modules are entered in `sys.modules` under
them (`folder_paths`, `comfy`, `comfy.*`, `node_helpers`, `latent_preview`, `comfy_api`, ...), so any import
form finds them. `nodes` and `server` are also the names of our own top-level packages, and `sys.modules` can
hold one module per name; so those two are resolved per module instead: every module of a pack (the pack's
package, its submodules, and modules a pack imports from its own folder after putting it on `sys.path`) runs
with its own `__builtins__`, whose `__import__` maps `nodes`/`server` (and the other aliases) to the
compatibility layer. Our code keeps the normal `__import__` and never sees the aliases; a pack never reaches
our `nodes` or `server` packages through an import statement. (`importlib.import_module("nodes")` or
`sys.modules["nodes"]` in a pack still reach ours: those bypass `__import__`; no pack we know does that.)

The compatibility layer is a package of its own (see ALIASES in it) that nothing of ours imports; the registry
imports it by name, only when it loads packs from a folder.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PACKS_PACKAGE = "latentloom_custom_nodes"  # the package our custom_nodes/ modules are imported under


def pack_import_function(aliases: dict[str, str]) -> Callable[..., Any]:
    """An `__import__` that resolves the alias names (absolute imports only) to the compatibility layer."""
    real = builtins.__import__

    def pack_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0:
            top, _, rest = name.partition(".")
            target = aliases.get(top)
            if target is not None:
                module = importlib.import_module(f"{target}.{rest}" if rest else target)
                if not fromlist:
                    return importlib.import_module(target)
                for item in fromlist:
                    if item != "*" and not hasattr(module, item):
                        # `from x import missing` then fails with ImportError, as it should
                        with contextlib.suppress(ModuleNotFoundError):
                            importlib.import_module(f"{module.__name__}.{item}")
                return module
        return real(name, globals, locals, fromlist, level)

    return pack_import


class _PackLoader(importlib.abc.Loader):
    """Runs a pack's module with the packs' `__builtins__`; everything else is the wrapped loader's."""

    def __init__(self, inner: Any, pack_builtins: dict[str, Any]) -> None:
        self._inner = inner
        self._builtins = pack_builtins

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__["__builtins__"] = self._builtins
        self._inner.exec_module(module)


class PackFinder(importlib.abc.MetaPathFinder):
    """Finds pack modules (under PACKS_PACKAGE, or in a pack's folder put on sys.path) and gives them the packs'
    builtins. Installed once, first on `sys.meta_path`; looks only at paths inside the pack folders."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.roots: list[str] = []
        self.builtins = dict(builtins.__dict__, __import__=pack_import_function(aliases))

    def add_root(self, folder: Path) -> None:
        real = os.path.realpath(folder)
        if real not in self.roots:
            self.roots.append(real)

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == root or real.startswith(root + os.sep) for root in self.roots)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        entries = [p for p in (path if path is not None else sys.path) if isinstance(p, str) and self.inside(p)]
        if not entries:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, entries)
        if spec is None or spec.loader is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _PackLoader(spec.loader, self.builtins)
        return spec

    def import_pack(self, source: Path, folder: Path) -> ModuleType:
        """Import one pack (a package folder or a single file) as `latentloom_custom_nodes.<name>`."""
        _packs_package()
        name = f"{PACKS_PACKAGE}.{folder.stem}"
        for stale in [m for m in sys.modules if m.startswith(name + ".")]:  # a reload sees the files of now
            del sys.modules[stale]
        is_package = source.name == "__init__.py"
        spec = importlib.util.spec_from_file_location(
            name, source, submodule_search_locations=[str(folder)] if is_package else None)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {source}")
        spec.loader = _PackLoader(spec.loader, self.builtins)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module


def _packs_package() -> None:
    """An empty namespace parent for the packs, so that `latentloom_custom_nodes.<pack>` has a parent module."""
    if PACKS_PACKAGE not in sys.modules:
        parent = ModuleType(PACKS_PACKAGE)
        parent.__path__ = []
        sys.modules[PACKS_PACKAGE] = parent


_FINDERS: dict[str, PackFinder] = {}


def install_compat(package: str) -> tuple[ModuleType, PackFinder]:
    """Import the compatibility layer `package`, enter its modules in sys.modules under their ComfyUI names
    (except names of our own packages, which only pack modules resolve), and put the pack finder on
    sys.meta_path. Idempotent."""
    compat = importlib.import_module(package)
    finder = _FINDERS.get(package)
    if finder is None:
        aliases: dict[str, str] = dict(compat.ALIASES)
        ours = set(getattr(compat, "OUR_NAMES", ()))
        for alias, target in aliases.items():
            if alias in ours:
                continue
            module = importlib.import_module(target)
            sys.modules.setdefault(alias, module)
            for sub in getattr(compat, "SUBMODULES", {}).get(alias, ()):
                sys.modules.setdefault(f"{alias}.{sub}", importlib.import_module(f"{target}.{sub}"))
        finder = PackFinder(aliases)
        sys.meta_path.insert(0, finder)
        _FINDERS[package] = finder
    return compat, finder


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def missing_requirements(pack_folder: Path) -> list[str]:
    """The lines of a pack's requirements.txt whose distribution is not installed. We never install them: the
    log says what to install."""
    path = pack_folder / "requirements.txt"
    if not path.is_file():
        return []
    missing = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith(("-", "git+", "http:", "https:")):
            continue
        match = _REQUIREMENT.match(line)
        if match is None:
            continue
        try:
            importlib.metadata.distribution(match.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
    return missing


def web_directory(module: ModuleType, folder: Path) -> Path | None:
    """A pack's WEB_DIRECTORY as a folder inside the pack (one that leaves the pack is refused)."""
    value = getattr(module, "WEB_DIRECTORY", None)
    if not value:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"WEB_DIRECTORY must be a path, got {value!r}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, value))
    if path != root and not path.startswith(root + os.sep):
        raise ValueError(f"WEB_DIRECTORY {str(value)!r} leaves the pack's folder")
    return Path(path) if os.path.isdir(path) else None
