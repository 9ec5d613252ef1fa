"""Segmentation decoders on a (frozen) ViT student: the multi-level neck, UPerNet and the linear probe.

This follows the protocol used to evaluate DINOv2 and BEiT backbones on dense tasks, written from the papers and
mmsegmentation's design, not its code:

* ``ViTNeck`` turns four same-resolution ViT feature maps (stride 16) into a pyramid at strides 4, 8, 16 and 32
  (BEiT's / mmseg's ``Feature2Pyramid``): two transposed convolutions, one, identity, a 2x2 max pool.
* ``UPerHead`` is UPerNet's decoder (Xiao et al. 2018, mmseg's ``UPerHead``): a pyramid pooling module on the
  coarsest level, a top-down FPN, all levels fused at stride 4.
* ``LinearHead`` is DINOv2's "linear" baseline on several layers: BatchNorm + a 1x1 convolution at stride 16.
* ``Segmenter`` ties an encoder that speaks timm's ``forward_intermediates`` contract to one of the heads and
  returns logits at the input resolution. With a frozen encoder (the default) only the decoder learns.

Token grids of any size work, odd ones included (a 400 px tile gives 25 x 25 tokens): the coarsest level is
pooled with ``ceil_mode`` (25 -> 13) and every top-down step resizes to the finer map's exact size.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdkd.errors import CdkdValueError

__all__ = [
    "HEADS",
    "NORMS",
    "ConvModule",
    "LinearHead",
    "Segmenter",
    "UPerHead",
    "ViTNeck",
    "count_parameters",
    "make_norm",
]

NORMS = ("bn", "gn")
HEADS = ("upernet", "linear")
GN_GROUPS = 32


def make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d ("bn") or GroupNorm with 32 groups ("gn") over ``channels``.

    GroupNorm is the choice for tiny per-GPU batches: BatchNorm in training mode cannot normalise the 1x1 map of
    the PPM's global pool when the batch holds a single image.
    """
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        if channels % GN_GROUPS:
            raise CdkdValueError(f"norm 'gn' needs channels divisible by {GN_GROUPS}, got {channels}")
        return nn.GroupNorm(GN_GROUPS, channels)
    raise CdkdValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise CdkdValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``size`` (align_corners=False, as mmseg); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """conv (no bias: the norm's shift replaces it) -> norm -> ReLU. (B, in, h, w) -> (B, out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str = "bn") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class ViTNeck(nn.Module):
    """Four ViT maps at stride 16 -> a pyramid at strides 4, 8, 16, 32 with the same channel count.

    Input: a sequence of 4 tensors (B, C, h, w), shallow to deep. Output: a list of 4 tensors
    (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, ceil(h/2), ceil(w/2)). The shallowest layer goes to the
    finest level, as in BEiT/DINOv2: early blocks keep the most local detail.
    """

    def __init__(self, embed_dim: int, norm: str = "bn") -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
            make_norm(norm, embed_dim),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)
        self.keep = nn.Identity()
        # ceil_mode keeps the last row/column of an odd grid (25 -> 13, not 12): no token is dropped.
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != 4:
            raise CdkdValueError(f"ViTNeck takes 4 feature maps, got {len(feats)}")
        return [self.up4(feats[0]), self.up2(feats[1]), self.keep(feats[2]), self.down2(feats[3])]


class PPM(nn.Module):
    """Pyramid pooling: (B, C, h, w) -> [(B, channels, h, w)] * len(pool_scales), one per pooled scale."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], norm: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1, norm)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(stage(x), x.shape[-2:]) for stage in self.stages]


