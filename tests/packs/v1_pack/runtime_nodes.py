"""Nodes that use what ComfyUI gives packs: progress and interrupt, the server, folders, the core nodes."""

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from aiohttp import web
from PIL import Image

import nodes
import server
from server import BinaryEventTypes, PromptServer


@PromptServer.instance.routes.get("/v1_pack/ping")
async def ping(request):
    return web.json_response({"pong": request.query.get("q", ""), "max": nodes.MAX_RESOLUTION})


class V1Steps:
    """Counts steps on a ProgressBar; `stop_at` interrupts its own prompt there, as a user would."""

    CATEGORY = "v1 pack/runtime"
    RETURN_TYPES = ("INT",)
    FUNCTION = "steps"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 4, "min": 1, "max": 100}),
                             "stop_at": ("INT", {"default": -1, "min": -1, "max": 100})}}

    def steps(self, steps, stop_at):
        bar = comfy.utils.ProgressBar(steps)
        done = 0
        for i in range(steps):
            if i == stop_at:
                comfy.model_management.interrupt_current_processing()
            comfy.model_management.throw_exception_if_processing_interrupted()
            done += 1
            bar.update(1)
        return (done,)


class V1Hello:
    """Sends a message to the prompt's client and shows what it resolved for `nodes` and `server`."""

    CATEGORY = "v1 pack/runtime"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "hello"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler": (comfy.samplers.KSampler.SAMPLERS,),
                             "scheduler": (comfy.samplers.KSampler.SCHEDULERS,)}}

    def hello(self, sampler, scheduler):
        PromptServer.instance.send_sync("v1_pack.hello", {"sampler": sampler},
                                        PromptServer.instance.client_id)
        # binary messages: raw bytes under an event number, a progress text, a preview image (ComfyUI's frames)
        PromptServer.instance.send_sync(BinaryEventTypes.TEXT, b"\x00\x00\x00\x01hraw",
                                        PromptServer.instance.client_id)
        PromptServer.instance.send_progress_text(f"hello {sampler}", "h", PromptServer.instance.client_id)
        preview = Image.new("RGB", (64, 32), (255, 0, 0))
        PromptServer.instance.send_sync(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, ("PNG", preview, 16),
                                        PromptServer.instance.client_id)
        return {"ui": {"modules": [nodes.__name__, server.__name__, folder_paths.__name__]}}


class V1Files:
    """Lists a model folder and resolves a file of it through folder_paths."""

    CATEGORY = "v1 pack/runtime"
    RETURN_TYPES = ("STRING", "STRING")
    FUNCTION = "find"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (folder_paths.get_filename_list("loras"),)}}

    def find(self, name):
        path = folder_paths.get_full_path_or_raise("loras", name)
        return (path, folder_paths.get_output_directory())


class V1CoreLatent:
    """Calls a core node directly, as packs do with nodes.NODE_CLASS_MAPPINGS."""

    CATEGORY = "v1 pack/runtime"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "latent"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 64, "min": 16, "max": nodes.MAX_RESOLUTION, "step": 8})}}

    def latent(self, width):
        empty = nodes.NODE_CLASS_MAPPINGS["EmptyLatentImage"]()
        return empty.generate(width, width, 1)


class V1Callback:
    """Reports steps through latent_preview's sampler callback (a pack's own sampling loop)."""

    CATEGORY = "v1 pack/runtime"
    RETURN_TYPES = ("INT",)
    FUNCTION = "loop"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 3, "min": 1, "max": 10})}}

    def loop(self, steps):
        callback = latent_preview.prepare_callback(None, steps)
        for i in range(steps):
            callback(i, None, None, steps)
        return (steps,)


RUNTIME_NODES = {"V1Callback": V1Callback, "V1Steps": V1Steps, "V1Hello": V1Hello, "V1Files": V1Files,
                 "V1CoreLatent": V1CoreLatent}
