"""How a compatibility module says that a name a pack asked for is not offered: naming the name, and the node and
pack running when they are known (at import time the pack loader names the pack)."""

from __future__ import annotations

from graph.comfy_v1 import current_run


def not_offered(module: str, name: str) -> AttributeError:
    run = current_run()
    where = f" (asked by node {run.node_type} of pack {run.pack})" if run is not None else ""
    return AttributeError(f"module {module!r} has no attribute {name!r}: not offered by Latent Loom{where}")
