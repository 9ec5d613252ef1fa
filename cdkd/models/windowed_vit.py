"""The windowed student ``vit_s_win``: a ViT-S/16 whose blocks mostly attend inside windows, SAM-style.

Same weights layout as timm's ``VisionTransformer`` (no class token): ``patch_embed``, ``pos_embed`` (1, N, C),
``blocks.i.{norm1,attn,norm2,mlp}`` and ``norm`` have timm's names and shapes, so a timm ViT-S checkpoint loads
into it and the two students are interchangeable for UPerNet and distillation. Only where each block attends
differs: blocks listed in ``global_blocks`` attend over every token, the others inside non-overlapping
``window_size`` x ``window_size`` windows of the token grid.

Why it is faster than the global ViT-S (a naive SAM-style block is not, on CPU):

* Tokens are permuted ONCE, after the position embedding, into window-major order (all tokens of window 0, then
  window 1, ...). A windowed block is then a free ``view`` (B * nW, ws * ws, C) of the sequence, and a global
  block attends over the same window-major sequence unchanged: attention without relative positions is
  permutation-equivariant and every other op is per token. Row-major order is restored only for outputs.
* Attention is always the fused ``F.scaled_dot_product_attention`` (the flash kernel on CPU, also with the
  padding mask), never an explicit score matrix.
* No relative-position terms (the absolute embedding carries position) and no per-block pad/partition copies.

At 1024 px (64 x 64 tokens, 16 windows of 256, global blocks 2, 5, 8, 11), batch 1, float32 on 2 CPU cores
(``bench/student_speed.py``): 292 GFLOPs vs 486 for the global ViT-S, and about 0.6x its wall time. The linear
layers (174 GFLOPs, ~half the time) are the same in both; the saving is the attention of the 8 windowed blocks.

A grid that is not a multiple of ``window_size`` (e.g. 400 px -> 25 x 25 tokens) is zero-padded once, at the
start, and every block gets a boolean key mask so padded tokens never influence real ones: a border window
attends only among its real tokens, and global blocks give exactly the unpadded result. A grid side shorter
than the window gets one window of its own length instead of padding (a 224 px tile is a single 14 x 14 window).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from cdkd.errors import CdkdValueError
from cdkd.models.tokengrid import TokenGridBackbone

__all__ = ["WindowedBlock", "WindowedViT", "WindowLayout"]


class WindowedBlock(Block):
    """timm's pre-norm ViT block whose attention runs over ``num_windows`` windows of the sequence.

    LayerNorm, MLP, layer scale and drop path are per token / per sample, so only the attention sees the window
    view; drop path therefore still drops whole samples, not single windows.
    """

    def __init__(self, *args, is_global: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.is_global = is_global
        # The manual (unfused) path of timm's Attention materialises the full score matrix; never take it.
        self.attn.fused_attn = True  # type: ignore[assignment]  # timm's Attention flag, not a submodule

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, num_windows: int = 1, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, L, C) in window-major order, L = num_windows * T; attn_mask broadcastable to the SDPA scores
        of the (B * num_windows, heads, T, T) attention (True = may attend), or None. Returns (B, L, C)."""
        b, length, c = x.shape
        y = self.norm1(x)
        if num_windows > 1:
            y = y.view(b * num_windows, length // num_windows, c)
        y = self.attn(y, attn_mask=attn_mask).view(b, length, c)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class WindowLayout:
    """Geometry of one h x w token grid in window-major order, and the key masks that padding needs.

    Windows are ws x ws, except that a grid side shorter than ws gets one window of that side's length (the same
    partition without padding: a 64 px tile is one 4 x 4 window, not a 16 x 16 one that is mostly padding). The
    grid is padded at the bottom/right to (hp, wp), multiples of the window sides (wh, ww); there are
    nW = nh * nw windows of T = wh * ww tokens. Masks are None when nothing is padded: the fast path, SDPA
    without a mask.
    """

    def __init__(self, grid: tuple[int, int], window: int, device: torch.device) -> None:
        self.h, self.w = grid
        self.wh, self.ww = min(window, self.h), min(window, self.w)
        self.nh, self.nw = math.ceil(self.h / self.wh), math.ceil(self.w / self.ww)
        self.hp, self.wp = self.nh * self.wh, self.nw * self.ww
        self.num_windows = self.nh * self.nw
        self.padded = (self.hp, self.wp) != (self.h, self.w)
        self.window_keys: torch.Tensor | None = None
        self.global_keys: torch.Tensor | None = None
        if self.padded:
            real = torch.zeros(1, self.hp, self.wp, 1, dtype=torch.bool, device=device)
            real[:, : self.h, : self.w] = True
            real = self.to_windows(real)  # (1, nW * T, 1)
            # Padding is less than a window side, so every window keeps its top-left token real: no query is
            # left without a key (which would give NaN rows in SDPA).
            self.window_keys = real.view(self.num_windows, 1, 1, self.wh * self.ww)
            self.global_keys = real.view(1, 1, 1, -1)

    def window_mask(self, batch: int) -> torch.Tensor | None:
        """Key mask (B * nW, 1, 1, T), True = real key, for windowed blocks; None when nothing is padded."""
        if self.window_keys is None:
            return None
        return self.window_keys.repeat(batch, 1, 1, 1)

    def to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) row-major grid -> (B, nW * T, C) window-major sequence, zero-padded if needed."""
        b, c = x.shape[0], x.shape[-1]
        if x.shape[1:3] != (self.hp, self.wp):
            x = F.pad(x, (0, 0, 0, self.wp - x.shape[2], 0, self.hp - x.shape[1]))
        x = x.view(b, self.nh, self.wh, self.nw, self.ww, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, self.hp * self.wp, c)

    to_sequence = to_windows  # the TokenGridBackbone layout hook

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nW * T, C) window-major -> (B, h * w, C) row-major, padding dropped."""
        b, c = x.shape[0], x.shape[-1]
        x = x.view(b, self.nh, self.nw, self.wh, self.ww, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, self.hp, self.wp, c)
        if self.padded:
            x = x[:, : self.h, : self.w]
        return x.reshape(b, self.h * self.w, c)


class WindowedViT(TokenGridBackbone):
    """ViT-S/16 with window attention in most blocks and global attention in ``global_blocks`` (0-based).

    Follows timm's ViT feature contract (``cdkd.models.tokengrid``), plus ``forward_masked`` for SimMIM-style
    masked distillation. Inputs (B, in_chans, H, W) with H and W multiples of ``patch_size``; any such size works
    (the position embedding is resampled).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        window_size: int = 16,
        global_blocks: Sequence[int] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if window_size < 1:
            raise CdkdValueError(f"window_size must be a positive int, got {window_size}")
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise CdkdValueError(f"global_blocks {bad} out of range for depth {depth} (0-based indexes)")
        self._init_grid(img_size, patch_size, in_chans, embed_dim, depth)
        self.window_size = window_size
        self.global_blocks = tuple(sorted(set(global_blocks)))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # timm ViT's norm; timm's Block alone defaults to 1e-5
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            WindowedBlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                is_global=i in self.global_blocks,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """timm ViT init: trunc-normal 0.02 linears with zero bias, pos embed and mask token trunc-normal."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _layout(self, grid: tuple[int, int], device: torch.device) -> WindowLayout:
        return WindowLayout(grid, self.window_size, device)

    def _block_args(self, index: int, block: nn.Module, t: torch.Tensor, layout: WindowLayout) -> tuple:
        if block.is_global:
            return (t, 1, layout.global_keys)
        return (t, layout.num_windows, layout.window_mask(t.shape[0]))
