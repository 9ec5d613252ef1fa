"""The SAM + MMoA teacher: identical to SAM at initialisation, gates, freezing, checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry

from cdkd.config import TeacherConfig
from cdkd.errors import CheckpointError
from cdkd.models.mmoa import MMoA, StreamGate
from cdkd.models.teacher import MMoATeacher, build_sam_encoder, default_teacher_taps


def _randomised_sam_b() -> torch.nn.Module:
    """SAM vit_b with random weights, including the position and relative-position embeddings SAM zero-inits."""
    torch.manual_seed(0)
    enc = sam_model_registry["vit_b"](checkpoint=None).image_encoder
    with torch.no_grad():
        enc.pos_embed.normal_(0, 0.02)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.05)
            blk.attn.rel_pos_w.normal_(0, 0.05)
    return enc


def _sam_block_outputs(enc: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    t = enc.patch_embed(x)
    pe = enc.pos_embed
    if pe.shape[1:3] != t.shape[1:3]:
        pe = F.interpolate(pe.permute(0, 3, 1, 2), size=t.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
    t = t + pe
    outs = []
    for blk in enc.blocks:
        t = blk(t)
        outs.append(t.flatten(1, 2))
    return outs


@pytest.mark.parametrize("adapter,fusion", [("multi", "gate"), ("single", "gate"), ("multi", "add")])
def test_teacher_at_init_reproduces_sam(adapter: str, fusion: str) -> None:
    enc = _randomised_sam_b()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = _sam_block_outputs(enc, x)
        teacher = MMoATeacher(enc, TeacherConfig(variant="vit_b", random_init=True, adapter=adapter, fusion=fusion))
        feats, last = teacher.forward_masked(x, None, range(12))
    assert len(feats) == 12
    for r, f in zip(ref, feats):
        rel = float((r - f).norm() / r.norm())
        assert rel < 1e-3
    assert torch.allclose(last, ref[-1], atol=1e-4, rtol=1e-4)


def test_teacher_adapters_change_output_once_trained() -> None:
    """The identity at init is not a dead path: non-zero up-projections change every later block."""
    enc = _randomised_sam_b()
    x = torch.randn(1, 3, 64, 64)
    teacher = MMoATeacher(enc, TeacherConfig(variant="vit_b", random_init=True))
    with torch.no_grad():
        before = teacher.forward_masked(x, None, [11])[1]
        for blk in teacher.blocks:
            for a in blk.mmoa.adapters:
                a.up.weight.normal_(0, 0.05)
        after = teacher.forward_masked(x, None, [11])[1]
    assert float((before - after).norm() / before.norm()) > 1e-3


def test_only_adapters_gates_and_mask_token_train() -> None:
    teacher = MMoATeacher(_randomised_sam_b(), TeacherConfig(variant="vit_b", random_init=True, adapter_blocks=(1, 12)))
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert "mask_token" in trainable
    assert all(n == "mask_token" or ".mmoa." in n for n in trainable)
    assert not any(".mmoa.mlp." in n for n in trainable)  # SAM's FFN stays frozen
    adapted = {int(n.split(".")[1]) for n in trainable if n.startswith("blocks.")}
    assert adapted == {0, 11}
    assert set(teacher.trainable_state_dict()) == trainable


def test_gate_weights_sum_to_one_and_gradients_reach_gate() -> None:
    torch.manual_seed(0)
    dim = 32
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))
    mmoa = MMoA(mlp, dim, bottleneck=8, gate_dim=16)
    with torch.no_grad():  # leave the initial state so the gate sees distinct streams
        for a in mmoa.adapters:
            a.up.weight.normal_(0, 0.1)
        mmoa.gate.query.weight.normal_(0, 0.1)
    h = torch.randn(2, 6, 6, dim)
    streams, w = mmoa.stream_weights(h)
    assert w.shape == (2, 6, 6, 3)
    assert torch.allclose(w.sum(-1), torch.ones(2, 6, 6), atol=1e-6)
    assert (w > 0).all() and not torch.allclose(w[..., 0], w[..., 1])
    mmoa(h).square().mean().backward()
    assert mmoa.gate.query.weight.grad is not None and mmoa.gate.query.weight.grad.abs().sum() > 0


def test_gate_starts_uniform_and_mixture_is_exactly_ffn() -> None:
    gate = StreamGate(16, 8)
    h = torch.randn(1, 4, 4, 16)
    w = gate(h, [torch.randn(1, 4, 4, 16) for _ in range(3)])
    assert torch.allclose(w, torch.full_like(w, 1 / 3))
    mlp = torch.nn.Linear(16, 16)
    mmoa = MMoA(mlp, 16, bottleneck=4, gate_dim=8)
    assert torch.allclose(mmoa(h), mlp(h), atol=1e-6)


def test_masked_positions_use_mask_token() -> None:
    teacher = MMoATeacher(_randomised_sam_b(), TeacherConfig(variant="vit_b", random_init=True))
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    t = teacher.embed(x, mask)
    clean = teacher.embed(x)
    pe = teacher._pos_embed(4, 4)
    assert torch.allclose(t[0, 1, 1], teacher.mask_token[0, 0, 0] + pe[0, 1, 1])
    assert torch.allclose(t.flatten(1, 2)[0, ~mask[0]], clean.flatten(1, 2)[0, ~mask[0]])


def test_default_taps_are_first_global_blocks() -> None:
    assert default_teacher_taps("vit_l") == (6, 12, 18)
    assert default_teacher_taps("vit_b") == (3, 6, 9)
    assert default_teacher_taps("vit_h") == (8, 16, 24)


def test_missing_checkpoint_says_where_to_get_one(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="segment-anything#model-checkpoints") as e:
        build_sam_encoder("vit_l", tmp_path / "sam_vit_l.pth")
    assert "sam_vit_l.pth" in str(e.value)
    with pytest.raises(CheckpointError, match="--random-teacher"):
        build_sam_encoder("vit_l", None)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "sam.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_sam_encoder("vit_b", bad)


def test_full_and_encoder_only_checkpoints_load_and_wrong_variant_is_named(tmp_path) -> None:
    torch.manual_seed(1)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    with torch.no_grad():
        sam.image_encoder.pos_embed.normal_()
    full, enc_only = tmp_path / "full.pth", tmp_path / "enc.pth"
    torch.save(sam.state_dict(), full)
    torch.save(sam.image_encoder.state_dict(), enc_only)
    for path in (full, enc_only):
        enc = build_sam_encoder("vit_b", path)
        assert torch.equal(enc.pos_embed, sam.image_encoder.pos_embed)
    with pytest.raises(CheckpointError, match="vit_b checkpoint, but the teacher is vit_l"):
        build_sam_encoder("vit_l", full)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        teacher = MMoATeacher(
            _randomised_sam_b(),
            TeacherConfig(variant="vit_b", random_init=True, adapter_dim=8, grad_checkpointing=ckpt),
        ).train()
        with torch.no_grad():
            for blk in teacher.blocks:
                for a in blk.mmoa.adapters:
                    a.up.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
        teacher.forward_masked(x, None, [5])[1].square().mean().backward()
        grads.append(teacher.blocks[0].mmoa.adapters[0].down.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_vit_t_and_timm_contract_let_a_decoder_sit_on_the_teacher(tmp_path) -> None:
    """The small SAM-architecture variant loads from its own checkpoint, and the teacher speaks
    forward_intermediates, so the UPerNet segmenter fits it (bench/transfer.py relies on both)."""
    from cdkd.models.upernet import Segmenter

    torch.manual_seed(0)
    enc = build_sam_encoder("vit_t", random_init=True)
    path = tmp_path / "vit_t.pth"
    torch.save(enc.state_dict(), path)
    loaded = build_sam_encoder("vit_t", path)
    assert torch.equal(loaded.blocks[3].mlp.lin1.weight, enc.blocks[3].mlp.lin1.weight)
    assert default_teacher_taps("vit_t") == (2, 4, 6)
    teacher = MMoATeacher(loaded, TeacherConfig(variant="vit_t", random_init=True))
    x = torch.randn(1, 3, 64, 64)
    feats = teacher.forward_intermediates(x, indices=[1, 3], stop_early=True)
    ref, _ = teacher.forward_masked(x, None, [1, 3])
    assert [f.shape for f in feats] == [(1, 256, 4, 4)] * 2
    assert torch.allclose(feats[1].permute(0, 2, 3, 1).flatten(1, 2), ref[1])
    seg = Segmenter(teacher, num_classes=4, layers=(2, 4, 6, 8), channels=32, feature_norm=False).eval()
    assert seg(x).shape == (1, 4, 64, 64)
