"""Model merging and saving: weighted sums of models and text encoders, per block too; checkpoints, parts and
extracted LoRAs written to the output folder.

Merges return clones carrying merge patches (diffusion/patches/merge.py): the inputs are unchanged, nothing is copied,
and LoRAs loaded before a merge are merged with their model. Savers write the weights the patches make, in the
original single-file layout (diffusion/checkpoints/saving.py), as `<prefix>_<counter>_.safetensors` under the output
folder (the prefix may hold subfolders), with the workflow in the metadata as ComfyUI's savers keep it. A saver
holds its models through the model manager while it reads them (`use`), so that no other prompt re-patches a
shared module meanwhile; the modules then carry the patched weights, which are read as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from diffusion.checkpoints.saving import (
    bare_text_encoder,
    checkpoint_plan,
    clip_heads,
    config_metadata,
    modelspec_metadata,
    vae_plan,
)
from diffusion.patches.lora import kohya_text_names, kohya_unet_names
from diffusion.patches.lora_extract import LORA_TYPES, extract_layers
from diffusion.patches.merge import (
    CLIP_SKIPPED_SUFFIXES,
    MergeError,
    addition,
    block_interpolation,
    difference,
    interpolation,
    merge_patches,
)
from graph.node import Boolean, Combo, Float, Int, Node, NodeOutput, Output, Socket, String
from graph.types import CLIP, MODEL, VAE
from nodes.image_io import next_counter, output_folder
from nodes.model_io import latent_metadata

log = logging.getLogger(__name__)

Coefficients = Callable[[str], tuple[float, float]]
SD_BLOCKS = ["time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(12)),
             *(f"middle_block.{i}." for i in range(3)), *(f"output_blocks.{i}." for i in range(12)), "out."]
SDXL_BLOCKS = ["time_embed.", "label_emb.", *(f"input_blocks.{i}" for i in range(9)),
               *(f"middle_block.{i}" for i in range(3)), *(f"output_blocks.{i}" for i in range(9)), "out."]
MERGING = "advanced/model_merging"


def _ratio(name: str) -> Float:
    return Float(name, default=1.0, min=0.0, max=1.0, step=0.01)


def _multiplier() -> Float:
    return Float("multiplier", default=1.0, min=-10.0, max=10.0, step=0.01)


def merge_models(node: str, model1: Any, model2: Any, coefficients: Coefficients) -> Any:
    merged = model1.clone()
    try:
        merge_patches(merged.patcher, model2.patcher, coefficients, what="model")
    except MergeError as exc:
        raise ValueError(f"{node}: {exc}") from None
    return merged


def merge_clips(node: str, clip1: Any, clip2: Any, coefficients: Coefficients) -> Any:
    """Each text encoder of clip1 merged with clip2's encoder of the same name (SDXL: l with l, g with g)."""
    merged = clip1.clone()
    common = [name for name in merged.patchers if name in clip2.patchers]
    if not common:
        raise ValueError(f"{node}: the two CLIPs have no text encoder in common ({sorted(clip1.patchers)} and "
                         f"{sorted(clip2.patchers)})")
    for name in common:
        try:
            merge_patches(merged.patchers[name], clip2.patchers[name], coefficients, what=f"text encoder {name}",
                          skip_suffixes=CLIP_SKIPPED_SUFFIXES)
        except MergeError as exc:
            raise ValueError(f"{node}: {exc}") from None
    return merged


class ModelMergeSimple(Node):
    category = MERGING
    inputs = [Socket("model1", MODEL), Socket("model2", MODEL), _ratio("ratio")]
    outputs = [Output(MODEL)]

    def execute(self, model1, model2, ratio):
        return (merge_models(self.node_type, model1, model2, interpolation(ratio)),)


class ModelMergeBlocks(Node):
    """Interpolation with a ratio per block: each UNet weight takes the ratio of the longest input name its key
    starts with ("out" covers output_blocks and out), keys no name covers the first ratio."""

    category = MERGING
    blocks: tuple[str, ...] = ("input", "middle", "out")
    inputs = [Socket("model1", MODEL), Socket("model2", MODEL), *(_ratio(b) for b in ("input", "middle", "out"))]
    outputs = [Output(MODEL)]

    def execute(self, model1, model2, **ratios):
        ordered = {name: float(ratios[name]) for name in self.blocks}
        return (merge_models(self.node_type, model1, model2, block_interpolation(ordered)),)


