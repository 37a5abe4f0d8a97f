"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL base and refiner, inpainting variants).

Module layout and attribute names follow the original LDM/SGM code, so a checkpoint's
`model.diffusion_model.*` tensors (prefix stripped) load with `load_state_dict(sd, strict=True)`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..patches.unet_patches import Site, UNetPatches
from .unet_blocks import (
    Downsample,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    norm_first,
    timestep_embedding,
)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a UNet. `transformer_depth[i]` is the number of transformer blocks after each ResBlock of
    level i (0: no attention there); the output side of a level uses the same depth.

    Heads: exactly one of `num_heads` (fixed head count, SD1) and `num_head_channels` (fixed width per
    head, SD2/SDXL) is positive, the other is -1."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    num_heads: int = 8
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError(
                "UNetConfig: set exactly one of num_heads and num_head_channels (the other to -1), got "
                f"num_heads={self.num_heads}, num_head_channels={self.num_head_channels}"
            )
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"UNetConfig: transformer_depth {self.transformer_depth} needs one entry per level of "
                f"channel_mult {self.channel_mult}"
            )
        if self.transformer_depth_middle < 1:
            raise ValueError("UNetConfig: the middle block needs at least one transformer block")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def head_layout(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer working at `channels` wide."""
        if self.num_heads > 0:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    @classmethod
    def sd1(cls, **overrides) -> UNetConfig:
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def sd2(cls, **overrides) -> UNetConfig:
        base = cls(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def sdxl(cls, **overrides) -> UNetConfig:
        base = cls(
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            context_dim=2048,
            num_heads=-1,
            num_head_channels=64,
            use_linear_in_transformer=True,
            adm_in_channels=2816,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def sdxl_refiner(cls, **overrides) -> UNetConfig:
        base = cls(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(0, 4, 4, 0),
            transformer_depth_middle=4,
            context_dim=1280,
            num_heads=-1,
            num_head_channels=64,
            use_linear_in_transformer=True,
            adm_in_channels=2560,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, Tensor],
        *,
        num_heads: int | None = None,
        num_head_channels: int | None = None,
        norm_groups: int | None = None,
    ) -> UNetConfig:
        """Infers the config from tensor shapes of a UNet state dict without the `model.diffusion_model.`
        prefix. The head layout is not visible in shapes: pass it, else the family default applies
        (context 768: 8 heads as SD1; otherwise 64 channels per head as SD2/SDXL)."""
        weight = _require(sd, "input_blocks.0.0.weight")
        model_channels, in_channels = int(weight.shape[0]), int(weight.shape[1])
        out_channels = int(_require(sd, "out.2.weight").shape[0])
        adm = sd.get("label_emb.0.0.weight")
        levels = _read_levels(sd, model_channels)
        res_counts = {n for _, n, _ in levels}
        if len(res_counts) != 1:
            raise ValueError(f"UNet state dict has a different number of ResBlocks per level: {levels}")
        middle_depth = _count_transformer_blocks(sd, "middle_block.1")
        if middle_depth == 0:
            raise ValueError("UNet state dict has no middle transformer: missing key 'middle_block.1.proj_in.weight'")
        context_dim = int(_require(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight").shape[1])
        linear = _require(sd, "middle_block.1.proj_in.weight").ndim == 2
        if num_heads is None and num_head_channels is None:
            num_heads, num_head_channels = (8, -1) if context_dim == 768 else (-1, 64)
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(m for m, _, _ in levels),
            num_res_blocks=res_counts.pop(),
            transformer_depth=tuple(d for _, _, d in levels),
            transformer_depth_middle=middle_depth,
            context_dim=context_dim,
            num_heads=-1 if num_heads is None else num_heads,
            num_head_channels=-1 if num_head_channels is None else num_head_channels,
            use_linear_in_transformer=linear,
            adm_in_channels=None if adm is None else int(adm.shape[1]),
            norm_groups=32 if norm_groups is None else norm_groups,
        )


def _require(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        hint = ""
        if any(k.startswith("model.diffusion_model.") for k in sd):
            hint = " (strip the 'model.diffusion_model.' prefix first)"
        raise ValueError(f"not a UNet state dict: missing key {key!r}{hint}")
    return sd[key]


def _count_transformer_blocks(sd: dict[str, Tensor], block: str) -> int:
    pattern = re.compile(re.escape(block) + r"\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _read_levels(sd: dict[str, Tensor], model_channels: int) -> list[tuple[int, int, int]]:
    """(channel multiplier, ResBlock count, transformer depth) per level, walking `input_blocks.N`:
    a level ends at a Downsample (`N.0.op`) or at the last input block."""
    levels: list[tuple[int, int, int]] = []
    mult, count, depth = 0, 0, 0
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in sd or f"input_blocks.{i}.0.in_layers.0.weight" not in sd:
            if count == 0:
                break
            levels.append((mult, count, depth))
            mult, count, depth = 0, 0, 0
            if f"input_blocks.{i}.0.op.weight" not in sd:
                break
        else:
            width = int(_require(sd, f"input_blocks.{i}.0.out_layers.3.weight").shape[0])
            if count == 0:
                mult, depth = width // model_channels, _count_transformer_blocks(sd, f"input_blocks.{i}.1")
            count += 1
        i += 1
    if not levels:
        _require(sd, "input_blocks.1.0.in_layers.0.weight")
    return levels


def transformer(c: UNetConfig, channels: int, depth: int) -> SpatialTransformer:
    """The spatial transformer of a block `channels` wide, `depth` layers deep, with the config's head layout."""
    heads, dim_head = c.head_layout(channels)
    return SpatialTransformer(channels, heads, dim_head, depth, c.context_dim, c.norm_groups,
                              c.use_linear_in_transformer)


def time_embedding(c: UNetConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c.model_channels, c.time_embed_dim), nn.SiLU(),
                         nn.Linear(c.time_embed_dim, c.time_embed_dim))


