"""Extracting a LoRA from a weight difference: the best rank-r approximation of each layer's ΔW.

For a layer whose weight difference is ΔW (a MODEL or CLIP whose patches make it a difference, e.g.
ModelMergeSubtract(tuned, base)), flattened to a matrix M [out, in·kh·kw], the singular value decomposition
M = U Σ Vᵀ gives, by the Eckart–Young theorem, the closest rank-r matrix in Frobenius norm as
U_r Σ_r V_rᵀ (the r largest singular values). It is stored as kohya's pair with the singular values split
evenly, up = U_r Σ_r^½ [out, r] and down = Σ_r^½ V_rᵀ [r, in] (reshaped to [out, r, 1, 1] / [r, in, kh, kw]
for convolutions), alpha = r, so that up @ down · alpha / r = U_r Σ_r V_rᵀ; the even split keeps both factors'
magnitudes alike, which fp16 storage likes. At r = rank(M) the difference is reproduced to rounding.
(ComfyUI's extractor also clips the factors at their 99th percentile; we do not, so full rank is exact.)

Weights with fewer than two dimensions (norm scales) have no low-rank form: with `bias_diff` they are stored
whole as `.diff`, and biases as `.diff_b`; `full_diff` stores every weight whole. Layers whose difference is
exactly zero are left out. Keys are kohya's (`lora_unet_<diffusers path>`, `lora_te_…`/`lora_te1_`/`lora_te2_`),
which our LoRA loader, ComfyUI's and A1111's all read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from .patcher import ModelPatcher

log = logging.getLogger(__name__)

Tensor = torch.Tensor
LORA_TYPES = ("standard", "full_diff")
STORED_DTYPE = torch.float16  # as LoRA files (and ComfyUI's extractor) store them


def low_rank_factors(diff: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) with up @ down the best rank-`rank` approximation of `diff` (2-D, or a conv kernel 4-D)."""
    if diff.ndim not in (2, 4):
        raise ValueError(f"a low-rank factorisation needs a 2-D or 4-D weight, got shape {list(diff.shape)}")
    matrix = diff.float().flatten(1)
    rank = max(1, min(rank, *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if diff.ndim == 4:
        up = up.reshape(diff.shape[0], rank, 1, 1)
        down = down.reshape(rank, *diff.shape[1:])
    return up, down


def extract_layers(
    patcher: ModelPatcher,
    kohya_names: Mapping[str, str],
    rank: int,
    lora_type: str = "standard",
    bias_diff: bool = True,
    dtype: torch.dtype = STORED_DTYPE,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """The LoRA tensors for one module whose patched weights are differences. `kohya_names` maps our module
    paths (parameter names without `.weight`/`.bias`) to kohya layer names; parameters of other modules are
    reported and left out."""
    if lora_type not in LORA_TYPES:
        raise ValueError(f"lora_type must be one of {LORA_TYPES}, got {lora_type!r}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    out: dict[str, Tensor] = {}
    params = [name for name, _ in patcher.model.named_parameters()]
    unnamed, zero = [], 0
    for index, key in enumerate(params):
        module, _, kind = key.rpartition(".")
        if progress is not None:
            progress(index + 1, len(params))
        if kind not in ("weight", "bias"):
            continue
        layer = kohya_names.get(module)
        if layer is None:
            unnamed.append(key)
            continue
        diff = patcher.patched_weight(key, "cpu").float()
        if not bool(diff.any()):
            zero += 1
            continue
        if kind == "bias":
            if bias_diff:
                out[f"{layer}.diff_b"] = diff.to(dtype).contiguous()
        elif lora_type == "full_diff" or diff.ndim < 2:
            if lora_type == "full_diff" or bias_diff:
                out[f"{layer}.diff"] = diff.to(dtype).contiguous()
        else:
            up, down = low_rank_factors(diff, rank)
            out[f"{layer}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{layer}.lora_down.weight"] = down.to(dtype).contiguous()
            out[f"{layer}.alpha"] = torch.tensor(float(up.shape[1]))
    if unnamed:
        log.warning("LoRA extraction: %d parameters have no kohya name and are left out (e.g. %s)",
                    len(unnamed), ", ".join(unnamed[:3]))
    log.info("LoRA extraction: %d tensors written, %d parameters unchanged", len(out), zero)
    return out
