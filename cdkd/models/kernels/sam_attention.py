"""SAM's attention (segment-anything's ``Attention``: decomposed relative-position bias, global or windowed) through
fused attention, without the N x N score matrix.

segment-anything computes ``softmax(scale q k^T + rel_h + rel_w) v`` with an explicit (B * heads, N, N) score
matrix: at 1024 px a global block of ViT-B holds 12 x 4096 x 4096 scores per image (800 MB in float32, twice for
the softmax, again in backward). The bias is decomposed (MViTv2): ``rel_h[i, j] = q_i . Rh[row_i - row_j]``
depends on the query and the key's row only, ``rel_w`` on the query and the key's column only. Two fused forms:

* ``sdpa`` (default on CUDA): the bias folded into the dot product. With ``rel_h`` (N, H) and ``rel_w`` (N, W) per
  query, ``q' = [scale q, rel_h, rel_w]`` and ``k' = [k, onehot(row), onehot(col)]`` give
  ``q'_i . k'_j = scale q_i . k_j + rel_h[i, row_j] + rel_w[i, col_j]``, exactly the biased score, so one
  ``F.scaled_dot_product_attention(q', k', v, scale=1)`` call (flash / memory-efficient / cuDNN kernels on CUDA,
  the flash kernel on the CPU) computes the attention with O(N) memory, and autograd carries the gradients to q,
  k, v and the rel-pos tables. The head width grows by H + W (64 + 128 = 192 for a 1024 px global block,
  64 + 28 = 92 -> 96 for a 14 x 14 window; v is zero-padded to the same width, which flash kernels need), so the
  attention products cost up to 3x their plain FLOPs: the price of never writing the matrix. Above 1024 px a
  global block's width passes 256, where CUDA's flash kernel stops; SDPA then takes the memory-efficient one.
* ``flex``: ``torch.nn.attention.flex_attention`` with a score modifier that adds the two lookups
  ``rel_h[b, h, q, k // W] + rel_w[b, h, q, k % W]`` (no extra FLOPs; compiled with ``torch.compile`` on CUDA;
  PyTorch has no flex backward on the CPU).

``sam`` runs segment-anything's own ``Attention.forward`` on the same parameters: the reference, and the CPU
default. Parameters keep segment-anything's names (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``), so
checkpoints load unchanged whichever form runs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdkd.errors import CdkdValueError

if TYPE_CHECKING:
    from segment_anything.modeling.image_encoder import Attention as SamAttention
    from segment_anything.modeling.image_encoder import ImageEncoderViT

__all__ = [
    "ATTENTION_IMPLS",
    "FusedSamAttention",
    "decomposed_rel_pos",
    "fuse_sam_attention",
    "rel_pos_table",
    "resolve_impl",
]

ATTENTION_IMPLS = ("auto", "sam", "sdpa", "flex")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``sdpa`` on CUDA, ``sam`` (segment-anything's own code) elsewhere; other names unchanged."""
    if impl == "auto":
        return "sdpa" if device.type == "cuda" else "sam"
    return impl


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, C) embeddings of every query-key offset along one axis: segment-anything's ``get_rel_pos`` for
    equal query and key sizes (the encoder's case), with the offsets made on the table's device (SAM makes them on
    the CPU, a host-device mix that compiled graphs avoid)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:  # tables learnt for another grid are resampled linearly, as SAM does
        rel_pos = (
            F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
            .reshape(-1, length)
            .permute(1, 0)
        )
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, heads, H * W, C) -> rel_h (B, heads, H * W, H) and rel_w (B, heads, H * W, W): the bias terms of
    segment-anything's ``add_decomposed_rel_pos`` per query and key row / key column (unscaled q, as there)."""
    h, w = hw
    b, heads, n, c = q.shape
    r_q = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rel_pos_table(h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rel_pos_table(w, rel_pos_w))
    return rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)


def _position_keys(h: int, w: int, pad: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H * W, H + W + pad): each key's one-hot row and one-hot column (row-major tokens), zero padding after."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    keys = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], -1).to(dtype)
    return F.pad(keys, (0, pad))


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale q k^T + rel_h[:, :, :, row(k)] + rel_w[:, :, :, col(k)]) v through one SDPA call; q, k, v
    (B, heads, N, C), rel_h (B, heads, N, H), rel_w (B, heads, N, W) -> (B, heads, N, C)."""
    b, heads, n, c = q.shape
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    pad = -(c + h + w) % 8  # fused kernels want head dims in multiples of 8
    q_aug = torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], -1)
    if pad:
        q_aug = F.pad(q_aug, (0, pad))
    keys = _position_keys(h, w, pad, k.dtype, k.device).expand(b, heads, n, h + w + pad)
    k_aug = torch.cat([k, keys], -1)
    # Values padded with zeros to the same width: flash kernels (CUDA's and the CPU's) need one head dim for q, k
    # and v; the padded output columns are zero and dropped.
    v_aug = F.pad(v, (0, q_aug.shape[-1] - c))
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :c]


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same attention through flex_attention, the bias added by a score modifier (two gathers per score)."""
    w = rel_w.shape[-1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel_h[b, h, q_idx, kv_idx // w] + rel_w[b, h, q_idx, kv_idx % w]

    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is fused only when compiled: on its own on CUDA, or as part of a compiled caller.
    fn = _compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, score_mod=score_mod, scale=scale)


class FusedSamAttention(nn.Module):
    """segment-anything's ``Attention`` computed by ``impl`` (see ``ATTENTION_IMPLS`` and the module doc), sharing the
    wrapped module's parameters under the same names. (B, H, W, C) -> (B, H, W, C), as the original."""

    def __init__(self, attn: SamAttention, impl: str = "auto") -> None:
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise CdkdValueError(f"teacher attention must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        self.impl = impl
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        self.qkv, self.proj = attn.qkv, attn.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w

    def extra_repr(self) -> str:
        return f"impl={self.impl}, num_heads={self.num_heads}, use_rel_pos={self.use_rel_pos}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.impl, x.device)
        if impl == "sam":
            from segment_anything.modeling.image_encoder import Attention

            return Attention.forward(self, x)  # segment-anything's own code on these parameters
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, C) each
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (h, w))
            fused = attention_sdpa if impl == "sdpa" else attention_flex
            out = fused(q, k, v, rel_h, rel_w, self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def fuse_sam_attention(encoder: ImageEncoderViT, impl: str = "auto") -> ImageEncoderViT:
    """Swap every block's attention of a segment-anything ``ImageEncoderViT`` for :class:`FusedSamAttention`
    (in place; parameters and their names unchanged). Returns ``encoder``."""
    if impl not in ATTENTION_IMPLS:
        raise CdkdValueError(f"teacher attention must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    for blk in encoder.blocks:
        if isinstance(blk.attn, FusedSamAttention):
            blk.attn.impl = impl
        else:
            blk.attn = FusedSamAttention(blk.attn, impl)
    return encoder
