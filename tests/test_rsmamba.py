"""RSMamba students: the variants, the student contract over the whole registry, bidirectional scanning, masking,
UPerNet, student.pt and ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdkd.errors import CdkdValueError
from cdkd.models.student import STUDENT_REGISTRY, build_student

TINY_VIT = {"embed_dim": 48, "depth": 4, "num_heads": 2}
TINY_MAMBA = {"embed_dim": 32, "depth": 4, "d_inner": 64, "d_state": 4}


def tiny(arch: str, img_size: int = 64, in_chans: int = 3) -> torch.nn.Module:
    """Any registered student, shrunk so a forward takes milliseconds (timm's ``*_test`` idea)."""
    torch.manual_seed(0)
    overrides = TINY_MAMBA if arch.startswith("rsmamba") else TINY_VIT
    if arch == "vit_s_win":
        overrides = dict(overrides, window_size=2, global_blocks=(1, 3))
    return build_student(arch, img_size=img_size, in_chans=in_chans, **overrides).eval()


@pytest.mark.parametrize(
    "arch,depth,d_inner,params_m",
    [
        ("rsmamba_s", 16, 512, 8.26),
        ("rsmamba_b", 24, 512, 11.76),
        ("rsmamba_l", 28, 640, 16.58),
        ("rsmamba_h", 32, 640, 18.77),
    ],
)
def test_variants_are_the_papers(arch: str, depth: int, d_inner: int, params_m: float) -> None:
    model = build_student(arch)  # 1024 px position embedding
    assert model.depth == depth and model.embed_dim == 256 and model.patch_size == 16
    mixer = model.blocks[0].mixer
    assert (mixer.d_inner, mixer.d_state, mixer.d_conv, mixer.dt_rank) == (d_inner, 16, 4, 16)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


@pytest.mark.parametrize("arch", sorted(STUDENT_REGISTRY))
@pytest.mark.parametrize("size,in_chans", [((64, 64), 3), ((48, 80), 1), ((32, 48), 4)])
def test_student_contract(arch: str, size: tuple[int, int], in_chans: int) -> None:
    """What UPerNet, fine-tuning, export and distillation read, for every registered student."""
    model = tiny(arch, in_chans=in_chans)
    h, w = size[0] // 16, size[1] // 16
    x = torch.randn(2, in_chans, *size)
    c, depth = model.embed_dim, model.depth
    with torch.no_grad():
        feats = model.forward_intermediates(
            x, indices=[0, 1, 2, 3], norm=True, output_fmt="NCHW", stop_early=True, intermediates_only=True
        )
        assert [tuple(f.shape) for f in feats] == [(2, c, h, w)] * 4
        last, inter = model.forward_intermediates(x, indices=2, output_fmt="NLC")
        assert last.shape == (2, h * w, c) and [tuple(f.shape) for f in inter] == [(2, h * w, c)] * 2
        assert torch.allclose(
            inter[-1],
            model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)[0],
            atol=1e-5,
        )
        assert model.forward_features(x).shape == (2, h * w, c) and model(x).shape == (2, c)
        mask = torch.zeros(2, h * w, dtype=torch.bool)
        mask[:, ::2] = True
        taps, final = model.forward_masked(x, mask, [0, depth - 1])
        assert [tuple(t.shape) for t in taps] == [(2, h * w, c)] * 2 and final.shape == (2, h * w, c)
    assert isinstance(model.encodes_visible_only, bool)
    with pytest.raises((CdkdValueError, AssertionError), match="divisible by patch size|multiple of the patch size"):
        model.forward_features(torch.randn(1, in_chans, 40, 48))  # timm's own ViT asserts; cdkd's students raise


