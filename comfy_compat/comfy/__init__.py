"""ComfyUI's `comfy` package as packs see it: `comfy.utils`, `comfy.model_management`, `comfy.samplers`.
A module of ComfyUI's that is not here fails to import with the usual ModuleNotFoundError naming it."""
