"""The base of cdkd's own students: 16 px patch tokens on a grid, blocks over them, and timm's feature contract
written once.

A student built on ``TokenGridBackbone`` turns a (B, C, H, W) image into an h x w grid of patch tokens (a patch
embedding, a learnt absolute position embedding resampled for any multiple of the patch size, SimMIM mask tokens
for masked distillation) and runs ``blocks`` over them as a sequence. What differs between students is only how
the grid becomes a sequence and how a block is called on it, the two hooks below; everything a consumer reads
(``forward_features``, ``forward_head``, ``forward_intermediates``, ``forward_masked``, ``feature_info``,
``no_weight_decay``, ``set_grad_checkpointing``) is here, so UPerNet, the distillation taps, the detector and the
ONNX exporter see every student the same way (timm's ``VisionTransformer`` semantics).

Hooks:

* ``_layout(grid, device)``: an object with the grid's ``h`` and ``w``, ``to_sequence`` ((B, h, w, C) grid ->
  (B, L, C) sequence in the student's own order) and ``to_rows`` ((B, L, C) -> (B, h * w, C) row-major);
* ``_block_args(i, block, tokens, layout)``: the arguments block ``i`` is called with.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from cdkd.errors import CdkdValueError

__all__ = ["RowLayout", "TokenGridBackbone"]


class RowLayout:
    """A token grid as one row-major sequence: nothing to permute."""

    def __init__(self, grid: tuple[int, int]) -> None:
        self.h, self.w = grid

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, h * w, C)."""
        return x.reshape(x.shape[0], self.h * self.w, x.shape[-1])

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TokenGridBackbone(nn.Module):
    """A patch-token student: see the module docstring. Subclasses call ``_init_grid`` first, then build
    ``self.blocks`` (an ``nn.ModuleList``) and ``self.norm`` (the final LayerNorm), in that order, so that a seed
    gives the same weights it gave before the base existed."""

    encodes_visible_only = False  # masked patches become mask tokens; the grid is kept (never dropped as in MAE)
    num_prefix_tokens = 0
    blocks: nn.ModuleList
    norm: nn.Module

    def _init_grid(
        self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, bias: bool = True
    ) -> None:
        if img_size % patch_size:
            raise CdkdValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if in_chans < 1:
            raise CdkdValueError(f"in_chans must be a positive int, got {in_chans}")
        if depth < 1:
            raise CdkdValueError(f"depth must be a positive int, got {depth}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.depth = depth
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",
            bias=bias,
            strict_img_size=False,
        )
        self.base_grid: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_grid[0] * self.base_grid[1], embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": patch_size} for i in range(depth)
        ]

    # --- hooks ------------------------------------------------------------------------------------------------

    def _layout(self, grid: tuple[int, int], device: torch.device) -> Any:
        return RowLayout(grid)

    def _block_args(self, index: int, block: nn.Module, t: torch.Tensor, layout: Any) -> tuple[Any, ...]:
        return (t,)

    # --- shared -----------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in backward (training at 1024 px on small GPUs; the PyTorch scan's states)."""
        self.grad_checkpointing = enable

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding (1, h, w, C) for an h x w token grid, resampled (bicubic) from the learnt grid."""
        pe = self.pos_embed
        if (h, w) != self.base_grid:
            pe = resample_abs_pos_embed(pe, new_size=[h, w], old_size=list(self.base_grid), num_prefix_tokens=0)
        return pe.view(1, h, w, -1)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """x (B, C, H, W), mask (B, N) bool or None -> (B, L, C) tokens in the student's order, and the layout."""
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
        t = t + self.position_embedding(h, w).to(t.dtype)
        layout = self._layout((h, w), t.device)
        return layout.to_sequence(t), layout

    def _blocks(
        self, t: torch.Tensor, layout: Any, taps: Sequence[int] = (), last: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks 0..last (default all) over (B, L, C); returns the last output and the outputs of ``taps``
        (block order), still in the student's token order."""
        last = self.depth - 1 if last is None else last
        tapped = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            args = self._block_args(i, blk, t, layout)
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
        take_indices, max_index = feature_take_indices(self.depth, indices)  # type: ignore[arg-type]  # any sequence
        t, layout = self._embed(x)
        # Without the final tokens there is no reason to run blocks past the last one taken.
        last = max_index if stop_early or intermediates_only else None
        t, tapped = self._blocks(t, layout, taps=take_indices, last=last)
        out = [layout.to_rows(self.norm(y) if norm else y) for y in tapped]
        if output_fmt == "NCHW":
            out = [y.view(y.shape[0], layout.h, layout.w, -1).permute(0, 3, 1, 2).contiguous() for y in out]
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