class ModelMergeSD1(ModelMergeBlocks):
    category = "advanced/model_merging/model_specific"
    blocks = tuple(SD_BLOCKS)
    inputs = [Socket("model1", MODEL), Socket("model2", MODEL), *(_ratio(b) for b in SD_BLOCKS)]


class ModelMergeSD2(ModelMergeSD1):
    pass


class ModelMergeSDXL(ModelMergeSD1):
    blocks = tuple(SDXL_BLOCKS)
    inputs = [Socket("model1", MODEL), Socket("model2", MODEL), *(_ratio(b) for b in SDXL_BLOCKS)]


class ModelMergeSubtract(Node):
    category = MERGING
    inputs = [Socket("model1", MODEL), Socket("model2", MODEL), _multiplier()]
    outputs = [Output(MODEL)]

    def execute(self, model1, model2, multiplier):
        return (merge_models(self.node_type, model1, model2, difference(multiplier)),)


class ModelMergeAdd(Node):
    category = MERGING
    inputs = [Socket("model1", MODEL), Socket("model2", MODEL)]
    outputs = [Output(MODEL)]

    def execute(self, model1, model2):
        return (merge_models(self.node_type, model1, model2, addition()),)


class CLIPMergeSimple(Node):
    category = MERGING
    inputs = [Socket("clip1", CLIP), Socket("clip2", CLIP), _ratio("ratio")]
    outputs = [Output(CLIP)]

    def execute(self, clip1, clip2, ratio):
        return (merge_clips(self.node_type, clip1, clip2, interpolation(ratio)),)


class CLIPMergeSubtract(Node):
    category = MERGING
    inputs = [Socket("clip1", CLIP), Socket("clip2", CLIP), _multiplier()]
    outputs = [Output(CLIP)]

    def execute(self, clip1, clip2, multiplier):
        return (merge_clips(self.node_type, clip1, clip2, difference(multiplier)),)


class CLIPMergeAdd(Node):
    category = MERGING
    inputs = [Socket("clip1", CLIP), Socket("clip2", CLIP)]
    outputs = [Output(CLIP)]

    def execute(self, clip1, clip2):
        return (merge_clips(self.node_type, clip1, clip2, addition()),)


def save_path(context: Any, filename_prefix: str) -> tuple[Path, str]:
    """(the file to write for `filename_prefix`, its name): `<prefix>_<counter>_.safetensors`, the counter one
    past the highest already there."""
    folder, name, _ = output_folder(context.env.output_dir, filename_prefix, "output")
    return folder / f"{name}_{next_counter(folder, name, 'safetensors'):05}_.safetensors", name


def _prediction(model: Any) -> str:
    return "v" if model.model_sampling.prediction == "v_prediction" else "eps"


class _Saver(Node):
    category = MERGING
    output_node = True
    hidden = ("prompt", "extra_pnginfo", "context")
    outputs = []


