"""A ComfyUI V1 pack, written for these tests in ComfyUI's style, that patches a MODEL through every hook family
packs use (model_options' transformer patches and replacements, the unet function wrapper, the cfg, pre-cfg and
post-cfg functions, object patches) and a CLIP through add_patches. Each patch records what it saw in LOG."""

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.sd
import comfy.utils
import comfy_extras.nodes_model_merging
import folder_paths
import torch
from comfy.comfy_types.node_typing import IO, ComfyNodeABC
from comfy.ldm.modules.attention import BasicTransformerBlock, optimized_attention
from comfy.model_base import SD15, SDXL, BaseModel, ModelType
from comfy.model_patcher import set_model_options_patch_replace

LOG = []
# SD1's transformer blocks, by ComfyUI's (block, number): what an attn replace is keyed by
SD1_ATTENTION = ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)]
                 + [("output", i) for i in range(3, 12)])

KINDS = ["cfg_returns_cond", "pre_cfg_uncond_is_cond", "post_cfg_returns_cond", "post_cfg_cfg1_record",
         "attn1_patch_identity", "attn1_replace_standard", "attn1_output_scale", "attn2_patch_zero_context",
         "attn2_replace_zero", "attn2_replace_one_block", "middle_patch_scale", "input_block_scale",
         "output_block_scale", "wrapper_count", "wrapper_sets_option", "direct_dict_output_scale",
         "object_patch_model_sampling", "post_cfg_recompute", "post_cfg_pag", "missing_module_name",
         "missing_model_method", "differential_mask",
         "wrapper_uncond_is_cond"]


