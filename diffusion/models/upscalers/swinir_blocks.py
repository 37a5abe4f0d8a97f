"""The building blocks of SwinIR (Liang et al. 2021): (shifted-)window self-attention and residual Swin groups.

Attribute names equal the official checkpoint keys below `layers.{i}.`: `residual_group.blocks.{j}.{norm1, attn.qkv,
attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}` and `conv` (or `conv.{0,2,4}` for the
"3conv" residual connection).

Nothing here is a buffer: the relative-position index and the shifted-window masks depend only on the window size,
so they are computed (and cached per device) when needed. That keeps the modules buildable on the meta device and
filled by assignment, and it makes the masks independent of the resolution the network was trained at (the
official code stores an `attn_mask` for the training resolution and recomputes it for any other size).

Shifted windows. After the cyclic shift by `window // 2`, only the windows of the last row and the last column mix
pixels from opposite image borders; the official code masks those pairs with -100 before the softmax. Every window
of the last column shares one mask, every window of the last row another, and the corner window a third, so
`_attend_shifted` runs the interior windows with the position bias alone and the three border groups each with
one small [heads, N, N] mask. That is the same arithmetic as a full [windows, N, N] mask at a fraction of its
memory (a 512² tile at window 8 has 4096 windows).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# What the official implementation adds to the score of a pair of tokens that came from different image regions.
MASKED_SCORE = -100.0


@functools.lru_cache(maxsize=32)
def relative_position_index(window: int, device: str = "cpu") -> Tensor:
    """[N, N] (N = window²) indices into the (2w-1)² bias table: for tokens i = (ri, ci) and j = (rj, cj) in a
    window (row-major), (ri - rj + w - 1) * (2w - 1) + (ci - cj + w - 1)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dr = rows[:, None] - rows[None, :] + window - 1
    dc = cols[:, None] - cols[None, :] + window - 1
    return (dr * (2 * window - 1) + dc).to(device)


@functools.lru_cache(maxsize=32)
def border_masks(window: int, shift: int, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """The additive masks [N, N] of the shifted windows that straddle a border: (last column, last row, corner).

    After the roll, a window of the last column holds columns [0, window - shift) from the image's right part and
    [window - shift, window) wrapped round from its left edge (likewise rows for the last row); tokens of different
    parts must not attend to each other. All other windows need no mask."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    right = (cols.flatten() >= window - shift).long()
    below = (rows.flatten() >= window - shift).long()

    def mask(label: Tensor) -> Tensor:
        differ = label[:, None] != label[None, :]
        return torch.where(differ, MASKED_SCORE, 0.0).to(device)

    return mask(right), mask(below), mask(below * 2 + right)


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B, H/w, W/w, w*w, C] (H and W multiples of the window)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h // window, w // window, window * window, c)


def window_merge(windows: Tensor, window: int) -> Tensor:
    """Inverse of `window_partition`: [B, nH, nW, w*w, C] -> [B, nH*w, nW*w, C]."""
    b, nh, nw, _, c = windows.shape
    x = windows.view(b, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * window, nw * window, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per relative offset and head."""

    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.window, self.heads = dim, window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> Tensor:
        """[heads, N, N]: the table looked up by relative offset."""
        index = relative_position_index(self.window, str(self.relative_position_bias_table.device))
        n = self.window * self.window
        return self.relative_position_bias_table[index.view(-1)].view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, tokens: Tensor, bias: Tensor) -> Tensor:
        """tokens [..., N, C] (any leading window dims); bias [heads, N, N] added to the scaled scores."""
        lead, (n, c) = tokens.shape[:-2], tokens.shape[-2:]
        flat = tokens.reshape(-1, n, c)
        qkv = self.qkv(flat).view(flat.shape[0], n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0))
        out = out.transpose(1, 2).reshape(flat.shape[0], n, c)
        return self.proj(out).view(*lead, n, c)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm transformer block over windows; every odd block of a group shifts the windows by half a window."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, H*W, C] tokens of an image whose H and W are multiples of the window."""
        h, w = size
        b, _, c = x.shape
        image = self.norm1(x).view(b, h, w, c)
        if self.shift:
            image = torch.roll(image, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(image, self.window)
        bias = self.attn.position_bias()
        attended = self._attend_shifted(windows, bias) if self.shift else self.attn(windows, bias)
        image = window_merge(attended, self.window)
        if self.shift:
            image = torch.roll(image, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + image.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))

    def _attend_shifted(self, windows: Tensor, bias: Tensor) -> Tensor:
        """Attention over [B, nH, nW, N, C] shifted windows, the border groups with their region masks."""
        col_mask, row_mask, corner_mask = border_masks(self.window, self.shift, str(windows.device))
        out = torch.empty_like(windows)
        if windows.shape[1] > 1 and windows.shape[2] > 1:
            out[:, :-1, :-1] = self.attn(windows[:, :-1, :-1], bias)
        if windows.shape[1] > 1:
            out[:, :-1, -1] = self.attn(windows[:, :-1, -1], bias + col_mask)
        if windows.shape[2] > 1:
            out[:, -1, :-1] = self.attn(windows[:, -1, :-1], bias + row_mask)
        out[:, -1, -1] = self.attn(windows[:, -1, -1], bias + corner_mask)
        return out


class ResidualGroup(nn.Module):
    """`residual_group` of the official RSTB: the blocks of one layer, alternating plain and shifted windows."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_hidden, qkv_bias)
            for i in range(depth)
        )

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, size)
        return x


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The convolution closing a residual group (and the body): one 3×3 conv ("1conv"), or the parameter-saving
    3×3 → 1×1 → 3×3 bottleneck through dim/4 channels with LeakyReLU(0.2) ("3conv", the large real-world model)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":
        quarter = dim // 4
        return nn.Sequential(
            nn.Conv2d(dim, quarter, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(quarter, quarter, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(quarter, dim, 3, 1, 1),
        )
    raise ValueError(f"unknown SwinIR residual connection {kind!r} (expected '1conv' or '3conv')")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: a group of Swin blocks, a convolution on the image form, a skip."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_hidden: int, qkv_bias: bool,
                 resi_connection: str):
        super().__init__()
        self.residual_group = ResidualGroup(dim, depth, heads, window, mlp_hidden, qkv_bias)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, size).transpose(1, 2).reshape(b, c, *size)
        return self.conv(y).flatten(2).transpose(1, 2) + x