def test_mixer_is_causal_and_the_block_sees_both_ways() -> None:
    model = tiny("rsmamba_s")
    block = model.blocks[0]
    x = torch.randn(1, 12, model.embed_dim)
    y = x.clone()
    y[:, -1] += torch.randn(model.embed_dim)  # change only the last token (not by a constant: LayerNorm removes it)
    with torch.no_grad():
        assert torch.equal(block.mixer(x)[:, :-1], block.mixer(y)[:, :-1])  # one direction: causal
        # The reversed scan carries the change to every earlier token, the first included.
        assert ((block(x) - block(y)).abs().amax(-1)[0, :-1] > 0).all()
    # The block's reversed path is the forward mixer on the flipped sequence (one shared mixer).
    with torch.no_grad():
        n = block.norm(x)
        want = x + (block.mixer(n) + block.mixer(n.flip(1)).flip(1)) / 2
        torch.testing.assert_close(block(x), want)


def test_masked_patches_are_replaced_by_the_mask_token() -> None:
    model = tiny("rsmamba_s")
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True  # patch (row 1, col 1): pixels 16..31 x 16..31
    y = x.clone()
    y[..., 16:32, 16:32] = torch.randn(3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.forward_masked(x, mask, ())[1], model.forward_masked(y, mask, ())[1])
        assert not torch.allclose(model.forward_masked(x, None, ())[1], model.forward_masked(y, None, ())[1])


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model = tiny("rsmamba_s").train()
        model.set_grad_checkpointing(ckpt)
        model.forward_features(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_ssm_parameters_get_no_weight_decay() -> None:
    from cdkd.train.optim import adamw

    model = tiny("rsmamba_s")
    decayed = {id(p) for p in adamw(model, 1e-4, 0.05).param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert not any(n.endswith(("A_log", ".D")) or "pos_embed" in n or "mask_token" in n for n in names)
    assert any(n.endswith("in_proj.weight") for n in names)


def test_upernet_and_student_artifact_round_trip(tmp_path: Path) -> None:
    from cdkd.artifacts import StudentInfo, load_student, save_student
    from cdkd.data.stats import NormStats
    from cdkd.models.upernet import Segmenter

    model = tiny("rsmamba_s", in_chans=4)
    seg = Segmenter(model, num_classes=5, layers=(1, 2, 3, 4), channels=32).eval()
    with torch.no_grad():
        assert seg(torch.randn(1, 4, 80, 48)).shape == (1, 5, 80, 48)
    norm = NormStats(mean=(0.0,) * 4, std=(1.0,) * 4, bands=(1, 2, 3, 4), dtype="uint8")
    args = dict(TINY_MAMBA, img_size=64, in_chans=4)
    save_student(tmp_path / "student.pt", model, StudentInfo("rsmamba_s", args, norm, {"recipe": "rs4d"}))
    back, info = load_student(tmp_path / "student.pt")
    assert info.arch == "rsmamba_s" and info.in_chans == 4 and info.provenance["recipe"] == "rs4d"
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), model.forward_features(x))


def test_onnx_export_parity(tmp_path: Path) -> None:
    """A tiny rsmamba segmenter exports to opset 17 and ONNX Runtime agrees with PyTorch (the export checks
    >= 99.9 % argmax agreement itself and refuses otherwise); the tile differs from the position embedding's."""
    from cdkd.artifacts import SegmenterInfo, StudentInfo, save_segmenter
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.stats import NormStats
    from cdkd.export.onnx import export_onnx
    from cdkd.models.upernet import Segmenter

    schema = BUILTIN_SCHEMAS["dubai"]
    args = dict(TINY_MAMBA, img_size=64, in_chans=3)
    model = Segmenter(tiny("rsmamba_s"), schema.num_classes, layers=(1, 2, 3, 4), channels=32)
    norm = NormStats(mean=(110.0,) * 3, std=(50.0,) * 3, bands=(1, 2, 3), dtype="uint8")
    info = SegmenterInfo(StudentInfo("rsmamba_s", args, norm, {}), model.config(), schema, tile_size=96, overlap=16)
    save_segmenter(tmp_path / "seg.pt", model.eval(), info)
    report = export_onnx(tmp_path / "seg.pt", tmp_path / "m.onnx", check_tiles=4)
    assert report.opset == 17 and report.parity.agreement >= 0.999
    assert report.parity.max_abs_diff < 1e-3
    assert report.input_shape == (1, 3, 96, 96)