def label_embedding(c: UNetConfig) -> nn.Sequential:
    """SDXL's ADM vector embedding (`label_emb.0.*`: a Sequential in a Sequential, as the checkpoints name it)."""
    ted = c.time_embed_dim
    return nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))


def encoder_blocks(c: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The UNet's input blocks (the input convolution, then per level ResBlocks, each with its transformer where
    the level has one, and a Downsample but at the last level) and the width each block outputs. A ControlNet
    builds the same encoder, so its copy of the UNet's weights loads by name."""
    mc, ted, groups = c.model_channels, c.time_embed_dim, c.norm_groups
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
    widths = [mc]
    ch = mc
    last = len(c.channel_mult) - 1
    for level, (mult, depth) in enumerate(zip(c.channel_mult, c.transformer_depth, strict=True)):
        for _ in range(c.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, groups)]
            ch = mult * mc
            if depth > 0:
                layers.append(transformer(c, ch, depth))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != last:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            widths.append(ch)
    return blocks, widths


def middle_block(c: UNetConfig, channels: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(
        ResBlock(channels, c.time_embed_dim, channels, c.norm_groups),
        transformer(c, channels, c.transformer_depth_middle),
        ResBlock(channels, c.time_embed_dim, channels, c.norm_groups),
    )


class UNetModel(nn.Module):
    """The LDM/SGM UNet: `forward(x, timesteps, context, y)` predicts the model output (eps or v, as trained)
    for latents x [B, C, H, W] at float timesteps [B], text context [B, T, context_dim] and, for SDXL,
    the ADM vector y [B, adm_in_channels]. Creates no buffers, so it can be built on the meta device."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = config
        self.config = c
        mc, ted, groups = c.model_channels, c.time_embed_dim, c.norm_groups
        self.time_embed = time_embedding(c)
        if c.adm_in_channels is not None:
            self.label_emb = label_embedding(c)
        self.input_blocks, skip_channels = encoder_blocks(c)
        ch = skip_channels[-1]
        self.middle_block = middle_block(c, ch)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            mult, depth = c.channel_mult[level], c.transformer_depth[level]
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mult * mc, groups)]
                ch = mult * mc
                if depth > 0:
                    layers.append(transformer(c, ch, depth))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                patches: UNetPatches | None = None, sigmas: Tensor | None = None) -> Tensor:
        """`patches` (model patches of a MODEL clone) hook into the blocks, seeing `sigmas` [B] when given;
        see unet_patches.py."""
        self._check_inputs(x, context, y)
        timesteps, emb, context = self.embed(x, timesteps, context, y)

        if not patches:
            skips = []
            h = x
            for block in self.input_blocks:
                h = block(h, emb, context)
                skips.append(h)
            h = self.middle_block(h, emb, context)
            for block in self.output_blocks:
                h = torch.cat([h, skips.pop()], dim=1)
                size = tuple(skips[-1].shape[-2:]) if skips else None
                h = block(h, emb, context, size)
            return self.out(h)
        return self._patched_forward(x, emb, context, timesteps, patches, sigmas)

    def embed(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(timesteps [B], the time (+ ADM) embedding, the context in x's dtype): what every block is given. Apart
        from forward so that callers running the blocks themselves (DeepCache) embed exactly as it does."""
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        return timesteps, emb, context.to(x.dtype)

    def _patched_forward(self, x: Tensor, emb: Tensor, context: Tensor, timesteps: Tensor,
                         patches: UNetPatches, sigmas: Tensor | None) -> Tensor:
        """The forward above with the patches' hooks at each block (kept apart so the plain path stays plain)."""
        shape = tuple(x.shape)

        def site(kind: str, index: int) -> Site:
            return Site((kind, index), shape, timesteps, sigmas=sigmas)

        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, patches=patches, site=site("input", i))
            h = patches.run_input(h, site("input", i))
            skips.append(h)
            h = patches.run_input(h, site("input", i), after_skip=True)
        h = self.middle_block(h, emb, context, patches=patches, site=site("middle", 0))
        for i, block in enumerate(self.output_blocks):
            h, skip = patches.run_output(h, skips.pop(), site("output", i))
            h = torch.cat([h, skip], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, size, patches=patches, site=site("output", i))
        return norm_first(self.out, h)

    def _check_inputs(self, x: Tensor, context: Tensor, y: Tensor | None) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"UNet input must be [B, {c.in_channels}, H, W], got {list(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"UNet context must be [B, T, {c.context_dim}], got {list(context.shape)}")
        if c.adm_in_channels is None and y is not None:
            raise ValueError("this UNet takes no ADM vector y (adm_in_channels is None)")
        if c.adm_in_channels is not None and (y is None or y.shape[-1] != c.adm_in_channels):
            got = None if y is None else list(y.shape)
            raise ValueError(f"this UNet needs an ADM vector y of shape [B, {c.adm_in_channels}], got {got}")