class UPerHead(nn.Module):
    """UPerNet decoder: PPM on the coarsest level, top-down FPN, fusion of all levels at the finest one.

    Input: a sequence of len(in_channels) maps (B, in_channels[i], h_i, w_i), finest first (each level about half
    the size of the previous one; exact ratios are not needed). Output: logits (B, num_classes, h_0, w_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "bn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise CdkdValueError("UPerHead needs at least one input level")
        if num_classes < 1:
            raise CdkdValueError(f"num_classes must be >= 1, got {num_classes}")
        if channels < 1:
            raise CdkdValueError(f"channels must be >= 1, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise CdkdValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_norm(norm)
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        *fine, coarsest = self.in_channels
        self.ppm = PPM(coarsest, channels, pool_scales, norm)
        self.bottleneck = ConvModule(coarsest + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, norm) for _ in fine)
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, norm)
        # Dropout2d drops whole channels, as mmseg's decode heads do before the classifier.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        # Small classifier init (mmseg: normal std 0.01): initial logits near 0, i.e. a uniform prediction.
        nn.init.normal_(self.classifier.weight, std=0.01)
        assert self.classifier.bias is not None  # Conv2d's bias=True
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.in_channels):
            raise CdkdValueError(f"UPerHead expects {len(self.in_channels)} feature maps, got {len(feats)}")
        coarsest = feats[-1]
        top = self.bottleneck(torch.cat([coarsest, *self.ppm(coarsest)], dim=1))
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [top]
        # Top-down: each level gets the coarser one resized to its own exact size (odd grids: 13 -> 25 etc.).
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))


class LinearHead(nn.Module):
    """DINOv2's linear probe on several layers: concat -> BatchNorm2d -> 1x1 conv.

    Input: n maps (B, C_i, h, w) of the same size. Output: logits (B, num_classes, h, w) (stride 16).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise CdkdValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        total = sum(self.in_channels)
        # BatchNorm puts the layers, whose scales differ by orders of magnitude, on one footing for the linear map.
        self.norm = nn.BatchNorm2d(total)
        self.classifier = nn.Conv2d(total, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        assert self.classifier.bias is not None  # Conv2d's bias=True
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.in_channels):
            raise CdkdValueError(f"LinearHead expects {len(self.in_channels)} feature maps, got {len(feats)}")
        return self.classifier(self.norm(torch.cat(list(feats), dim=1)))


