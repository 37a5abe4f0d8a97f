"""What ComfyUI node packs import, for packs only: `folder_paths`, `comfy.*`, `node_helpers`, `latent_preview`,
`nodes`, `server`, `comfy_api` and `comfy_extras`, each mapped onto our real data directory, progress, interrupt
and model management.

Nothing of ours imports this package. graph.registry imports it by name when it loads a folder of packs
(graph.pack_loader): the modules are entered in `sys.modules` under ComfyUI's names, except `nodes` and
`server` (our own packages' names), which only modules of packs resolve here, through their own `__import__`.
The modules keep their state in `_state` (the environment, the registry, the server's delivery function).
"""

from __future__ import annotations

from typing import Any

from comfy_compat import _state

# ComfyUI's module names -> ours.
ALIASES = {
    "folder_paths": "comfy_compat.folder_paths",
    "comfy": "comfy_compat.comfy",
    "node_helpers": "comfy_compat.node_helpers",
    "latent_preview": "comfy_compat.latent_preview",
    "comfy_api": "comfy_compat.comfy_api",
    "comfy_extras": "comfy_compat.comfy_extras",
    "nodes": "comfy_compat.nodes",
    "server": "comfy_compat.server",
}
OUR_NAMES = ("nodes", "server")  # also our own packages: resolved for pack modules only
SUBMODULES = {"comfy": ("utils", "model_management", "samplers", "model_patcher", "sd", "model_base", "ldm",
                        "ldm.modules", "ldm.modules.attention", "comfy_types", "comfy_types.node_typing"),
              "comfy_api": ("latest", "latest.io", "latest.ui"), "comfy_extras": ("nodes_model_merging",)}


def install(registry: Any, env: Any) -> None:
    """Point the layer at the registry that loads the packs and at the environment they read files from."""
    _state.STATE.registry = registry
    _state.STATE.env = env
    from comfy_compat import folder_paths, server

    folder_paths.refresh()
    if env is not None:
        # Packs find "ComfyUI's folder" as the folder of the file that defines PromptServer, and some write there
        # (legacy script folders under web/extensions); for them, ComfyUI's folder is our data directory.
        server.__file__ = str(env.data_dir / "server.py")


def attach(app: Any, publish: Any) -> None:
    """Mount the packs' HTTP routes on the server's app and let `PromptServer.send_sync` deliver through
    `publish(event, data, client_id)`."""
    from comfy_compat import server

    server.PromptServer.instance.attach(app, publish)
