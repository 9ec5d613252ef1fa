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
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from cdkd.errors import CdkdValueError

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
        self.attn.fused_attn = True

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

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nW * T, C) window-major -> (B, h * w, C) row-major, padding dropped."""
        b, c = x.shape[0], x.shape[-1]
        x = x.view(b, self.nh, self.nw, self.wh, self.ww, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, self.hp, self.wp, c)
        if self.padded:
            x = x[:, : self.h, : self.w]
        return x.reshape(b, self.h * self.w, c)


class WindowedViT(nn.Module):
    """ViT-S/16 with window attention in most blocks and global attention in ``global_blocks`` (0-based).

    Follows timm's ViT feature contract: ``forward_features``, ``forward_head``, ``forward_intermediates``,
    plus ``forward_masked`` for SimMIM-style masked distillation. Inputs (B, in_chans, H, W) with H and W
    multiples of ``patch_size``; any such size works (the position embedding is resampled).
    """

    encodes_visible_only = False  # masked patches are kept (as mask tokens), never dropped as in MAE
    num_prefix_tokens = 0

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
        if img_size % patch_size:
            raise CdkdValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if in_chans < 1:
            raise CdkdValueError(f"in_chans must be a positive int, got {in_chans}")
        if window_size < 1:
            raise CdkdValueError(f"window_size must be a positive int, got {window_size}")
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise CdkdValueError(f"global_blocks {bad} out of range for depth {depth} (0-based indexes)")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.depth = depth
        self.window_size = window_size
        self.global_blocks = tuple(sorted(set(global_blocks)))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        self.base_grid: tuple[int, int] = tuple(self.patch_embed.grid_size)  # type: ignore[assignment]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_grid[0] * self.base_grid[1], embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
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
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": patch_size} for i in range(depth)
        ]
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

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in backward (training at 1024 px on small GPUs)."""
        self.grad_checkpointing = enable

    # --- embedding and layout -------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, WindowLayout]:
        """x (B, C, H, W), mask (B, N) bool or None -> (B, L, C) window-major tokens and their layout."""
        if x.ndim != 4:
            raise CdkdValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise CdkdValueError(
                f"input size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"crop or pad the image to a multiple of {self.patch_size} px"
            )
        t = self.patch_embed(x)  # (B, h, w, C)
        b, h, w, c = t.shape
        if mask is not None:
            if mask.shape != (b, h * w):
                raise CdkdValueError(f"mask shape {tuple(mask.shape)} does not match ({b}, {h * w}) patches")
            # SimMIM: swap the patch embedding for the mask token, then add position as for any patch.
            t = torch.where(mask.view(b, h, w, 1), self.mask_token.to(t.dtype).view(1, 1, 1, c), t)
        t = t + self._pos_embed(h, w).to(t.dtype)
        layout = WindowLayout((h, w), self.window_size, t.device)
        return layout.to_windows(t), layout

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding (1, h, w, C) for an h x w token grid, resampled from the learnt base grid."""
        pe = self.pos_embed
        if (h, w) != self.base_grid:
            pe = resample_abs_pos_embed(pe, new_size=[h, w], old_size=list(self.base_grid), num_prefix_tokens=0)
        return pe.view(1, h, w, -1)

    def _blocks(
        self, t: torch.Tensor, layout: WindowLayout, taps: Sequence[int] = (), last: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks 0..last (default all) over window-major tokens (B, L, C).

        Returns the last block's output (B, L, C) and the outputs of the blocks in ``taps`` (block order), all
        still window-major.
        """
        window_mask = layout.window_mask(t.shape[0])
        last = self.depth - 1 if last is None else last
        tapped = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            if blk.is_global:
                args = (t, 1, layout.global_keys)
            else:
                args = (t, layout.num_windows, window_mask)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                t = activation_checkpoint(blk, *args, use_reentrant=False)
            else:
                t = blk(*args)
            if i in taps:
                tapped.append(t)
        return t, tapped

    # --- timm contract ----------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> final LayerNorm'd tokens (B, N, C), row-major, N = H/16 * W/16."""
        t, layout = self._embed(x)
        t, _ = self._blocks(t, layout)
        return layout.to_rows(self.norm(t))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> mean-pooled (B, C); there is no classifier (num_classes 0), so ``pre_logits``
        changes nothing."""
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> pooled features (B, C)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs for UPerNet-style necks, with timm ``VisionTransformer`` semantics.

        Args:
            x: (B, C, H, W) images.
            indices: int n = the last n blocks, a sequence = those 0-based blocks (negative counts from the end),
                None = every block.
            norm: apply the final LayerNorm to each intermediate.
            stop_early: skip the blocks after the last one taken (implied by ``intermediates_only``).
            output_fmt: "NCHW" -> each (B, C, H/16, W/16); "NLC" -> each (B, N, C), row-major.
            intermediates_only: return only the list.

        Returns:
            The list of intermediates in block order, or (final LayerNorm'd tokens (B, N, C), list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise CdkdValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.depth, indices)
        t, layout = self._embed(x)
        # Without the final tokens there is no reason to run blocks past the last one taken.
        last = max_index if stop_early or intermediates_only else None
        t, tapped = self._blocks(t, layout, taps=take_indices, last=last)
        out = [layout.to_rows(self.norm(y) if norm else y) for y in tapped]
        if output_fmt == "NCHW":
            b, c = x.shape[0], self.embed_dim
            out = [y.view(b, layout.h, layout.w, c).permute(0, 3, 1, 2).contiguous() for y in out]
        if intermediates_only:
            return out
        return layout.to_rows(self.norm(t)), out

    def forward_masked(
        self, x: torch.Tensor, mask: torch.Tensor | None, taps: Sequence[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """SimMIM-style masked forward for distillation.

        Args:
            x: (B, C, H, W) images.
            mask: (B, N) bool, True = masked patch (its embedding becomes ``mask_token`` before the position
                embedding is added), N = H/16 * W/16 row-major; None = nothing masked.
            taps: 0-based blocks whose outputs are returned.

        Returns:
            The tap blocks' outputs (un-normalised), each (B, N, C) row-major, in block order, and the final
            LayerNorm'd tokens (B, N, C) row-major.
        """
        bad = [i for i in taps if not 0 <= i < self.depth]
        if bad:
            raise CdkdValueError(f"taps {bad} out of range: 0-based block indexes below depth {self.depth}")
        t, layout = self._embed(x, None if mask is None else mask.to(torch.bool))
        t, tapped = self._blocks(t, layout, taps=taps)
        return [layout.to_rows(y) for y in tapped], layout.to_rows(self.norm(t))
