"""The teacher: SAM's ViT image encoder, frozen, with MMoA adapters and a mask token.

Built with ``segment_anything.sam_model_registry`` (the real architecture), loaded from an official checkpoint
file or, for tests and smoke runs only, left at random weights. Only the adapters, gates and the mask token
train; everything from SAM keeps ``requires_grad=False``.

Masking (SimMIM-style): SAM's windowed blocks need the full token grid, so the teacher does not drop masked
tokens as MAE does; it replaces their patch embeddings with a learned mask token and keeps the grid. The student
and the teacher then see the same masked view, and the teacher's reconstruction head predicts the masked pixels
from the mask-token positions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from cdkd.config import TeacherConfig
from cdkd.errors import SAM_CHECKPOINT_HELP, CdkdValueError, CheckpointError
from cdkd.models.kernels.sam_attention import fuse_sam_attention
from cdkd.models.mmoa import MMoA
from cdkd.utils.paths import file_sha256

if TYPE_CHECKING:
    from segment_anything.modeling import ImageEncoderViT
    from segment_anything.modeling.image_encoder import Block as SamBlock

# SAM variant -> (embed dim, 0-based global-attention blocks), as in segment_anything/build_sam.py.
# vit_t is SAM's architecture at a small size (8 blocks, 256-d, 8 px windows) for CPU experiments such as
# bench/transfer.py; it has no official weights, so it takes your own checkpoint or --random-teacher.
SAM_VARIANTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "vit_t": (256, (1, 3, 5, 7)),
    "vit_b": (768, (2, 5, 8, 11)),
    "vit_l": (1024, (5, 11, 17, 23)),
    "vit_h": (1280, (7, 15, 23, 31)),
}


def _build_sam_vit_t() -> nn.Module:
    """SAM's ``ImageEncoderViT`` (the real class) at a small size: 8 blocks, 256-d, 8 heads, 8 px windows."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        embed_dim=256,
        depth=8,
        num_heads=8,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=8,
        global_attn_indexes=SAM_VARIANTS["vit_t"][1],
    )


def default_teacher_taps(variant: str) -> tuple[int, ...]:
    """1-based teacher blocks aligned to the student: the first three global-attention blocks.

    For vit_l these are {6, 12, 18} as in the paper; vit_b and vit_h take the proportional ones.
    """
    return tuple(i + 1 for i in SAM_VARIANTS[variant][1][:3])


def build_sam_encoder(variant: str, checkpoint: str | Path | None = None, random_init: bool = False) -> nn.Module:
    """SAM's ``ImageEncoderViT`` for ``variant``, loaded from ``checkpoint`` (or random with ``random_init``).

    ``checkpoint`` may be a full SAM checkpoint (keys ``image_encoder.*``) or an encoder-only state dict.
    """
    from segment_anything import sam_model_registry

    check_teacher_source(variant, checkpoint, random_init)
    encoder = _build_sam_vit_t() if variant == "vit_t" else sam_model_registry[variant](checkpoint=None).image_encoder
    if checkpoint is not None:
        encoder.load_state_dict(_read_encoder_state(Path(checkpoint), variant))
    return encoder


def check_teacher_source(variant: str, checkpoint: str | Path | None, random_init: bool) -> None:
    """Cheap checks of the teacher's variant and weights source, so a bad one fails before any heavy work."""
    if variant not in SAM_VARIANTS:
        raise CdkdValueError(f"unknown teacher {variant!r}; choose one of {', '.join(SAM_VARIANTS)}")
    if checkpoint is None and not random_init:
        raise CheckpointError(
            f"no SAM checkpoint given for teacher {variant}; {SAM_CHECKPOINT_HELP}, "
            "or pass --random-teacher for a smoke test"
        )
    if checkpoint is not None and random_init:
        raise CdkdValueError("give either a teacher checkpoint or random_init, not both")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointError(f"{checkpoint}: SAM checkpoint not found; {SAM_CHECKPOINT_HELP}")


def _read_encoder_state(path: Path, variant: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file: pickle, zip, runtime errors
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); {SAM_CHECKPOINT_HELP}"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    weight = state.get("patch_embed.proj.weight")
    if weight is None:
        raise CheckpointError(
            f"{path}: no SAM image encoder weights inside (missing patch_embed.proj.weight); {SAM_CHECKPOINT_HELP}"
        )
    dims = {d: v for v, (d, _) in SAM_VARIANTS.items()}
    found = dims.get(int(weight.shape[0]), f"an unknown variant (embed dim {weight.shape[0]})")
    if found != variant:
        raise CheckpointError(
            f"{path}: this is a {found} checkpoint, but the teacher is {variant}; "
            f"pass --teacher {found} or the {variant} checkpoint"
        )
    return state


class AdaptedBlock(nn.Module):
    """SAM's ``Block`` with its FFN branch replaced by :class:`MMoA`; attention and norms are SAM's own modules."""

    def __init__(self, block: SamBlock, mmoa: MMoA) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = block.norm1, block.attn, block.norm2
        self.window_size = block.window_size
        self.mmoa = mmoa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, hw)
        x = shortcut + x
        return x + self.mmoa(self.norm2(x))


