"""Segmentation decoders on the students: pyramid/head shapes (odd and non-square grids), freezing, config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from cdkd.errors import CdkdValueError
from cdkd.models.student import build_student
from cdkd.models.upernet import LinearHead, Segmenter, UPerHead, ViTNeck, count_parameters

ARCHS = ("vit_s", "vit_s_win")
K = 5
SMALL_CHANNELS = 64  # a narrow UPerHead keeps the CPU tests fast; the default 512 is checked once


@pytest.fixture(scope="module", params=ARCHS)
def student(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(request.param, img_size=64)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- building blocks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (7, 7), (25, 25), (5, 8)])
def test_neck_pyramid_strides_4_8_16_32(grid):
    h, w = grid
    neck = ViTNeck(32).eval()
    feats = [torch.randn(2, 32, h, w) for _ in range(4)]
    out = neck(feats)
    ceil = lambda n: -(-n // 2)  # noqa: E731
    assert [tuple(o.shape) for o in out] == [
        (2, 32, 4 * h, 4 * w),
        (2, 32, 2 * h, 2 * w),
        (2, 32, h, w),
        (2, 32, ceil(h), ceil(w)),
    ]
    assert out[2] is feats[2]  # the stride-16 level is the map itself


def test_neck_needs_four_maps():
    with pytest.raises(CdkdValueError, match="4 feature maps"):
        ViTNeck(32)([torch.randn(1, 32, 4, 4)] * 3)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_uperhead_logits_at_finest_level_odd_pyramid(norm):
    head = UPerHead([32, 32, 32, 32], num_classes=K, channels=64, norm=norm).eval()
    feats = [torch.randn(2, 32, s, s) for s in (100, 50, 25, 13)]  # a 400 px tile's pyramid
    assert head(feats).shape == (2, K, 100, 100)


def test_uperhead_uses_bias_free_convs_and_chosen_norm():
    head = UPerHead([32] * 4, num_classes=K, channels=64, norm="gn")
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d) and m is not head.classifier]
    assert convs and all(c.bias is None for c in convs)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules())
    with pytest.raises(CdkdValueError, match="divisible by 32"):
        UPerHead([32] * 4, num_classes=K, channels=48, norm="gn")


def test_linear_head_stride_16():
    head = LinearHead([32] * 4, num_classes=K).eval()
    assert head([torch.randn(2, 32, 7, 5) for _ in range(4)]).shape == (2, K, 7, 5)


# --- Segmenter ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (112, 112), (64, 96), (80, 112)])
def test_upernet_logits_at_input_resolution(student, size):
    """4x4, 6x6, 7x7 (odd: 7 -> 4 at stride 32), 4x6 and 5x7 token grids."""
    seg = Segmenter(student, num_classes=K, channels=SMALL_CHANNELS).eval()
    with torch.no_grad():
        out = seg(images(2, *size))
    assert out.shape == (2, K, *size)
    assert torch.isfinite(out).all()


def test_upernet_default_width(student):
    seg = Segmenter(student, num_classes=K).eval()
    assert seg.head.fpn_bottleneck[0].out_channels == 512
    with torch.no_grad():
        assert seg(images(1, 64, 64)).shape == (1, K, 64, 64)


def test_linear_head_segmenter(student):
    seg = Segmenter(student, num_classes=K, head="linear").eval()
    x = images(2, 64, 96)
    with torch.no_grad():
        feats = seg.features(x)
        assert [tuple(f.shape) for f in feats] == [(2, 384, 4, 6)] * 4
        assert seg.head(seg.neck(feats)).shape == (2, K, 4, 6)  # stride 16 before the upsampling
        assert seg(x).shape == (2, K, 64, 96)


def test_features_are_the_requested_blocks(student):
    """layers are 1-based: layer 3 is the encoder's block index 2, with the final LayerNorm (DINOv2)."""
    seg = Segmenter(student, num_classes=K, channels=SMALL_CHANNELS).eval()
    x = images(1, 64, 64)
    with torch.no_grad():
        ref = student.forward_intermediates(x, indices=[2, 5, 8, 11], norm=True, intermediates_only=True)
        for got, want in zip(seg.features(x), ref):
            torch.testing.assert_close(got, want)


def test_frozen_encoder_no_grads_stays_eval():
    torch.manual_seed(0)
    encoder = build_student("vit_s", img_size=64, drop_path_rate=0.5)  # drop path would make train() visible
    seg = Segmenter(encoder, num_classes=K, channels=SMALL_CHANNELS)
    seg.train()
    assert seg.training and seg.head.training and seg.neck.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    x = images(2, 64, 64)
    f1, f2 = seg.features(x), seg.features(x)
    assert not any(f.requires_grad for f in f1)
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b)  # deterministic: no drop path in the frozen encoder

    target = torch.randint(0, K, (2, 64, 64))
    torch.nn.functional.cross_entropy(seg(x), target).backward()
    assert all(p.grad is None for p in encoder.parameters())
    decoder = [p for n, p in seg.named_parameters() if not n.startswith("encoder.")]
    assert all(p.grad is not None for p in decoder)
    assert count_parameters(seg, trainable_only=True) == sum(p.numel() for p in decoder)
    assert count_parameters(seg) == count_parameters(encoder) + sum(p.numel() for p in decoder)