class PatchModel(ComfyNodeABC):
    CATEGORY = "patch pack"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (IO.MODEL,), "kind": (KINDS,), "value": (IO.FLOAT, {"default": 1.0})}}

    def patch(self, model, kind, value):
        assert isinstance(model, comfy.model_patcher.ModelPatcher)
        m = model.clone()
        getattr(self, kind)(m, value)
        return (m,)

    # --- guidance
    def cfg_returns_cond(self, m, value):
        def cfg(args):
            LOG.append(("cfg", sorted(args)))
            return args["cond"]  # x - cond_denoised: the positive prediction alone, as cfg 1
        m.set_model_sampler_cfg_function(cfg)

    def pre_cfg_uncond_is_cond(self, m, value):
        def pre(args):
            LOG.append(("pre", sorted(args), len(args["conds"]), len(args["conds_out"])))
            cond, _ = args["conds_out"]
            return [cond, cond]
        m.set_model_sampler_pre_cfg_function(pre)

    def post_cfg_returns_cond(self, m, value):
        def post(args):
            LOG.append(("post", sorted(args), type(args["cond"]).__name__))
            return args["cond_denoised"]
        m.set_model_sampler_post_cfg_function(post)

    def post_cfg_cfg1_record(self, m, value):
        def post(args):
            LOG.append(("post1", bool((args["cond_denoised"] - args["uncond_denoised"]).abs().max() > 0)))
            return args["denoised"]
        m.set_model_sampler_post_cfg_function(post, disable_cfg1_optimization=value > 0)

    # --- attention
    def attn1_patch_identity(self, m, value):
        def patch(n, context, value_, extra_options):
            LOG.append(("attn1_patch", extra_options["block"], extra_options["block_index"],
                        extra_options["n_heads"], extra_options["dim_head"], list(extra_options["cond_or_uncond"])))
            assert context is n and value_ is n
            return n, context, value_
        m.set_model_attn1_patch(patch)

    def attn1_replace_standard(self, m, value):
        def replace(q, k, v, extra_options):
            LOG.append(("attn1_replace", extra_options["block"]))
            return optimized_attention(q, k, v, extra_options["n_heads"])
        for block, number in SD1_ATTENTION:
            m.set_model_attn1_replace(replace, block, number)

    def attn1_output_scale(self, m, value):
        def patch(out, extra_options):
            LOG.append(("attn1_output", extra_options["block"]))
            return out * value
        m.set_model_attn1_output_patch(patch)

    def attn2_patch_zero_context(self, m, value):
        def patch(n, context, value_, extra_options):
            LOG.append(("attn2_patch", tuple(context.shape)))
            return n, torch.zeros_like(context), torch.zeros_like(value_)
        m.set_model_attn2_patch(patch)

    def attn2_replace_zero(self, m, value):
        def replace(q, k, v, extra_options):
            return torch.zeros_like(q)
        for block, number in SD1_ATTENTION:
            m.set_model_attn2_replace(replace, block, number, 0)

    def attn2_replace_one_block(self, m, value):
        def replace(q, k, v, extra_options):
            LOG.append(("attn2_replace", extra_options["block"], extra_options["block_index"]))
            return torch.zeros_like(q)
        m.set_model_attn2_replace(replace, "middle", 0)

    def middle_patch_scale(self, m, value):
        def patch(x, extra_options):
            LOG.append(("middle_patch", extra_options["block"]))
            return x * value
        m.set_model_patch(patch, "middle_patch")

    # --- blocks
    def input_block_scale(self, m, value):
        def patch(h, transformer_options):
            LOG.append(("input_block", transformer_options["block"]))
            return h * value
        m.set_model_input_block_patch(patch)

    def output_block_scale(self, m, value):
        def patch(h, hsp, transformer_options):
            LOG.append(("output_block", transformer_options["block"]))
            return h * value, hsp
        m.set_model_output_block_patch(patch)

    # --- the model function
    def wrapper_count(self, m, value):
        def wrapper(apply_model, args):
            c = args["c"]
            LOG.append(("wrapper", sorted(args), list(args["cond_or_uncond"]), tuple(c["c_crossattn"].shape)))
            return apply_model(args["input"], args["timestep"], **c) * value
        m.set_model_unet_function_wrapper(wrapper)

    def wrapper_uncond_is_cond(self, m, value):
        """Each chunk's label in cond_or_uncond is its role: the negative's chunks replaced by the positive's give
        the positive's prediction alone (cfg 1)."""
        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            labels = args["cond_or_uncond"]
            chunks = list(out.chunk(len(labels)))
            positive = chunks[labels.index(0)]
            return torch.cat([positive if label == 1 else chunk for label, chunk in zip(labels, chunks, strict=True)])
        m.set_model_unet_function_wrapper(wrapper)

    def wrapper_sets_option(self, m, value):
        def wrapper(apply_model, args):
            c = dict(args["c"])
            c["transformer_options"] = {**c["transformer_options"], "pack_scale": value}
            return apply_model(args["input"], args["timestep"], **c)

        def patch(out, extra_options):
            LOG.append(("scaled_by_option", extra_options["pack_scale"]))
            return out * extra_options["pack_scale"]
        m.set_model_unet_function_wrapper(wrapper)
        m.set_model_attn1_output_patch(patch)

    def direct_dict_output_scale(self, m, value):
        def patch(out, extra_options):
            LOG.append(("direct", extra_options["block"]))
            return out * value
        to = m.model_options.setdefault("transformer_options", {})
        to.setdefault("patches", {})["attn1_output_patch"] = [patch]

    def post_cfg_recompute(self, m, value):
        """calc_cond_batch with the model's own options gives back the step's predictions; None gives zeros."""
        def post(args):
            model = args["model"]
            cond, uncond, zero = comfy.samplers.calc_cond_batch(model, [args["cond"], args["uncond"], None],
                                                                args["input"], args["sigma"], args["model_options"])
            LOG.append(("recompute", float((cond - args["cond_denoised"]).abs().max()),
                        float((uncond - args["uncond_denoised"]).abs().max()), float(zero.abs().max()),
                        isinstance(model, BaseModel), isinstance(model, SD15), isinstance(model, SDXL),
                        model.model_type == ModelType.EPS,
                        any(isinstance(mod, BasicTransformerBlock) for mod in model.diffusion_model.modules())))
            return args["denoised"]
        m.set_model_sampler_post_cfg_function(post)

    def post_cfg_pag(self, m, value):
        """Perturbed-attention guidance as packs write it: the middle block's self-attention replaced by its values,
        the positive evaluated again through calc_cond_batch."""
        def identity(q, k, v, extra_options):
            return v

        def post(args):
            options = set_model_options_patch_replace(args["model_options"], identity, "attn1", "middle", 0)
            (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                          options)
            return args["denoised"] + (args["cond_denoised"] - perturbed) * value
        m.set_model_sampler_post_cfg_function(post)

    def missing_module_name(self, m, value):
        m.sampling_function = comfy.samplers.sampling_function  # ComfyUI's sampler internals: not offered

    def missing_model_method(self, m, value):
        m.set_model_noise_refiner(lambda x: x)  # not a method ComfyUI or we have

    def differential_mask(self, m, value):
        """Differential Diffusion as packs write it: the region repainted grows as the timestep falls."""
        def mask_fn(sigma, denoise_mask, extra_options):
            sampling = extra_options["model"].inner_model.model_sampling
            sigmas = extra_options["sigmas"]
            sigma_to = max(float(sigmas[-1]), sampling.sigma_min)
            ts_from = float(sampling.timestep(sigmas[:1]).reshape(-1)[0])
            ts_to = float(sampling.timestep(torch.tensor([sigma_to])).reshape(-1)[0])
            now = float(sampling.timestep(sigma.reshape(-1)[:1]).reshape(-1)[0])
            LOG.append(("mask", now))
            return (denoise_mask >= (now - ts_to) / (ts_from - ts_to)).to(denoise_mask.dtype)
        m.set_model_denoise_mask_function(mask_fn)

    def object_patch_model_sampling(self, m, value):
        sampling = m.get_model_object("model_sampling")
        LOG.append(("sigmas", float(sampling.sigma_min), float(sampling.sigma_max),
                    float(sampling.percent_to_sigma(0.5)), float(sampling.timestep(torch.tensor(sampling.sigma_max)))))
        m.add_object_patch("model_sampling", sampling)