class MMoATeacher(nn.Module):
    """Frozen SAM encoder + MMoA. Features are SAM's channels-last token grids (B, h, w, C).

    SAM's attention runs as ``cfg.attention`` says (:mod:`cdkd.models.kernels.sam_attention`): by default fused,
    without the N x N score matrix, on CUDA, and segment-anything's own code on the CPU; same parameters either way.
    """

    def __init__(self, encoder: ImageEncoderViT, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fuse_sam_attention(encoder, cfg.attention)
        self.variant = cfg.variant
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed
        self.embed_dim = int(self.pos_embed.shape[-1])
        self.patch_size = 16
        self.global_blocks = SAM_VARIANTS[cfg.variant][1]
        for p in encoder.parameters():
            p.requires_grad_(False)
        depth = len(encoder.blocks)
        adapted = set(range(depth)) if cfg.adapter_blocks is None else {b - 1 for b in cfg.adapter_blocks}
        if any(not 0 <= b < depth for b in adapted):
            raise CdkdValueError(f"adapter blocks {cfg.adapter_blocks} outside 1..{depth} for {cfg.variant}")
        self.blocks = nn.ModuleList(
            AdaptedBlock(blk, self._make_mmoa(blk.mlp)) if i in adapted else blk for i, blk in enumerate(encoder.blocks)
        )
        # SAM's neck: the 256-channel image embedding RS4D distils (Mask-CDKD taps blocks and leaves it unused).
        self.neck = encoder.neck
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.grad_checkpointing = cfg.grad_checkpointing

    def _make_mmoa(self, mlp: nn.Module) -> MMoA:
        c = self.cfg
        return MMoA(
            mlp,
            self.embed_dim,
            adapter=c.adapter,
            fusion=c.fusion,
            bottleneck=c.adapter_dim,
            fine_dilations=c.fine_dilations,
            coarse_dilations=c.coarse_dilations,
            gate_dim=c.gate_dim,
        )

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def out_chans(self) -> int:
        """Channels of SAM's image embedding (the neck's output): 256 in every SAM variant."""
        return int(self.neck[0].out_channels)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what distillation changes (adapters, gates, mask token): SAM's weights come from their file."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def fingerprint(self) -> float:
        """A cheap checksum of the frozen weights, to check a resumed run rebuilt the same teacher."""
        with torch.no_grad():
            return float(sum(p.double().abs().sum() for p in self.parameters() if not p.requires_grad))

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed (B, 3, H, W) -> (B, h, w, C), mask tokens swapped in where mask (B, h*w) is True."""
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise CdkdValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size 16")
        t = self.patch_embed(x)
        b, h, w, c = t.shape
        if mask is not None:
            m = mask.reshape(b, h, w, 1).to(t.dtype)
            t = t * (1 - m) + self.mask_token.to(t.dtype) * m
        return t + self._pos_embed(h, w).to(t.dtype)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pe = self.pos_embed
        if pe.shape[1:3] == (h, w):
            return pe
        # SAM's absolute position embedding is learnt for a 64x64 grid (1024 px); other sizes interpolate it.
        pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1)

    def forward_masked(
        self, x: torch.Tensor, mask: torch.Tensor | None, taps: Sequence[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, 3, H, W), mask (B, N) bool (True = masked), taps 0-based blocks.

        Returns the tap block outputs, each (B, N, C) row-major, and the last block's output (B, N, C).
        """
        t = self.embed(x, mask)
        feats = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                t = activation_checkpoint(blk, t, use_reentrant=False)
            else:
                t = blk(t)
            if i in taps:
                feats.append(t.flatten(1, 2))
        return feats, t.flatten(1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Sequence[int] | int | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor]:
        """timm's contract (0-based ``indices``; NCHW maps), so decoders built for students also fit the teacher.

        ``norm`` is accepted for compatibility and ignored: SAM's blocks have no final norm before the neck.
        """
        if not intermediates_only or output_fmt != "NCHW":
            raise CdkdValueError("the teacher returns NCHW intermediates only")
        if indices is None:
            indices = range(self.depth)
        elif isinstance(indices, int):
            indices = range(self.depth - indices, self.depth)
        wanted = sorted(indices)
        t = self.embed(x)
        out = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in wanted:
                out.append(t.permute(0, 3, 1, 2))
            if stop_early and i >= wanted[-1]:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's image embedding (B, 256, H/16, W/16), through the neck, with adapters active."""
        t = self.embed(x)
        for blk in self.blocks:
            t = blk(t)
        return self.neck(t.permute(0, 3, 1, 2))


def build_teacher(cfg: TeacherConfig) -> MMoATeacher:
    """The MMoA teacher described by ``cfg`` (SAM weights from ``cfg.checkpoint`` or random)."""
    return MMoATeacher(build_sam_encoder(cfg.variant, cfg.checkpoint, cfg.random_init), cfg)


def build_frozen_teacher(cfg: TeacherConfig) -> MMoATeacher:
    """Plain SAM frozen whole: no adapters, nothing trainable (the adapter settings of ``cfg`` are ignored).

    ``forward`` gives SAM's own image embedding; the fixed target of RS4D distillation.
    """
    teacher = MMoATeacher(
        build_sam_encoder(cfg.variant, cfg.checkpoint, cfg.random_init), replace(cfg, adapter_blocks=())
    )
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_provenance(cfg: TeacherConfig) -> dict[str, Any]:
    """What a later reader needs to know about the teacher a student came from."""
    out: dict[str, Any] = {"variant": cfg.variant, "random_init": cfg.random_init, "checkpoint": cfg.checkpoint}
    if cfg.checkpoint:
        out["checkpoint_sha256"] = file_sha256(cfg.checkpoint)
    return out