def _batch_values(value: float | Tensor, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _adm_vector(pooled: Tensor, values: list[float | Tensor], adm_in_channels: int) -> Tensor:
    """pooled text embedding [B, P] followed by one sinusoidal embedding per scalar condition."""
    width, remainder = divmod(adm_in_channels - pooled.shape[-1], len(values))
    if remainder or width <= 0:
        raise ValueError(
            f"ADM width {adm_in_channels} minus pooled width {pooled.shape[-1]} does not split into "
            f"{len(values)} equal embeddings"
        )
    b = pooled.shape[0]
    parts = [timestep_embedding(_batch_values(v, b, pooled.device), width) for v in values]
    return torch.cat([pooled, *(p.to(pooled.dtype) for p in parts)], dim=1)


def sdxl_adm(
    pooled: Tensor,
    width: float | Tensor,
    height: float | Tensor,
    crop_w: float | Tensor = 0.0,
    crop_h: float | Tensor = 0.0,
    target_width: float | Tensor | None = None,
    target_height: float | Tensor | None = None,
    *,
    adm_in_channels: int = 2816,
) -> Tensor:
    """SDXL base ADM vector: pooled CLIP-G embedding, then embeddings of (height, width, crop_h, crop_w,
    target_height, target_width) — diffusers' add_time_ids order (original size, crop top-left, target
    size). Each embedding is (adm_in_channels - pooled width) / 6 wide (256 at real size)."""
    target_width = width if target_width is None else target_width
    target_height = height if target_height is None else target_height
    values = [height, width, crop_h, crop_w, target_height, target_width]
    return _adm_vector(pooled, values, adm_in_channels)


def sdxl_refiner_adm(
    pooled: Tensor,
    width: float | Tensor,
    height: float | Tensor,
    aesthetic_score: float | Tensor = 6.0,
    *,
    crop_w: float | Tensor = 0.0,
    crop_h: float | Tensor = 0.0,
    adm_in_channels: int = 2560,
) -> Tensor:
    """SDXL refiner ADM vector: pooled embedding, then embeddings of (height, width, crop_h, crop_w,
    aesthetic_score); the usual scores are 6.0 for the positive prompt and 2.5 for the negative."""
    values = [height, width, crop_h, crop_w, aesthetic_score]
    return _adm_vector(pooled, values, adm_in_channels)
