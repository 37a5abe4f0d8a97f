"""A ComfyUI V1 pack that patches a MODEL, encodes text with a CLIP and round-trips a VAE, through the handle
methods packs call most."""

import torch


class RecordCFG:
    """Wraps a MODEL's guidance: a post-cfg function that scales the denoised estimate and counts its calls, and a
    weight difference on one UNet weight."""

    CATEGORY = "model pack"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CALLS = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": ("FLOAT", {"default": 1.0}),
                             "weight_shift": ("FLOAT", {"default": 0.0})}}

    def patch(self, model, scale, weight_shift):
        m = model.clone()

        def post_cfg(args):
            RecordCFG.CALLS.append(float(args["sigma"].flatten()[0]))
            assert isinstance(args["cond"], list) and args["cond_scale"] == 5.0  # the conditioning list, as ComfyUI
            return args["denoised"] * scale

        m.set_model_sampler_post_cfg_function(post_cfg)
        if weight_shift:
            conv = m.get_model_object("diffusion_model.out.2")
            applied = m.add_patches({"diffusion_model.out.2.bias": (torch.full_like(conv.bias, weight_shift),)})
            assert applied == ["diffusion_model.out.2.bias"], applied
        return (m,)


class PlainCFG:
    """ComfyUI's cfg function form, reproducing plain CFG (the result must equal the unpatched model's)."""

    CATEGORY = "model pack"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        m = model.clone()
        m.set_model_sampler_cfg_function(lambda a: a["uncond"] + (a["cond"] - a["uncond"]) * a["cond_scale"])
        return (m,)


class ScaleBackbone:
    """FreeU's idea through ComfyUI's block patch: scale the backbone features before each output block."""

    CATEGORY = "model pack"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    BLOCKS = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "b": ("FLOAT", {"default": 1.0})}}

    def patch(self, model, b):
        m = model.clone()

        def output_patch(h, hsp, transformer_options):
            ScaleBackbone.BLOCKS.append(transformer_options["block"])
            return h * b, hsp

        m.set_model_output_block_patch(output_patch)
        return (m,)


class EncodeTokens:
    CATEGORY = "model pack"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    def encode(self, clip, text):
        tokens = clip.tokenize(text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return ([[cond, {"pooled_output": pooled}]], clip.encode_from_tokens_scheduled(tokens))


class VAERoundTrip:
    CATEGORY = "model pack"
    RETURN_TYPES = ("IMAGE", "INT")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "samples": ("LATENT",)}}

    def run(self, vae, samples):
        images = vae.decode(samples["samples"])
        latent = vae.encode(images[:, :, :, :3])
        assert latent.shape == samples["samples"].shape
        return (images, vae.spacial_compression_decode())


class Sink:
    CATEGORY = "model pack"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "take"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    def take(self, value):
        return {}


NODE_CLASS_MAPPINGS = {"Sink": Sink, "ScaleBackbone": ScaleBackbone, "RecordCFG": RecordCFG, "PlainCFG": PlainCFG,
                       "EncodeTokens": EncodeTokens, "VAERoundTrip": VAERoundTrip}
