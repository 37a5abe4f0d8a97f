"""ComfyUI's front end, served instead of our canvas when `latentloom serve --front-end comfyui`.

The front end is the PyPI package `comfyui-frontend-package` (static files: `index.html`, `assets/`, ...). It is
GPL-3.0, so it is never part of this repository: the user installs it (`pip install 'latentloom[comfyui]'`, which
pins the version the browser tests run against) and the server finds its `static/` folder through the import
system, as ComfyUI does. Everything it calls over HTTP is an ordinary API route (routes_*.py); this module only
locates the files and adds the few static answers the page asks for that are no API's business (`/user.css`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)

PACKAGE = "comfyui_frontend_package"
# The version the browser tests (tests/web/test_comfyui_frontend.py) ran against; pyproject's `comfyui` extra pins it.
TESTED_VERSION = "1.37.11"
INSTALL_HINT = "pip install 'latentloom[comfyui]'"
FRONT_ENDS = ("latentloom", "comfyui")


class FrontEndMissing(Exception):
    """`--front-end comfyui` without the package (or with a broken install): one line saying how to install it."""


def comfyui_static_root() -> Path:
    """The `static/` folder of the installed `comfyui-frontend-package`.

    Found through `importlib.util.find_spec`, without importing the package (its `__init__` reads metadata only,
    but finding is enough), so an install in any site-packages or a `pip install -e` of a checkout works.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FrontEndMissing(f"--front-end comfyui needs ComfyUI's front end, which is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        static = Path(location) / "static"
        if (static / "index.html").is_file():
            return static
    raise FrontEndMissing(f"the installed {PACKAGE} has no static/index.html (a broken install?); reinstall it: "
                          f"{INSTALL_HINT}")


def installed_version() -> str | None:
    """The installed front end's version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


async def user_css(request: web.Request) -> web.Response:
    """`/user.css`, which ComfyUI's index.html links before its own styles.

    ComfyUI answers it with a 404, which the browser logs as a console error and refuses as a stylesheet; the
    user's own stylesheet is `user/default/user.css` (served by /userdata), so this file is always empty.
    """
    return web.Response(text="", content_type="text/css", headers={"Cache-Control": "no-cache"})