class PatchClip:
    """A weight difference on one parameter of a text encoder (ComfyUI's CLIP key names)."""

    CATEGORY = "patch pack"
    RETURN_TYPES = ("CLIP", "CONDITIONING")
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "strength": ("FLOAT", {"default": 1.0}),
                             "width": ("INT", {"default": 768}), "text": ("STRING", {"default": "a cat"})}}

    def patch(self, clip, strength, width, text):
        assert isinstance(clip, comfy.sd.CLIP)
        c = clip.clone()
        key = "clip_l.transformer.text_model.final_layer_norm.bias"
        applied = c.add_patches({key: (torch.full((width,), 0.25),), "clip_l.transformer.not_a_weight": torch.ones(1)},
                                strength)
        LOG.append(("clip", applied))
        tokens = c.tokenize(text)
        out = c.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return (c, [[cond, out]])


class BlockMerge(comfy_extras.nodes_model_merging.ModelMergeBlocks):
    """A per-block merge as packs write one: ComfyUI's ModelMergeBlocks with its own ratio names, `merge` inherited."""

    @classmethod
    def INPUT_TYPES(cls):
        ratio = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})
        names = ["time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.", "out."]
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), **{name: ratio for name in names}}}


class LoraThroughComfySd:
    """A LoRA applied the way packs apply one: read with comfy.utils.load_torch_file, comfy.sd.load_lora_for_models."""

    CATEGORY = "patch pack"
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        strength = ("FLOAT", {"default": 1.0})
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": (folder_paths.get_filename_list("loras"),),
                             "strength_model": strength, "strength_clip": strength}}

    def load(self, model, clip, lora_name, strength_model, strength_clip):
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


NODE_CLASS_MAPPINGS = {"PatchModel": PatchModel, "PatchClip": PatchClip, "BlockMerge": BlockMerge,
                       "LoraThroughComfySd": LoraThroughComfySd}
NODE_DISPLAY_NAME_MAPPINGS = {"PatchModel": "Patch a model (test pack)"}
