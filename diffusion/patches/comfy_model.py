"""What ComfyUI node packs call on a MODEL (ComfyUI's ModelPatcher names), on our DiffusionModel handle, and the
CLIP methods our ClipModel lacks by ComfyUI's names (`add_patches`).

The setters write the handle's `model_options` exactly where ComfyUI's write theirs (comfy_options.py lists the
keys and calling conventions), and the UNet and the guider read that dict at run time, so a pack that writes the
dict itself works too. They change the handle in place, as ComfyUI's do: packs call them on a clone. `model` is a
view shaped like ComfyUI's BaseModel (`model.model.model_sampling`, `.diffusion_model`, `.latent_format`,
`.model_type`, `.model_config`), which packs read and which cfg functions get as args["model"].
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..sampling.model_sampling import ModelSampling
from .patcher import WeightDiff


class BaseModelView:
    """ComfyUI's BaseModel as packs read it, over a MODEL handle (live: an object patch shows)."""

    def __init__(self, handle: Any, guider: Any = None) -> None:
        self._handle = handle
        self.guider = guider  # set in the args of cfg functions: what comfy.samplers.calc_cond_batch evaluates with

    def with_guider(self, guider: Any) -> BaseModelView:
        return BaseModelView(self._handle, guider)

    def __deepcopy__(self, memo: dict[int, Any]) -> BaseModelView:
        return self  # a view of a shared model: model_options copies keep it (comfy_options.clone_options)

    @property
    def model_sampling(self) -> ModelSampling:
        return self._handle.model_sampling

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return self._handle.patcher.model

    @property
    def family_name(self) -> str:
        """Our family name (sd1, sd2, sdxl, sdxl_refiner, ...): what comfy.model_base's isinstance checks read."""
        return self._handle.family.name

    @property
    def model_type(self) -> str:
        """ComfyUI's ModelType member name: EPS, V_PREDICTION or V_PREDICTION_EDM (continuous-time v)."""
        family = self._handle.family
        if family.continuous is not None:
            return "V_PREDICTION_EDM"
        return "V_PREDICTION" if family.prediction == "v" else "EPS"

    @property
    def latent_format(self) -> SimpleNamespace:
        family = self._handle.family
        return SimpleNamespace(scale_factor=family.scaling_factor, latent_channels=family.latent_channels)

    @property
    def model_config(self) -> SimpleNamespace:
        unet = self._handle.family.unet
        config = dataclasses.asdict(unet) if dataclasses.is_dataclass(unet) else dict(vars(unet))
        return SimpleNamespace(unet_config=config, latent_format=self.latent_format,
                               sampling_settings={"prediction": self._handle.family.prediction})

    @property
    def device(self) -> torch.device:
        return self._handle.manager.device

    def get_dtype(self) -> torch.dtype:
        return self._handle.dtype

    @property
    def manual_cast_dtype(self) -> torch.dtype | None:
        """ComfyUI's dtype for computing with weights stored in another one: None, ours compute in their own."""
        return None

    def __repr__(self) -> str:
        return f"BaseModelView({self._handle.family.title})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"MODEL.model (ComfyUI's BaseModel) has no {name!r} in Latent Loom (offered: "
                             f"model_sampling, diffusion_model, latent_format, model_type, model_config, get_dtype, "
                             f"manual_cast_dtype, device)")


