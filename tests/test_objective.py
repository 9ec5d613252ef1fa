"""The Mask-CDKD objective: which parameters each loss term trains, padding, band handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from cdkd.config import ObjectiveConfig, TeacherConfig
from cdkd.distill.objective import MaskCDKD, teacher_input
from cdkd.errors import CdkdValueError
from cdkd.models.mae import random_patch_mask
from cdkd.models.student import build_student
from cdkd.models.teacher import MMoATeacher


def _model(direction: str = "bi", in_chans: int = 3) -> MaskCDKD:
    torch.manual_seed(0)
    teacher = MMoATeacher(
        sam_model_registry["vit_b"](checkpoint=None).image_encoder,
        TeacherConfig(variant="vit_b", random_init=True, adapter_dim=8),
    )
    with torch.no_grad():  # give the zero-initialised adapters a path for gradients to show
        for blk in teacher.blocks:
            for a in blk.mmoa.adapters:
                a.up.weight.normal_(0, 0.01)
    student = build_student("vit_s", img_size=64, in_chans=in_chans)
    cfg = ObjectiveConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, direction=direction)
    return MaskCDKD(teacher, student, cfg, in_chans=in_chans)


def _mask(b: int = 2) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([random_patch_mask(16, 0.75, rng) for _ in range(b)]))


def _adapter_grad(model: MaskCDKD) -> float:
    return sum(
        float(p.grad.abs().sum())
        for n, p in model.teacher.named_parameters()
        if p.grad is not None and ".mmoa.adapters." in n
    )


@pytest.mark.parametrize("direction,teacher_learns_from_kd", [("bi", True), ("uni", False)])
def test_kd_gradient_direction(direction: str, teacher_learns_from_kd: bool) -> None:
    model = _model(direction)
    losses = model(torch.randn(2, 3, 64, 64), _mask())
    losses.kd.backward()
    assert (_adapter_grad(model) > 0) == teacher_learns_from_kd
    assert model.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # KD always trains the student
    assert model.student.blocks[11].attn.qkv.weight.grad is None  # block 12 is after the last tap (9)


def test_mae_terms_train_their_own_side() -> None:
    model = _model()
    losses = model(torch.randn(2, 3, 64, 64), _mask())
    losses.t_mae.backward()
    assert _adapter_grad(model) > 0 and model.student.patch_embed.proj.weight.grad is None
    model.zero_grad(set_to_none=True)
    losses = model(torch.randn(2, 3, 64, 64), _mask())
    losses.s_mae.backward()
    assert _adapter_grad(model) == 0 and model.student.patch_embed.proj.weight.grad.abs().sum() > 0


def test_padding_is_excluded_from_the_losses() -> None:
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    mask = _mask(1)
    half = torch.ones(1, 64, 64, dtype=torch.bool)
    half[:, :, 32:] = False  # right half is padding
    with torch.no_grad():
        full = model(x, mask)
        part = model(x, mask, half)
        # An all-invalid view has zero loss, not NaN: averages run over valid patches only.
        none = model(x, mask, torch.zeros(1, 64, 64, dtype=torch.bool))
    assert float(none.kd) == 0.0 and float(none.t_mae) == 0.0 and float(none.s_mae) == 0.0
    assert torch.isfinite(part.kd) and not torch.isclose(part.s_mae, full.s_mae)


def test_multiband_student_and_teacher_view() -> None:
    x = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 16, 16)
    assert teacher_input(x)[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]
    pan = torch.ones(1, 1, 16, 16)
    assert teacher_input(pan).shape == (1, 3, 16, 16)
    model = _model(in_chans=4)
    losses = model(torch.randn(2, 4, 64, 64), _mask())
    assert all(torch.isfinite(v) for v in (losses.kd, losses.t_mae, losses.s_mae))


def test_taps_must_pair_and_fit() -> None:
    teacher = MMoATeacher(
        sam_model_registry["vit_b"](checkpoint=None).image_encoder, TeacherConfig(variant="vit_b", random_init=True)
    )
    student = build_student("vit_s", img_size=64)
    with pytest.raises(CdkdValueError, match="pair up"):
        MaskCDKD(teacher, student, ObjectiveConfig(student_taps=(3, 6)))
    with pytest.raises(CdkdValueError, match="outside blocks"):
        MaskCDKD(teacher, student, ObjectiveConfig(teacher_taps=(3, 6, 13)))


def test_grid_students_of_any_kind_fit_mask_cdkd() -> None:
    """An RSMamba student keeps its grid (mask tokens) like vit_s_win: its MAE head gets no mask token to fill."""
    from cdkd.models.teacher import build_teacher

    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig(variant="vit_t", random_init=True, adapter_dim=8))
    student = build_student("rsmamba_s", img_size=64, embed_dim=32, depth=9, d_inner=64, d_state=4)
    model = MaskCDKD(
        teacher, student, ObjectiveConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, teacher_taps=(2, 4, 6))
    )
    assert model.student_decoder.mask_token is None
    losses = model(torch.randn(2, 3, 64, 64), _mask())
    (losses.kd + losses.s_mae).backward()
    assert all(torch.isfinite(v) for v in (losses.kd, losses.t_mae, losses.s_mae))
    assert model.student.mask_token.grad.abs().sum() > 0  # masked patches went through the mask token
