"""ComfyUI's `comfy_extras` package as packs see it: only `nodes_model_merging`, whose classes packs subclass.
A module of it that is not here fails to import with the usual ModuleNotFoundError naming it."""