class CheckpointSave(_Saver):
    display_name = "Save Checkpoint"
    inputs = [Socket("model", MODEL), Socket("clip", CLIP), Socket("vae", VAE),
              String("filename_prefix", default="checkpoints/ComfyUI")]

    def execute(self, model, clip, vae, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        family = model.family
        if clip.text.family != family.text_family:
            raise ValueError(f"CheckpointSave: the CLIP is {clip.text.family}'s but the model is {family.title}; a "
                             f"checkpoint holds one family's text encoders")
        path, name = save_path(context, filename_prefix)
        prediction = _prediction(model)
        counter = path.name[len(name) + 1:].split("_")[0]
        metadata = {**modelspec_metadata(family.name, prediction, f"{name} {int(counter)}"),
                    **latent_metadata(prompt, extra_pnginfo),
                    **config_metadata(family.name, prediction, family.unet, vae.vae.config.norm_groups,
                                      clip_heads(clip.patchers))}
        plan = checkpoint_plan(model.patcher, clip.text.family, clip.patchers, vae.patcher,
                               v_prediction=prediction == "v")
        with model.manager.use([model.patcher, *clip.patchers.values(), vae.patcher]):
            plan.write(path, metadata)
        log.info("saved checkpoint %s", context.env.public_name(path))
        return NodeOutput()


class ModelSave(_Saver):
    display_name = "ModelSave"
    inputs = [Socket("model", MODEL), String("filename_prefix", default="diffusion_models/ComfyUI")]

    def execute(self, model, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        path, _ = save_path(context, filename_prefix)
        family, prediction = model.family, _prediction(model)
        metadata = {**latent_metadata(prompt, extra_pnginfo),
                    **config_metadata(family.name, prediction, family.unet)}
        with model.manager.use([model.patcher]):
            checkpoint_plan(model.patcher, v_prediction=prediction == "v").write(path, metadata)
        return NodeOutput()


class VAESave(_Saver):
    display_name = "VAESave"
    inputs = [Socket("vae", VAE), String("filename_prefix", default="vae/ComfyUI_vae")]

    def execute(self, vae, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        path, _ = save_path(context, filename_prefix)
        metadata = {**latent_metadata(prompt, extra_pnginfo),
                    **config_metadata(vae_norm_groups=vae.vae.config.norm_groups)}
        with vae.manager.use([vae.patcher]):
            vae_plan(vae.patcher).write(path, metadata)
        return NodeOutput()


class CLIPSave(_Saver):
    """One file per text encoder, `<prefix>_clip_<l|h|g>_<counter>_.safetensors`, bare HF layout."""

    display_name = "CLIPSave"
    inputs = [Socket("clip", CLIP), String("filename_prefix", default="clip/ComfyUI")]

    def execute(self, clip, filename_prefix, prompt=None, extra_pnginfo=None, context=None):
        for name, patcher in clip.patchers.items():
            path, _ = save_path(context, f"{filename_prefix}_clip_{name}")
            metadata = {"format": "pt", **latent_metadata(prompt, extra_pnginfo),
                        **config_metadata(text_heads=patcher.model.config.num_attention_heads, text_kind=name)}
            with clip.manager.use([patcher]):
                tensors = {key: value.contiguous() for key, value in bare_text_encoder(patcher).items()}
            save_file(tensors, str(path), metadata=metadata)
        return NodeOutput()


class LoraSave(_Saver):
    display_name = "Extract and Save Lora"
    category = "_for_testing"
    experimental = True
    description = ("Extracts a LoRA from a model (and/or CLIP) holding a difference, e.g. ModelMergeSubtract(tuned, "
                   "base): each layer's best rank-r approximation (SVD), in kohya's key names.")
    inputs = [String("filename_prefix", default="loras/ComfyUI_extracted_lora"),
              Int("rank", default=8, min=1, max=4096, step=1), Combo("lora_type", list(LORA_TYPES)),
              Boolean("bias_diff", default=True), Socket("model_diff", MODEL, optional=True),
              Socket("text_encoder_diff", CLIP, optional=True)]

    @classmethod
    def info(cls, env: Any = None) -> dict[str, Any]:
        """ComfyUI declares this node in its newer (V3) schema, which writes hidden inputs as one-element lists."""
        info = super().info(env)
        info["input"]["hidden"] = {name: [kind] for name, kind in info["input"]["hidden"].items()}
        return info

    def execute(self, filename_prefix, rank, lora_type, bias_diff, model_diff=None, text_encoder_diff=None,
                prompt=None, extra_pnginfo=None, context=None):
        if model_diff is None and text_encoder_diff is None:
            log.warning("LoraSave: neither model_diff nor text_encoder_diff is connected; nothing saved")
            return NodeOutput()
        tensors = {}
        if model_diff is not None:
            params = [n for n, _ in model_diff.patcher.model.named_parameters()]
            names = kohya_unet_names(model_diff.family.unet, params)
            with model_diff.manager.use([model_diff.patcher]):
                tensors.update(extract_layers(model_diff.patcher, names, rank, lora_type, bias_diff))
        if text_encoder_diff is not None:
            for encoder, names in kohya_text_names(text_encoder_diff.text).items():
                patcher = text_encoder_diff.patchers[encoder]
                with text_encoder_diff.manager.use([patcher]):
                    tensors.update(extract_layers(patcher, names, rank, lora_type, bias_diff))
        path, _ = save_path(context, filename_prefix)
        save_file(tensors, str(path))
        log.info("saved LoRA %s (%d tensors)", context.env.public_name(path), len(tensors))
        return NodeOutput()


NODE_CLASSES = [ModelMergeSimple, ModelMergeBlocks, ModelMergeSD1, ModelMergeSD2, ModelMergeSDXL, ModelMergeSubtract,
                ModelMergeAdd, CLIPMergeSimple, CLIPMergeSubtract, CLIPMergeAdd, CheckpointSave, VAESave, CLIPSave,
                ModelSave, LoraSave]
