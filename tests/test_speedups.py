"""Distillation's GPU settings, checked where the CPU can: FLOP counting against an analytic count, fused AdamW
against the multi-tensor one, compiled blocks and channels-last convolutions computing the same as before."""

from __future__ import annotations

import copy

import pytest
import torch

from cdkd.config import TeacherConfig, TrainConfig
from cdkd.errors import CdkdValueError
from cdkd.models.mmoa import MMoA
from cdkd.models.speedups import apply_speedups, channels_last_convs, compile_blocks, resolve_compile
from cdkd.models.student import ViTStudent
from cdkd.models.teacher import build_teacher
from cdkd.train.optim import adamw, check_train_config
from cdkd.utils.flops import count_flops


def _vit_flops(batch: int, tokens: int, dim: int, depth: int, patch_in: int) -> tuple[int, int]:
    """Forward FLOPs of a ViT without class token or head: (patch embedding, blocks); a multiply-add = 2."""
    patch = 2 * batch * tokens * dim * patch_in
    per_block = 2 * batch * tokens * dim * (3 * dim + dim + 4 * dim + 4 * dim)  # qkv, proj, mlp fc1 and fc2
    per_block += 2 * 2 * batch * tokens * tokens * dim  # q k^T and attn v over all heads
    return patch, depth * per_block


def test_flop_count_of_a_small_vit_equals_its_analytic_count() -> None:
    """64 px, patch 16 (16 tokens), width 64, 4 heads, 2 blocks, batch 2. Backward: every product twice more, except
    the patch embedding, whose input (the image) needs no gradient: only its weight gradient."""
    torch.manual_seed(0)
    model = ViTStudent(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0)
    x = torch.randn(2, 3, 64, 64)
    patch, blocks = _vit_flops(batch=2, tokens=16, dim=64, depth=2, patch_in=3 * 16 * 16)
    assert count_flops(lambda: model.forward_features(x)) == patch + blocks
    assert count_flops(lambda: model.forward_features(x).square().sum().backward()) == 2 * patch + 3 * blocks


def test_fused_adamw_on_cuda_only_and_equal_to_the_foreach_form() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    default, fused = adamw(model, 1e-2, 0.05), adamw(twin, 1e-2, 0.05, fused=True)
    assert not default.defaults.get("fused") and fused.defaults["fused"]  # None = fused only for CUDA parameters
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    x = torch.randn(32, 8)
    for _ in range(3):
        for m, opt in ((model, default), (twin, fused)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_speedups_keep_parameter_names_and_outputs() -> None:
    """Blocks compiled in place (the eager backend here, to stay fast) and the adapters' convolutions in
    channels-last memory: same state-dict keys, same image embedding."""
    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig(variant="vit_t", random_init=True, adapter_blocks=(1, 2)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = teacher(x)
    keys = list(teacher.state_dict())
    assert channels_last_convs(teacher, within=MMoA) == 2 * 2 * 8  # 2 blocks x 2 adapters x 8 convolutions
    assert compile_blocks(teacher, backend="eager") == 8
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), want, rtol=1e-5, atol=1e-5)
    assert list(teacher.state_dict()) == keys


def test_adapter_convolutions_stay_channels_last_on_cuda(monkeypatch) -> None:
    """On CUDA every adapter convolution reads a channels-last input (SAM's grid is (B, H, W, C) in memory; no
    flip to NCHW inside the adapter), with the same values as the CPU's plain concatenation. Run on the CPU by
    taking the CUDA branch (``is_cuda`` patched), since CPU convolutions honour the layout too."""
    from cdkd.models.mmoa import MultiScaleAdapter

    torch.manual_seed(0)
    adapter = MultiScaleAdapter(32, 16, (1, 3, 5))
    h = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        want = adapter(h)
    convs = [m for m in adapter.modules() if isinstance(m, torch.nn.Conv2d)]
    layouts = []
    hooks = [
        m.register_forward_hook(
            lambda m, inp, out: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last))
        )
        for m in convs
    ]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        got = adapter(h)
    monkeypatch.undo()
    for hook in hooks:
        hook.remove()
    assert len(layouts) == len(convs) == 8 and all(layouts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_speedups_do_nothing_on_the_cpu_by_default() -> None:
    teacher = build_teacher(TeacherConfig(variant="vit_t", random_init=True, adapter_blocks=(1,)))
    assert apply_speedups(teacher, torch.device("cpu")) == {"compiled_blocks": 0, "channels_last_convs": 0}
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile("on", torch.device("cpu")) and not resolve_compile("off", torch.device("cuda"))
    with pytest.raises(CdkdValueError, match="compile"):
        check_train_config(TrainConfig(compile="yes"))
