"""ComfyUI's `comfy_api` for packs: the V3 node interface (`comfy_api.latest`: `io`, `ComfyExtension`)."""
