"""ComfyUI's `comfy` package as packs see it: `comfy.utils`, `comfy.model_management`, `comfy.samplers`,
`comfy.model_patcher`, `comfy.sd`, `comfy.model_base` and `comfy.ldm.modules.attention`.
A module of ComfyUI's that is not here fails to import with the usual ModuleNotFoundError naming it."""
