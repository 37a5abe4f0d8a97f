"""Importing ComfyUI node packs from a custom_nodes/ folder, each seeing the names ComfyUI gives its packs.

A pack writes `import folder_paths`, `import comfy.utils`, `import nodes` or `from server import PromptServer`.
The first two kinds of name are not ours: the compatibility layer's modules are entered in `sys.modules` under
them (`folder_paths`, `comfy`, `comfy.*`, `node_helpers`, `latent_preview`, `comfy_api`, ...), so any import
form finds them. `nodes` and `server` are also the names of our own top-level packages, and `sys.modules` can
hold one module per name; so those two are resolved by who imports them (PackImports): an import statement in
a file inside a pack folder gets the compatibility layer's `nodes`/`server`, every other file ours. A pack
never reaches our `nodes` or `server` packages through an import statement. (`importlib.import_module("nodes")`
or `sys.modules["nodes"]` in a pack still reach ours: those bypass `__import__`; no pack we tried does that.)

The compatibility layer is a package of its own (see ALIASES in it) that nothing of ours imports; the registry
imports it by name, only when it loads packs from a folder.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PACKS_PACKAGE = "latentloom_custom_nodes"  # the package our custom_nodes/ modules are imported under


class PackImports:
    """Resolves `nodes` and `server` to the compatibility layer for code in the pack folders, and imports packs.

    It wraps `builtins.__import__` once per process: an import statement hands `__import__` the importing
    module's globals, so whichever way a pack's module was loaded (as our package, from its folder put on
    sys.path, or by the pack's own `spec_from_file_location`, which several popular packs use), its
    `import server` is recognised by the module's `__file__` lying in a pack folder. Every other import goes
    straight to the original `__import__` after one set lookup."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self.roots: list[str] = []
        self._real_import = builtins.__import__
        builtins.__import__ = self._import

    def add_root(self, folder: Path) -> None:
        for root in (os.path.abspath(folder), os.path.realpath(folder)):
            if root not in self.roots:
                self.roots.append(root)

    def is_pack_code(self, module_globals: Any) -> bool:
        if not isinstance(module_globals, dict):
            return False
        if str(module_globals.get("__name__") or "").startswith(PACKS_PACKAGE + "."):
            return True
        file = module_globals.get("__file__")
        return isinstance(file, str) and any(file.startswith(root + os.sep) for root in self.roots)

    def _import(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0:
            top, _, rest = name.partition(".")
            target = self.aliases.get(top)
            if target is not None and self.is_pack_code(globals):
                return _aliased(target, rest, fromlist)
        return self._real_import(name, globals, locals, fromlist, level)

    def import_pack(self, source: Path, folder: Path) -> ModuleType:
        """Import one pack (a package folder or a single file) as `latentloom_custom_nodes.<name>`."""
        _packs_package()
        name = f"{PACKS_PACKAGE}.{folder.stem}"
        for stale in [m for m in sys.modules if m.startswith(name + ".")]:  # a reload sees the files of now
            del sys.modules[stale]
        return import_file(name, source, folder)


def import_file(name: str, source: Path, folder: Path, error: type[Exception] = ImportError) -> ModuleType:
    """Import `source` (a module file, or a package's `__init__.py` whose package folder is `folder`) as `name`;
    on failure nothing of it stays in sys.modules. `error` is raised when the file cannot be imported at all."""
    is_package = source.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(folder)] if is_package else None)
    if spec is None or spec.loader is None:
        raise error(f"cannot import {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _aliased(target: str, rest: str, fromlist: Any) -> ModuleType:
    """What `__import__` returns for an aliased name: the top module, or with a fromlist the named one (its
    submodules in the fromlist imported, as the real `__import__` does)."""
    module = importlib.import_module(f"{target}.{rest}" if rest else target)
    if not fromlist:
        return importlib.import_module(target)
    for item in fromlist:
        if item != "*" and not hasattr(module, item):
            # `from x import missing` then fails with ImportError, as it should
            with contextlib.suppress(ModuleNotFoundError):
                importlib.import_module(f"{module.__name__}.{item}")
    return module


def _packs_package() -> None:
    """An empty namespace parent for the packs, so that `latentloom_custom_nodes.<pack>` has a parent module."""
    if PACKS_PACKAGE not in sys.modules:
        parent = ModuleType(PACKS_PACKAGE)
        parent.__path__ = []
        sys.modules[PACKS_PACKAGE] = parent


_INSTALLED: dict[str, PackImports] = {}


def install_compat(package: str) -> tuple[ModuleType, PackImports]:
    """Import the compatibility layer `package`, enter its modules in sys.modules under their ComfyUI names
    except the names of our own packages, which only pack code resolves (PackImports). Idempotent."""
    compat = importlib.import_module(package)
    finder = _INSTALLED.get(package)
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
        finder = PackImports({alias: aliases[alias] for alias in ours})
        _INSTALLED[package] = finder
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
