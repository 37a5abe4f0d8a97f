"""ComfyUI's `model_options` (what node packs set on a MODEL) run by our UNet hooks and guider.

A ComfyUI pack patches a model by writing functions into a dict, directly or through ModelPatcher's
`set_model_*` methods (comfy_model.py). The dict's shape, as packs rely on it:

    {"transformer_options": {"patches": {name: [fn, ...]},   # attn1_patch, attn2_patch, attn1_output_patch,
                                                              # attn2_output_patch, middle_patch,
                                                              # input_block_patch(_after_skip), output_block_patch
                             "patches_replace": {"attn1"|"attn2": {(block, number[, transformer index]): fn}},
                             ...any key a pack stores for its own patches to read},
     "model_function_wrapper": fn, "sampler_cfg_function": fn, "sampler_pre_cfg_function": [fn, ...],
     "sampler_post_cfg_function": [fn, ...], "disable_cfg1_optimization": bool}

Nothing is translated when a pack sets an entry: the dict is read at every UNet call and guided step, so a pack that
edits it in place is honoured as well as one that calls the setters. The calling conventions (what each function
receives and returns), from ComfyUI's public node-pack documentation and the packs that use them:

- attn1_patch / attn2_patch: `fn(n, context, value, extra_options) -> (n, context, value)` on the normed tokens the
  queries come from and what keys and values come from (for attn1 all three start as n; for attn2 context and value
  start as the text context), before the attention projects them.
- attn1 / attn2 replace: `fn(q, k, v, extra_options) -> out`: q, k, v after to_q/to_k/to_v ([B, tokens, heads *
  dim_head]); `out` in the same layout goes through to_out. Looked up by (block, number, transformer index) first,
  then (block, number); `block` is "input" | "middle" | "output" and `number` the block's index in its list.
- attn1_output_patch / attn2_output_patch: `fn(out, extra_options) -> out` on the attention's output before its
  residual is added; middle_patch: `fn(x, extra_options) -> x` after the self-attention's residual.
- input_block_patch(_after_skip): `fn(h, transformer_options) -> h`; output_block_patch: `fn(h, hsp,
  transformer_options) -> (h, hsp)` (hsp: the skip features).
- extra_options / transformer_options: the pack's own keys plus "block" (kind, index), "block_index" (the
  transformer block inside its SpatialTransformer), "original_shape" (the UNet input's shape), "n_heads",
  "dim_head", "sigmas" [B], "cond_or_uncond" (0 positive / 1 negative per equal chunk of the batch),
  "activations_shape"; "patches" and "patches_replace" only in the block patches' dict.
- model_function_wrapper: `fn(apply_model, {"input": x, "timestep": sigma, "c": {"c_crossattn": context,
  "y"?, "transformer_options": ..., ...}, "cond_or_uncond": [...]}) -> denoised`; `apply_model(x, sigma, **c)`
  returns the model's denoised estimate (ComfyUI's "timestep" here is the sigma).
- sampler_cfg_function: `fn(args) -> x - denoised` with args "cond"/"uncond" = x minus the positive/negative
  denoised estimates (ComfyUI's sign convention), "cond_denoised", "uncond_denoised", "cond_scale", "input" (x),
  "sigma" and "timestep" (both the sigma [B]), "model", "model_options", "input_cond"/"input_uncond" (the lists).
- sampler_pre_cfg_function: `fn(args) -> [cond_denoised, uncond_denoised]` with "conds" (the two conditioning
  lists), "conds_out" (the two estimates), "cond_scale", "timestep", "input", "sigma", "model", "model_options".
- sampler_post_cfg_function: `fn(args) -> denoised` with "denoised" (the combination so far), "cond"/"uncond"
  (the conditioning lists), "cond_denoised", "uncond_denoised", "cond_scale", "sigma", "input", "model",
  "model_options".

Where we differ: the UNet runs our own hooks (FreeU, ToMe, ...) before a pack's; an attn1/attn2 patch that returns a
value different from its context runs the attention directly (our own `attention_kv` hooks, hypernetworks, are not
applied to that call); with cfg 1 and no disable_cfg1_optimization the negative is not evaluated and the cfg
function is not called (ComfyUI calls it with a zero negative); "transformer_index" is not set. A batched call puts
the negative's rows first (ComfyUI's order, which packs such as NAG assume) only for a MODEL carrying model_options;
our own patches read the rows' roles (`uncond_rows`) and take any order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sampling.guidance import CFGGuider, GuidanceHooks, GuidanceStep
from .unet_patches import Attend, Site, UNetPatches, cond_or_uncond

PATCH_NAMES = ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch", "middle_patch",
               "input_block_patch", "input_block_patch_after_skip", "output_block_patch")
REPLACE_NAMES = ("attn1", "attn2")


def clone_options(options: dict[str, Any]) -> dict[str, Any]:
    """A clone's model_options, deep-copied as ComfyUI's clone does: packs rely on it (a patch object the clone's
    pack updates in place, IPAdapter's attn2 replacement for one, must not change the original's). Functions are
    shared (deepcopy keeps them); our MODEL and CLIP handles and the BaseModel view are never copied (their
    `__deepcopy__`: a copy would duplicate the UNet)."""
    return copy.deepcopy(options)


def copy_options(options: dict[str, Any]) -> dict[str, Any]:
    """model_options with every dict and list copied and the leaves shared: what ComfyUI's set_model_options_*
    functions return (a per-call variant, e.g. PAG's, that must not copy every patch object at each step)."""
    if isinstance(options, dict):
        return {key: copy_options(value) for key, value in options.items()}
    if isinstance(options, list):
        return [copy_options(value) for value in options]
    return options


def _patches(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(patches, patches_replace, the other keys) of a transformer_options dict."""
    options = options or {}
    extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
    return options.get("patches") or {}, options.get("patches_replace") or {}, extra


def _check_names(patches: dict[str, Any], replace: dict[str, Any]) -> None:
    for name in patches:
        if name not in PATCH_NAMES and patches[name]:
            raise ValueError(f"MODEL transformer_options patch {name!r} is not supported by Latent Loom's UNet "
                             f"(supported: {', '.join(PATCH_NAMES)})")
    for name in replace:
        if name not in REPLACE_NAMES and replace[name]:
            raise ValueError(f"MODEL transformer_options patches_replace {name!r} is not supported by Latent Loom's "
                             f"UNet (supported: {', '.join(REPLACE_NAMES)})")


def transformer_patches(options: dict[str, Any] | None) -> UNetPatches | None:
    """Our UNet hooks running a transformer_options dict's patches; None when it has none."""
    patches, replace, extra = _patches(options)
    _check_names(patches, replace)
    if not any(patches.values()) and not any(replace.values()):
        return None

    def block_options(site: Site, h: Tensor) -> dict[str, Any]:
        info = {**extra, "block": site.block, "original_shape": list(site.latent_shape), "sigmas": site.sigmas,
                "cond_or_uncond": cond_or_uncond() or [0], "activations_shape": list(h.shape)}
        return {**info, "patches": patches, "patches_replace": replace}

    def attention_options(site: Site, tokens: Tensor) -> dict[str, Any]:
        attention = site.attention
        heads = int(getattr(attention, "heads", 1))
        inner = attention.to_q.out_features if attention is not None else tokens.shape[-1]
        return {**extra, "block": site.block, "block_index": site.transformer,
                "original_shape": list(site.latent_shape), "sigmas": site.sigmas,
                "cond_or_uncond": cond_or_uncond() or [0], "n_heads": heads,
                "dim_head": inner // heads, "attn_precision": None,
                "activations_shape": [tokens.shape[0], tokens.shape[-1], *site.size]}

    hooks: dict[str, Any] = {}
    if any(patches.get(n) for n in ("attn1_patch", "attn1_output_patch")) or replace.get("attn1"):
        hooks["self_attention"] = (_attention_wrapper(patches.get("attn1_patch") or [], replace.get("attn1") or {},
                                                      patches.get("attn1_output_patch") or [], attention_options,
                                                      self_attention=True),)
    if any(patches.get(n) for n in ("attn2_patch", "attn2_output_patch")) or replace.get("attn2"):
        hooks["cross_attention"] = (_attention_wrapper(patches.get("attn2_patch") or [], replace.get("attn2") or {},
                                                       patches.get("attn2_output_patch") or [], attention_options,
                                                       self_attention=False),)
    if patches.get("middle_patch"):
        middle = list(patches["middle_patch"])

        def after_self_attention(x: Tensor, site: Site) -> Tensor:
            options = attention_options(site, x)
            for fn in middle:
                x = fn(x, options)
            return x

        hooks["after_self_attention"] = (after_self_attention,)
    for name, field in (("input_block_patch", "input_block"),
                        ("input_block_patch_after_skip", "input_block_after_skip")):
        if patches.get(name):
            hooks[field] = tuple(_block_hook(fn, block_options) for fn in patches[name])
    if patches.get("output_block_patch"):
        hooks["output_block"] = tuple(_output_hook(fn, block_options) for fn in patches["output_block_patch"])
    return UNetPatches(**hooks)


def _block_hook(fn: Callable[..., Tensor], block_options: Callable[[Site, Tensor], dict]) -> Callable:
    def hook(h: Tensor, site: Site) -> Tensor:
        return fn(h, block_options(site, h))
    return hook


def _output_hook(fn: Callable[..., tuple[Tensor, Tensor]], block_options: Callable[[Site, Tensor], dict]) -> Callable:
    def hook(h: Tensor, skip: Tensor, site: Site) -> tuple[Tensor, Tensor]:
        h, skip = fn(h, skip, block_options(site, h))
        return h, skip
    return hook


def _replacement(replace: dict[Any, Callable], site: Site) -> Callable | None:
    """The replace function of this transformer block: keyed (block, number, transformer index), else (block,
    number)."""
    if not replace:
        return None
    kind, number = site.block
    return replace.get((kind, number, site.transformer), replace.get((kind, number)))


def _attention_wrapper(patches: list[Callable], replace: dict[Any, Callable], output_patches: list[Callable],
                       attention_options: Callable[[Site, Tensor], dict], self_attention: bool) -> Callable:
    """An attention wrapper (unet_patches.py) running ComfyUI's patches of one attention: the input patches, the
    replacement (or the attention itself) and the output patches, in that order."""

    def wrapper(x: Tensor, kv: Tensor | None, inner: Attend, site: Site) -> Tensor:
        options = attention_options(site, x)
        n, context, value = x, kv, None
        if patches:
            context = (n if context is None else context)
            value = context
            for fn in patches:
                n, context, value = fn(n, context, value, options)
        replaced = _replacement(replace, site)
        attention = site.attention
        if replaced is not None and attention is not None:
            context = n if context is None else context
            value = context if value is None else value
            out = replaced(attention.to_q(n), attention.to_k(context), attention.to_v(value), options)
            out = attention.to_out(out)
        elif value is not None and value is not context and attention is not None:
            out = attention(n, context, value)
        else:
            unchanged = self_attention and (context is None or context is x)
            out = inner(n, None if unchanged else context)
        for fn in output_patches:
            out = fn(out, options)
        return out

    return wrapper


# --- the guider: cfg, pre-cfg and post-cfg functions ------------------------------------------------------------


def guidance_hooks(options: dict[str, Any], model: Any) -> GuidanceHooks | None:
    """Guidance hooks running model_options' sampler functions; `model` is what they get as args["model"] (the
    BaseModel view, comfy_model.py). None for empty options; any options put the negative's rows first in
    batched calls, the order packs read `cond_or_uncond` in ([1, ..., 0, ...] in ComfyUI)."""
    cfg_fn = options.get("sampler_cfg_function")
    pre = list(options.get("sampler_pre_cfg_function") or [])
    post = list(options.get("sampler_post_cfg_function") or [])
    no_cfg1 = bool(options.get("disable_cfg1_optimization", False))
    if not options:
        return None

    def bound(step: GuidanceStep) -> Any:
        """args["model"]: the view knowing the guider of this step, for comfy.samplers.calc_cond_batch."""
        return model.with_guider(step.guider) if hasattr(model, "with_guider") else model

    def lists(step: GuidanceStep) -> tuple[Any, Any]:
        guider = step.guider
        return getattr(guider, "positive", None), getattr(guider, "negative", None)

    def combine(step: GuidanceStep) -> Tensor:
        positive, negative = lists(step)
        args = {"cond": step.x - step.cond, "uncond": step.x - step.uncond, "cond_scale": step.cond_scale,
                "timestep": step.sigma, "input": step.x, "sigma": step.sigma, "cond_denoised": step.cond,
                "uncond_denoised": step.uncond, "model": bound(step), "model_options": options,
                "input_cond": positive, "input_uncond": negative}
        return step.x - cfg_fn(args)

    def pre_hook(fn: Callable) -> Callable[[GuidanceStep], tuple[Tensor, Tensor]]:
        def run(step: GuidanceStep) -> tuple[Tensor, Tensor]:
            args = {"conds": list(lists(step)), "conds_out": [step.cond, step.uncond], "cond_scale": step.cond_scale,
                    "timestep": step.sigma, "input": step.x, "sigma": step.sigma, "model": bound(step),
                    "model_options": options}
            out = fn(args)
            return out[0], out[1]
        return run

    def post_hook(fn: Callable) -> Callable[[GuidanceStep], Tensor]:
        def run(step: GuidanceStep) -> Tensor:
            positive, negative = lists(step)
            args = {"denoised": step.denoised, "cond": positive, "uncond": negative, "cond_scale": step.cond_scale,
                    "model": bound(step), "uncond_denoised": step.uncond, "cond_denoised": step.cond,
                    "sigma": step.sigma, "model_options": options, "input": step.x}
            return fn(args)
        return run

    return GuidanceHooks(combine=combine if cfg_fn is not None else None, post=[post_hook(fn) for fn in post],
                         pre=[pre_hook(fn) for fn in pre], uncond_at_cfg1=no_cfg1, negative_first=True)


# --- the model function wrapper ---------------------------------------------------------------------------------

C_KEYS = {"c_crossattn": "context", "y": "y", "transformer_options": "transformer_options"}


class FunctionWrapped:
    """A denoiser `D(x, sigma, context=..., **cond)` whose calls go through a pack's model_function_wrapper."""

    def __init__(self, denoiser: Callable[..., Tensor], wrapper: Callable[..., Tensor],
                 transformer_options: dict[str, Any]) -> None:
        self.denoiser = denoiser
        self.wrapper = wrapper
        self.transformer_options = transformer_options
        self.model_sampling = getattr(denoiser, "model_sampling", None)

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        chunks = cond_or_uncond() or [0]
        c = {"c_crossattn": cond.pop("context", None)}
        y = cond.pop("y", None)
        if y is not None:
            c["y"] = y
        given = cond.pop("transformer_options", None)
        c["transformer_options"] = {**(self.transformer_options if given is None else given),
                                    "cond_or_uncond": chunks, "sigmas": sigma}
        c.update(cond)  # our own per-call keys (unet_patches, control) pass through the pack's hands unchanged
        return self.wrapper(self.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": chunks})

    def apply_model(self, x: Tensor, t: Tensor, **c: Any) -> Tensor:
        """ComfyUI's BaseModel.apply_model as the wrapper calls it: the denoised estimate at sigma `t`."""
        cond = {C_KEYS.get(key, key): value for key, value in c.items() if key not in ("c_concat",)}
        return self.denoiser(x, t, **cond)



def evaluate_conds(guider: Any, conds: list[Any], x: Tensor, sigma: Tensor,
                   transformer_options: dict[str, Any] | None = None) -> list[Tensor]:
    """ComfyUI's calc_cond_batch on our guider: the denoised estimate of each conditioning list in `conds` (None:
    zeros, as ComfyUI), batched where shapes allow, the UNet running `transformer_options` (a pack's per-call
    patches) instead of the model's when given. The guider's negative list keeps its role (cond_or_uncond 1)."""
    for cond in conds:
        if cond is not None and not all(isinstance(e, list | tuple) and len(e) == 2 and isinstance(e[0], Tensor)
                                        and isinstance(e[1], dict) for e in cond):
            raise ValueError("calc_cond_batch: Latent Loom evaluates the conditioning lists a cfg function receives "
                             "(args['cond'], args['conds']); this one is not such a list")
    base = guider.denoiser
    if transformer_options is None:
        denoiser = base
    else:
        def denoiser(x_in: Tensor, sigma_in: Tensor, **cond: Any) -> Tensor:
            return base(x_in, sigma_in, **{**cond, "transformer_options": transformer_options})
    evaluator = CFGGuider(denoiser, guider.model_sampling, guider.positive, guider.negative, guider.cfg,
                          extra_cond=guider.extra_cond, hooks=GuidanceHooks(negative_first=True))
    given = [c for c in conds if c is not None]
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    outputs = iter(evaluator._predict(given, x, sigma) if given else [])
    return [next(outputs) if c is not None else torch.zeros_like(x) for c in conds]