class Segmenter(nn.Module):
    """Encoder + decoder: images (B, C, H, W) -> logits (B, num_classes, H, W) at the input resolution.

    Args:
        encoder: a student with ``forward_intermediates`` (timm contract), ``embed_dim``, ``depth``,
            ``patch_size`` (both ``build_student`` variants).
        num_classes: number of output classes K.
        head: "upernet" (ViTNeck + UPerHead, logits at stride 4) or "linear" (LinearHead, stride 16).
        layers: 1-based encoder blocks whose outputs feed the decoder, strictly increasing; exactly 4 for
            "upernet" (one per pyramid level), 1 or more for "linear".
        channels: UPerHead width (ignored by the linear head).
        freeze_encoder: keep the encoder fixed: no gradients, run under ``torch.no_grad()``, always in eval mode
            (no drop path; the features do not depend on the batch or on ``train()``).
        norm: "bn" or "gn" in the neck and UPerHead (the linear head always uses BatchNorm, as in DINOv2).
        feature_norm: apply the encoder's final LayerNorm to every tapped layer, as DINOv2's
            ``get_intermediate_layers`` does for its segmentation probes.

    ``config()`` gives these arguments (without the encoder) as plain types: ``Segmenter(encoder, **config)``
    rebuilds the same module. ``head_state_dict()`` holds only the decoder (everything but the encoder).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        head: str = "upernet",
        layers: Sequence[int] = (3, 6, 9, 12),
        channels: int = 512,
        freeze_encoder: bool = True,
        norm: str = "bn",
        feature_norm: bool = True,
    ) -> None:
        super().__init__()
        for attr in ("forward_intermediates", "embed_dim", "depth", "patch_size"):
            if not hasattr(encoder, attr):
                raise CdkdValueError(
                    f"encoder {type(encoder).__name__} lacks {attr!r}; use a student from cdkd.models.student"
                )
        if head not in HEADS:
            raise CdkdValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise CdkdValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise CdkdValueError(f"channels must be a positive int, got {channels!r}")
        _check_norm(norm)
        self.layers = self._check_layers(layers, head, int(encoder.depth))
        self.encoder = encoder
        self.head_type = head
        self.num_classes = num_classes
        self.channels = channels
        self.freeze_encoder = bool(freeze_encoder)
        self.norm = norm
        self.feature_norm = bool(feature_norm)
        self.patch_size = int(encoder.patch_size)

        embed_dim = int(encoder.embed_dim)
        if head == "upernet":
            self.neck: nn.Module = ViTNeck(embed_dim, norm)
            self.head: nn.Module = UPerHead([embed_dim] * 4, num_classes, channels, norm=norm)
        else:
            self.neck = nn.Identity()  # passes the list of maps through unchanged
            self.head = LinearHead([embed_dim] * len(self.layers), num_classes)

        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @staticmethod
    def _check_layers(layers: Sequence[int], head: str, depth: int) -> tuple[int, ...]:
        try:
            out = tuple(int(i) for i in layers)
        except (TypeError, ValueError):
            raise CdkdValueError(f"layers must be a sequence of ints, got {layers!r}") from None
        if head == "upernet" and len(out) != 4:
            raise CdkdValueError(f"head 'upernet' needs exactly 4 layers (one per pyramid level), got {list(out)}")
        if not out:
            raise CdkdValueError("layers must name at least one encoder block")
        bad = [i for i in out if not 1 <= i <= depth]
        if bad:
            raise CdkdValueError(f"layers {bad} out of range: 1-based encoder blocks 1..{depth}")
        # timm returns intermediates in block order whatever the order asked; insisting on it keeps the
        # shallow-to-fine mapping of the neck what the caller wrote.
        if any(b <= a for a, b in zip(out, out[1:])):
            raise CdkdValueError(f"layers must be strictly increasing, got {list(out)}")
        return out

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain types (JSON/YAML/checkpoint safe): ``Segmenter(encoder, **config)``."""
        return {
            "num_classes": self.num_classes,
            "head": self.head_type,
            "layers": list(self.layers),
            "channels": self.channels,
            "freeze_encoder": self.freeze_encoder,
            "norm": self.norm,
            "feature_norm": self.feature_norm,
        }

    def decoder_modules(self) -> nn.ModuleDict:
        """The trainable decoder (neck + head) as one module, e.g. for an optimizer's parameter group."""
        return nn.ModuleDict({"neck": self.neck, "head": self.head})

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the decoder only (keys ``neck.*`` and ``head.*``, BatchNorm statistics included).

        With a frozen encoder this is all training changes, so a checkpoint need not repeat the student.
        """
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_head_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load what ``head_state_dict`` saved; with ``strict`` every decoder key must match exactly."""
        stray = [k for k in state if k.startswith("encoder.")]
        if stray:
            raise CdkdValueError(f"head state holds encoder weights ({stray[0]!r}, ...); load those into the encoder")
        decoder = self.decoder_modules()
        own = decoder.state_dict()
        # Check shapes first: torch reports a size mismatch as a bare RuntimeError even with strict=False.
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if wrong or (strict and (missing or unexpected)):
            raise CdkdValueError(
                f"decoder state does not match this Segmenter ({self.head_type}, {self.num_classes} classes, "
                f"{self.channels} channels): wrong shape {wrong[:5]}, missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        decoder.load_state_dict(state, strict=strict)

    def train(self, mode: bool = True) -> Segmenter:
        """Switch train/eval mode; a frozen encoder stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, H, W) -> the tapped layers, each (B, embed_dim, H/p, W/p), shallow to deep."""
        if x.ndim != 4:
            raise CdkdValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise CdkdValueError(
                f"input size {height}x{width} is not a multiple of the patch size {p}; "
                f"crop or pad the image to a multiple of {p} px"
            )
        indices = [i - 1 for i in self.layers]  # the encoder speaks 0-based block indexes

        def run() -> list[torch.Tensor]:
            return self.encoder.forward_intermediates(
                x,
                indices=indices,
                norm=self.feature_norm,
                stop_early=True,  # blocks after the last tapped one would be wasted work
                output_fmt="NCHW",
                intermediates_only=True,
            )

        if self.freeze_encoder:
            # No graph through the frozen encoder: its activations are freed at once (memory, time).
            with torch.no_grad():
                return run()
        return run()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), H and W multiples of the patch size -> logits (B, num_classes, H, W)."""
        logits = self.head(self.neck(self.features(x)))
        return _resize(logits, x.shape[-2:])


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