class ComfyModelMethods:
    """ComfyUI's ModelPatcher methods; mixed into DiffusionModel, which has `model_options`, `patcher`,
    `model_sampling`, `family`, `manager` and `dtype`."""

    model_options: dict[str, Any]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self  # a handle stored in model_options stays the same handle when a clone copies them

    @property
    def model(self) -> BaseModelView:
        return BaseModelView(self)

    @property
    def load_device(self) -> torch.device:
        return self.manager.device

    @property
    def offload_device(self) -> torch.device:
        return self.patcher.offload_device

    def model_dtype(self) -> torch.dtype:
        return self.dtype

    def is_clone(self, other: Any) -> bool:
        """Whether `other` is a clone of this MODEL (the same UNet module)."""
        return getattr(getattr(other, "patcher", None), "model", None) is self.patcher.model

    # --- guidance -----------------------------------------------------------------------------------------------

    def set_model_sampler_cfg_function(self, fn: Any, disable_cfg1_optimization: bool = False) -> None:
        """`fn(args) -> x - denoised`; see comfy_options.py for its args."""
        self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn: Any, disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []),
                                                           fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_pre_cfg_function(self, fn: Any, disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_pre_cfg_function"] = [*self.model_options.get("sampler_pre_cfg_function", []),
                                                          fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, fn: Any) -> None:
        """`fn(apply_model, args) -> denoised` runs instead of each model call (one wrapper; a later one replaces
        it, as in ComfyUI)."""
        self.model_options["model_function_wrapper"] = fn

    def set_model_denoise_mask_function(self, fn: Any) -> None:
        """`fn(sigma, denoise_mask, extra_options) -> mask`: each step's inpainting mask (Differential Diffusion's
        kind). extra_options has "sigmas" (the run's schedule) and "model", whose `inner_model` is the BaseModel
        view (ComfyUI passes its sampling wrapper there). Set through this method only: it becomes the handle's
        `denoise_mask_fn`, which the KSampler flow calls."""
        self.model_options["denoise_mask_function"] = fn
        view = self.model

        def denoise_mask(sigma: Tensor, mask: Tensor, sigmas: Tensor, model_sampling: ModelSampling) -> Tensor:
            wrapper = SimpleNamespace(inner_model=view, model_sampling=model_sampling)
            return fn(sigma, mask, extra_options={"model": wrapper, "sigmas": sigmas})

        self.denoise_mask_fn = denoise_mask

    # --- UNet patches -------------------------------------------------------------------------------------------

    def _transformer_options(self) -> dict[str, Any]:
        return self.model_options.setdefault("transformer_options", {})

    def set_model_patch(self, patch: Any, name: str) -> None:
        patches = self._transformer_options().setdefault("patches", {})
        patches[name] = [*patches.get(name, []), patch]

    def set_model_patch_replace(self, patch: Any, name: str, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        table = self._transformer_options().setdefault("patches_replace", {}).setdefault(name, {})
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        table[key] = patch

    def set_model_attn1_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_replace(self, patch: Any, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch: Any, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "attn2_output_patch")

    def set_model_input_block_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch: Any) -> None:
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "output_block_patch")

    # --- objects and weights ------------------------------------------------------------------------------------

    def add_object_patch(self, name: str, obj: Any) -> None:
        """Replace one of the model's objects on this handle only. Offered: "model_sampling" with one of our own
        model samplings (what get_model_object gives; ComfyUI's classes are not ours)."""
        if name == "model_sampling":
            if not isinstance(obj, ModelSampling):
                raise ValueError(f"add_object_patch('model_sampling', {type(obj).__name__}): Latent Loom takes only "
                                 f"its own model sampling objects (get_model_object('model_sampling'), or the "
                                 f"ModelSamplingDiscrete node)")
            self.model_sampling = obj
            return
        raise ValueError(f"add_object_patch({name!r}): Latent Loom patches only 'model_sampling' this way")

    def get_model_object(self, name: str) -> Any:
        """`model_sampling`, `diffusion_model` or a submodule of it by dotted name (ComfyUI's names)."""
        if name == "model_sampling":
            return self.model_sampling
        if name == "diffusion_model" or name.startswith("diffusion_model."):
            return self.patcher.model.get_submodule(name.removeprefix("diffusion_model").lstrip("."))
        raise AttributeError(f"MODEL has no object {name!r} (offered: model_sampling, diffusion_model[.<name>])")

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """Weight differences keyed `diffusion_model.<checkpoint key>` (a tensor, `(tensor,)` or
        `("diff", (tensor,))`, ComfyUI's forms); returns the keys this UNet has. Other patch kinds are refused by
        name (LoRA files go through LoraLoader)."""
        if strength_model != 1.0:
            raise ValueError(f"add_patches: strength_model={strength_model} (scaling the model's own weights) is "
                             "not supported")
        diffs = {key.removeprefix("diffusion_model."): WeightDiff(weight_diff(key, value))
                 for key, value in patches.items()}
        applied = self.patcher.add_patches(diffs, strength_patch)
        return [f"diffusion_model.{key}" for key in applied]


class ComfyClipMethods:
    """ComfyUI's CLIP methods that ClipModel lacks by its own names; mixed into ClipModel, which has `patchers`
    (encoder name -> ModelPatcher)."""

    patchers: dict[str, Any]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self  # as MODEL handles: never duplicated by a copy of model_options

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """ComfyUI's CLIP.add_patches: weight differences keyed `clip_<encoder>.transformer.<parameter>` (ComfyUI's
        names; `clip_l.` / `clip_g.` then the transformers CLIP parameter name) in the forms MODEL.add_patches
        takes, at `strength_patch`; returns the keys applied. Call it on a clone: it changes this handle."""
        if strength_model != 1.0:
            raise ValueError(f"CLIP add_patches: strength_model={strength_model} (scaling the encoder's own weights) "
                             "is not supported")
        by_encoder: dict[str, dict[str, WeightDiff]] = {}
        names: dict[tuple[str, str], str] = {}
        params = {name: {p for p, _ in patcher.model.named_parameters()} for name, patcher in self.patchers.items()}
        for key, value in patches.items():
            prefix, _, rest = key.partition(".")
            name = prefix.removeprefix("clip_")
            if not prefix.startswith("clip_") or name not in self.patchers:
                continue
            param = rest.removeprefix("transformer.")
            if param not in params[name]:  # our encoder may be the text transformer itself, without `text_model.`
                param = param.removeprefix("text_model.")
            by_encoder.setdefault(name, {})[param] = WeightDiff(weight_diff(key, value))
            names[(name, param)] = key
        applied = []
        for name, diffs in by_encoder.items():
            applied += [names[(name, param)] for param in self.patchers[name].add_patches(diffs, strength_patch)]
        return sorted(applied)


def weight_diff(key: str, value: Any) -> Tensor:
    """The tensor of one add_patches entry in ComfyUI's forms (a tensor, `(tensor,)`, `("diff", (tensor,))`)."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "diff":
        value = value[1]
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if not isinstance(value, Tensor):
        kind = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else "unknown"
        raise ValueError(f"add_patches: patch {key!r} of kind {kind!r} is not supported (only weight diffs)")
    return value
