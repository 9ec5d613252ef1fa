"""SAM's attention through fused attention against segment-anything's own ``Attention`` (real module, real
``ImageEncoderViT`` at the small ``vit_t`` size, random weights, rel-pos tables randomised: SAM initialises them to
zero, which would hide the bias).

Tolerances, float32: outputs rtol 1e-5, atol 1e-5; gradients rtol 1e-4, atol 1e-4 (the fused kernels sum in
another order; measured differences are ~1e-6). The student ViTs use fused attention already (checked below).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cdkd.config import TeacherConfig
from cdkd.errors import CdkdValueError
from cdkd.models.kernels.sam_attention import FusedSamAttention, fuse_sam_attention, rel_pos_table, resolve_impl
from cdkd.models.teacher import build_sam_encoder, build_teacher

CUDA = torch.cuda.is_available()
# The kernels that never write the score matrix: with MATH left out, SDPA must take one of these or fail.
FUSED_ONLY = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = build_sam_encoder("vit_t", random_init=True)
    with torch.no_grad():
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(std=0.5)
            blk.attn.rel_pos_w.normal_(std=0.5)
    return enc


def _grads(attn, x):
    """Output and gradients (x, qkv weight, rel-pos tables, proj weight) of a fixed functional of the output."""
    x = x.clone().requires_grad_(True)
    attn.zero_grad()
    y = attn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [x.grad, attn.qkv.weight.grad, attn.rel_pos_h.grad, attn.rel_pos_w.grad, attn.proj.weight.grad]


@pytest.mark.parametrize(
    "block,shape",
    [
        (0, (3, 8, 8)),  # windowed block: 3 windows of 8 x 8 tokens (its native table size)
        (1, (2, 6, 5)),  # global block on a 6 x 5 grid: the 127-entry tables interpolated, rows != columns
        (1, (1, 16, 16)),
    ],
)
def test_sdpa_equals_segment_anything_in_values_and_gradients(encoder, block: int, shape) -> None:
    sam = copy.deepcopy(encoder.blocks[block].attn)
    fused = FusedSamAttention(copy.deepcopy(sam), "sdpa")
    x = torch.randn(*shape, 256, generator=torch.Generator().manual_seed(block))
    with sdpa_kernel(FUSED_ONLY):  # the CPU flash kernel takes it: no N x N matrix anywhere
        y, grads = _grads(fused, x)
    y_ref, grads_ref = _grads(sam, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("x", "qkv", "rel_pos_h", "rel_pos_w", "proj"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("size", [14, 9, 64])
def test_rel_pos_table_is_segment_anythings(size: int) -> None:
    """The offsets table equals ``get_rel_pos`` exactly, at the table's own size and resampled."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    table = torch.randn(27, 8, generator=torch.Generator().manual_seed(size))
    assert torch.equal(rel_pos_table(size, table), get_rel_pos(size, size, table))


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_flex_equals_segment_anything_forward(encoder) -> None:
    """flex_attention's score modifier (values only: PyTorch has no flex backward on the CPU; CUDA tests below)."""
    sam = encoder.blocks[1].attn
    fused = FusedSamAttention(sam, "flex")
    x = torch.randn(2, 4, 6, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), sam(x), rtol=1e-5, atol=1e-5)


def test_teacher_swaps_attention_in_one_place_and_keeps_parameter_names() -> None:
    """The teacher builder fuses every block; ``auto`` is SAM's own code on the CPU; the trainable state, the frozen
    fingerprint and the image embedding are the same whichever form runs."""
    cfg = TeacherConfig(variant="vit_t", random_init=True, adapter_blocks=(2,))
    torch.manual_seed(0)
    auto = build_teacher(cfg)
    torch.manual_seed(0)
    sdpa = build_teacher(TeacherConfig(**{**cfg.__dict__, "attention": "sdpa"}))
    assert all(isinstance(blk.attn, FusedSamAttention) for blk in auto.blocks)
    assert resolve_impl("auto", torch.device("cpu")) == "sam" and resolve_impl("auto", torch.device("cuda")) == "sdpa"
    assert list(auto.state_dict()) == list(sdpa.state_dict()) and auto.fingerprint() == sdpa.fingerprint()
    assert any(k.endswith("attn.rel_pos_h") for k in auto.state_dict())
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), auto(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(CdkdValueError, match="attention"):
        fuse_sam_attention(build_sam_encoder("vit_t", random_init=True), "xformers")


def test_students_use_fused_attention() -> None:
    """timm's ViT blocks (vit_s) and the windowed student call F.scaled_dot_product_attention, never their manual
    score-matrix path."""
    from cdkd.models.student import build_student

    for arch in ("vit_s", "vit_s_win"):
        model = (
            build_student(arch, img_size=64, depth=2, global_blocks=(1,))
            if arch == "vit_s_win"
            else build_student(arch, img_size=64, depth=2)
        )
        assert all(blk.attn.fused_attn for blk in model.blocks), arch


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_cuda_fused_attention_equals_segment_anything(encoder, impl: str) -> None:
    """On the GPU, float32, 1024 px-sized grids: a global block (64 x 64 tokens) and a windowed one. Tolerance
    1e-3: the GPU kernels may round products through TF32."""
    for block, shape in ((1, (1, 64, 64)), (0, (4, 8, 8))):
        sam = copy.deepcopy(encoder.blocks[block].attn).cuda()
        fused = FusedSamAttention(copy.deepcopy(sam), impl)
        x = torch.randn(*shape, 256, device="cuda")
        outs = []
        for attn in (fused, sam):
            xg = x.clone().requires_grad_(True)
            y = attn(xg)
            y.square().mean().backward()
            outs.append((y.detach(), xg.grad, attn.rel_pos_h.grad))
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
