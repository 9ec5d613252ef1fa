"""Students: ViT-S/16 variants and RS4D's RSMamba state-space variants, all speaking timm's contract.

Every student offers ``forward_features``, ``forward_head`` and ``forward_intermediates(x, indices)`` (timm), and
for distillation ``forward_masked(x, mask, taps)``. ``encodes_visible_only`` says how a student treats masked
patches: the global-attention ViT encodes the visible tokens only (MAE, 4x fewer tokens at a 75% mask); the
windowed ViT and RSMamba need their full grid and swap in a mask token instead (SimMIM).

Variants are small builder functions collected in ``STUDENT_REGISTRY``; ``build_student`` merges overrides as
``dict(model_args, **overrides)`` the way timm's ``@register_model`` functions do.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from cdkd.errors import CdkdValueError


class ViTStudent(VisionTransformer):
    """timm's global-attention ViT without class token, mean-pooled, any input size that is a multiple of 16."""

    encodes_visible_only = True

    def __init__(self, **kwargs: Any) -> None:
        # fc_norm=False keeps the final LayerNorm on the tokens (timm moves it after pooling for "avg" otherwise),
        # so forward_features gives normalised patch tokens for the MAE head and for dense decoders.
        kwargs = dict(
            dict(class_token=False, global_pool="avg", fc_norm=False, num_classes=0, dynamic_img_size=True), **kwargs
        )
        super().__init__(**kwargs)
        self.depth = len(self.blocks)
        self.patch_size = self.patch_embed.patch_size[0]

    def forward_masked(
        self, x: torch.Tensor, mask: torch.Tensor, taps: Sequence[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, C, H, W), mask (B, N) bool (True = masked; the same count per image), taps 0-based blocks.

        Encodes the visible tokens only. Returns the tap block outputs and the final normed tokens, each
        (B, N, C) on the full row-major grid with zeros at masked positions.
        """
        t = self._pos_embed(self.patch_embed(x))  # (B, N, C): no prefix tokens, dynamic pos-embed resampling
        b, n, c = t.shape
        visible = ~mask
        n_vis = int(visible[0].sum())
        t = self.norm_pre(t[visible].reshape(b, n_vis, c))
        feats = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in taps:
                feats.append(_scatter(t, visible, n))
        return feats, _scatter(self.norm(t), visible, n)


def _scatter(tokens: torch.Tensor, visible: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n_vis, C) visible tokens -> (B, N, C) grid with zeros at masked positions."""
    out = tokens.new_zeros(tokens.shape[0], n, tokens.shape[-1])
    out[visible] = tokens.reshape(-1, tokens.shape[-1])
    return out


def vit_s(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """ViT-S/16 with global attention in every block, as in the paper."""
    args = dict(
        img_size=img_size, in_chans=in_chans, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0
    )
    return ViTStudent(**dict(args, **overrides))


def vit_s_win(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """ViT-S/16 with windowed attention and four global blocks: fewer FLOPs and less time on large tiles."""
    from cdkd.models.windowed_vit import WindowedViT

    args = dict(
        img_size=img_size,
        in_chans=in_chans,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        window_size=16,
        global_blocks=(2, 5, 8, 11),
    )
    return WindowedViT(**dict(args, **overrides))


def _rsmamba(img_size: int, in_chans: int, depth: int, d_inner: int, overrides: dict[str, Any]) -> nn.Module:
    from cdkd.models.rsmamba import RSMamba

    args = dict(
        img_size=img_size,
        in_chans=in_chans,
        patch_size=16,
        embed_dim=256,
        depth=depth,
        d_inner=d_inner,
        d_state=16,
        d_conv=4,
    )
    return RSMamba(**dict(args, **overrides))


def rsmamba_s(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """RS4D's RSMamba-S: 16 bidirectional Mamba blocks, d_model 256, d_inner 512, d_state 16 (8.3 M params)."""
    return _rsmamba(img_size, in_chans, 16, 512, overrides)


def rsmamba_b(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """RSMamba-B: 24 blocks, d_inner 512 (11.8 M params)."""
    return _rsmamba(img_size, in_chans, 24, 512, overrides)


def rsmamba_l(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """RSMamba-L: 28 blocks, d_inner 640 (16.6 M params)."""
    return _rsmamba(img_size, in_chans, 28, 640, overrides)


def rsmamba_h(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """RSMamba-H: 32 blocks, d_inner 640 (18.8 M params)."""
    return _rsmamba(img_size, in_chans, 32, 640, overrides)


def rsmamba_test(img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """A tiny RSMamba for tests and smoke runs (timm's ``*_test`` idea): 4 blocks, d_model 32, d_inner 64, d_state 4."""
    return _rsmamba(img_size, in_chans, 4, 64, dict(dict(embed_dim=32, d_state=4), **overrides))


STUDENT_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "vit_s": vit_s,
    "vit_s_win": vit_s_win,
    "rsmamba_s": rsmamba_s,
    "rsmamba_b": rsmamba_b,
    "rsmamba_l": rsmamba_l,
    "rsmamba_h": rsmamba_h,
    "rsmamba_test": rsmamba_test,
}


def build_student(arch: str, img_size: int = 1024, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """The student ``arch`` (a key of ``STUDENT_REGISTRY``) for tiles of ``img_size`` px with ``in_chans`` bands."""
    if arch not in STUDENT_REGISTRY:
        raise CdkdValueError(f"unknown student {arch!r}; choose one of {', '.join(STUDENT_REGISTRY)}")
    if in_chans < 1:
        raise CdkdValueError(f"in_chans must be >= 1, got {in_chans}")
    return STUDENT_REGISTRY[arch](img_size=img_size, in_chans=in_chans, **overrides)