def test_unfrozen_encoder_trains():
    torch.manual_seed(0)
    encoder = build_student("vit_s_win", img_size=64)
    seg = Segmenter(encoder, num_classes=K, head="linear", freeze_encoder=False)
    seg.train()
    assert encoder.training
    target = torch.randint(0, K, (2, 64, 64))
    torch.nn.functional.cross_entropy(seg(images(2, 64, 64)), target).backward()
    assert encoder.blocks[0].attn.qkv.weight.grad is not None
    assert encoder.patch_embed.proj.weight.grad is not None
    assert count_parameters(seg, trainable_only=True) == count_parameters(seg)


def test_groupnorm_trains_with_batch_of_one():
    """BatchNorm cannot normalise the PPM's 1x1 map of a single image in training; GroupNorm can."""
    torch.manual_seed(0)
    seg = Segmenter(build_student("vit_s", img_size=64), num_classes=K, channels=SMALL_CHANNELS, norm="gn").train()
    out = seg(images(1, 64, 64))
    out.mean().backward()
    assert out.shape == (1, K, 64, 64)


@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_config_round_trip_loads_strictly(head):
    torch.manual_seed(0)
    encoder = build_student("vit_s", img_size=64)
    layers = (3, 6, 9, 12) if head == "upernet" else (12,)
    seg = Segmenter(encoder, num_classes=K, head=head, layers=layers, channels=SMALL_CHANNELS, norm="bn")
    seg.train()
    with torch.no_grad():
        seg(images(2, 64, 64))  # move the BatchNorm statistics away from their initial values
    cfg = json.loads(json.dumps(seg.config()))  # plain types only
    assert cfg["head"] == head and cfg["layers"] == list(layers) and cfg["num_classes"] == K

    torch.manual_seed(1)
    rebuilt = Segmenter(build_student("vit_s", img_size=64), **cfg)
    rebuilt.load_state_dict(seg.state_dict(), strict=True)
    x = images(2, 64, 64, seed=3)
    seg.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), seg(x))

    # the decoder alone moves too, onto the same encoder weights
    head_only = Segmenter(encoder, **cfg)
    head_only.load_head_state_dict(seg.head_state_dict())
    assert not any(k.startswith("encoder.") for k in seg.head_state_dict())
    head_only.eval()
    with torch.no_grad():
        torch.testing.assert_close(head_only(x), seg(x))


def test_load_head_state_dict_rejects_other_heads():
    encoder = build_student("vit_s", img_size=64)
    linear = Segmenter(encoder, num_classes=K, head="linear")
    upernet = Segmenter(encoder, num_classes=K, channels=SMALL_CHANNELS)
    with pytest.raises(CdkdValueError, match="does not match"):
        upernet.load_head_state_dict(linear.head_state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=(0, 3, 6, 9)), r"out of range.*1\.\.12"),
        (dict(layers=(3, 6, 9, 13)), r"out of range.*1\.\.12"),
        (dict(layers=(3, 6, 9)), "exactly 4 layers"),
        (dict(layers=(6, 3, 9, 12)), "strictly increasing"),
        (dict(layers=(3, 3, 9, 12)), "strictly increasing"),
        (dict(head="linear", layers=()), "at least one"),
        (dict(head="fcn"), "unknown head"),
        (dict(norm="ln"), "unknown norm"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_arguments(student, kwargs, match):
    encoder = student  # validation happens before the encoder is touched
    args = dict(num_classes=K, channels=SMALL_CHANNELS)
    with pytest.raises(CdkdValueError, match=match):
        Segmenter(encoder, **{**args, **kwargs})


def test_encoder_without_contract():
    with pytest.raises(CdkdValueError, match="forward_intermediates"):
        Segmenter(torch.nn.Linear(3, 3), num_classes=K)


@pytest.mark.parametrize("shape", [(1, 3, 70, 64), (1, 3, 64, 72)])
def test_input_not_multiple_of_patch(student, shape):
    seg = Segmenter(student, num_classes=K, channels=SMALL_CHANNELS).eval()
    with pytest.raises(CdkdValueError, match="multiple of the patch size 16"):
        seg(torch.randn(*shape))


def test_input_must_be_a_batch(student):
    seg = Segmenter(student, num_classes=K, channels=SMALL_CHANNELS).eval()
    with pytest.raises(CdkdValueError, match=r"\(B, C, H, W\)"):
        seg(torch.randn(3, 64, 64))
