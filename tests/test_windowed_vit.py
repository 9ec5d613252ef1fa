"""The windowed student ``WindowedViT``: shapes, locality, padding and the timm contract.

The strongest checks compare against ``reference_features``, a deliberately naive implementation written here:
row-major tokens, explicit per-window slicing (border windows simply come out smaller) and softmax attention
written out, on the model's own weights. It shares no code with the window-major/padding/mask machinery it checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from cdkd.models import windowed_vit
from cdkd.models.windowed_vit import WindowedViT

SMALL = dict(embed_dim=32, depth=4, num_heads=4, global_blocks=(1, 3))


def small(img_size: int = 160, window_size: int = 4, **kw) -> WindowedViT:
    torch.manual_seed(0)
    return WindowedViT(img_size=img_size, window_size=window_size, **{**SMALL, **kw}).eval()


def naive_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm Attention's maths, spelt out: x (B, T, C) -> (B, T, C)."""
    b, n, c = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))


def reference_features(m: WindowedViT, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every block's output and then the final normed tokens, each (B, N, C) row-major."""
    t = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=m.patch_size).permute(0, 2, 3, 1)
    b, h, w, c = t.shape
    if mask is not None:
        t = torch.where(mask.view(b, h, w, 1), m.mask_token.view(1, 1, 1, c), t)
    t = t + m.position_embedding(h, w)  # timm's resampling; checked against timm's own ViT below
    ws = m.window_size
    outs = []
    for i, blk in enumerate(m.blocks):
        y = blk.norm1(t)
        if i in m.global_blocks:
            a = naive_attention(blk.attn, y.reshape(b, h * w, c)).view(b, h, w, c)
        else:
            a = torch.empty_like(y)
            for r in range(0, h, ws):
                for s in range(0, w, ws):
                    win = y[:, r : r + ws, s : s + ws]  # border windows are just smaller
                    a[:, r : r + ws, s : s + ws] = naive_attention(blk.attn, win.flatten(1, 2)).view(win.shape)
        t = t + a
        t = t + blk.mlp(blk.norm2(t))
        outs.append(t.reshape(b, h * w, c))
    outs.append(m.norm(outs[-1]))
    return outs


@pytest.fixture(scope="module")
def vit_s_win() -> WindowedViT:
    torch.manual_seed(0)
    return WindowedViT(img_size=224).eval()  # real ViT-S dims; the 14x14 base grid is resampled for other sizes


@pytest.mark.parametrize("hw", [(64, 64), (96, 96), (160, 160), (288, 288), (224, 352)])
def test_output_shapes_full_size_model(vit_s_win, hw):
    # ws 16: grids up to 16 are one window; 18x18 and 14x22 are padded to whole windows.
    m = vit_s_win
    x = torch.randn(1, 3, *hw)
    with torch.inference_mode():
        f = m.forward_features(x)
        assert f.shape == (1, hw[0] * hw[1] // 256, 384)
        assert m(x).shape == (1, 384)
        assert torch.isfinite(f).all()
        inter = m.forward_intermediates(x, indices=[2, 11], intermediates_only=True)
        assert [t.shape for t in inter] == [(1, 384, hw[0] // 16, hw[1] // 16)] * 2
    assert m.embed_dim == m.num_features == 384 and m.patch_size == 16 and m.depth == 12
    assert m.encodes_visible_only is False and m.mask_token.shape == (1, 1, 384)


@pytest.mark.parametrize(("hw", "window"), [((160, 160), 4), ((160, 160), 3), ((96, 160), 4), ((128, 128), 4)])
def test_matches_naive_reference(hw, window):
    # 10x10 grid with ws 4 -> windows of 4, 4, 2 (padded grid + key masks); ws 3 -> 3, 3, 3, 1; 6x10; 8x8 exact.
    m = small(img_size=128, window_size=window)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = reference_features(m, x)
        final, inter = m.forward_intermediates(x, output_fmt="NLC")
    for got, want in zip(inter + [final], ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_mask_is_what_keeps_padding_out(monkeypatch):
    """The reference comparison can fail: without the key masks, padded tokens leak into real ones."""
    m = small(window_size=4)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        want = reference_features(m, x)[-1]
        monkeypatch.setattr(windowed_vit.WindowLayout, "window_mask", lambda self, batch: None)
        original_init = windowed_vit.WindowLayout.__init__

        def unmasked_init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.global_keys = None

        monkeypatch.setattr(windowed_vit.WindowLayout, "__init__", unmasked_init)
        got = m.forward_features(x)
    assert (got - want).abs().max() > 1e-3


def test_global_blocks_ignore_the_window_padding():
    # All-global: the window-major order is only a permutation, so a padded layout (10x10 grid, ws 3 -> 12x12)
    # must give exactly the unpadded result (ws 10: one 10x10 window, nothing padded).
    padded = small(window_size=3, global_blocks=range(4))
    exact = small(window_size=10, global_blocks=range(4))
    exact.load_state_dict(padded.state_dict())
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(padded.forward_features(x), exact.forward_features(x), atol=1e-5, rtol=1e-5)


def test_equals_timm_vit_when_all_blocks_are_global():
    """Same weight names and maths as timm's ViT (no class token), position resampling included."""
    m = small(img_size=128, global_blocks=range(4))
    timm_vit = VisionTransformer(
        img_size=128,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=4,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        num_classes=0,
        dynamic_img_size=True,
    ).eval()
    sd = {k: v for k, v in m.state_dict().items() if k != "mask_token"}
    timm_vit.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for size in (128, 96):
            x = torch.randn(1, 3, size, size)
            torch.testing.assert_close(m.forward_features(x), timm_vit.forward_features(x), atol=1e-5, rtol=1e-5)


def _changed_tokens(m: WindowedViT, x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: which output tokens of block 0 change when one input patch changes."""
    x2 = x.clone()
    r, c = patch
    x2[:, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += 1.0
    with torch.no_grad():
        a = m.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        b = m.forward_intermediates(x2, indices=[0], intermediates_only=True)[0]
    return (a - b).abs().amax(dim=(0, 1)) > 1e-6


def test_window_attention_is_local():
    m = small(window_size=4, depth=1, global_blocks=())
    x = torch.randn(1, 3, 160, 160)  # 10x10 grid: windows rows/cols [0,4) [4,8) [8,10)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(_changed_tokens(m, x, (5, 6)), expected)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[8:, 8:] = True  # a border window, only 2x2 real tokens
    assert torch.equal(_changed_tokens(m, x, (9, 9)), expected)


def test_global_attention_is_global():
    m = small(window_size=4, depth=1, global_blocks=(0,))
    assert _changed_tokens(m, torch.randn(1, 3, 160, 160), (5, 6)).all()


def test_forward_intermediates_contract():
    m = small()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=2, norm=True)
        assert [t.shape for t in inter] == [(2, 32, 6, 10)] * 2
        # the last block's normed intermediate is forward_features, NCHW vs NLC
        torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), final)
        torch.testing.assert_close(final, m.forward_features(x))
        only = m.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert isinstance(only, list) and [t.shape for t in only] == [(2, 60, 32)] * 2
        assert len(m.forward_intermediates(x, intermediates_only=True)) == 4
        torch.testing.assert_close(m.forward_head(final), m(x))
        torch.testing.assert_close(m(x), final.mean(1))


def test_forward_masked_equals_manual_mask_token_swap():
    m = small()
    x = torch.randn(2, 3, 160, 160)
    mask = torch.rand(2, 100) < 0.5

    def swap(module, inputs, out):  # patch embeddings (B, h, w, C) -> mask token where masked
        return torch.where(mask.view(2, 10, 10, 1), m.mask_token.view(1, 1, 1, -1), out)

    with torch.no_grad():
        taps, final = m.forward_masked(x, mask, taps=[0, 2])
        ref = reference_features(m, x, mask)
        handle = m.patch_embed.register_forward_hook(swap)
        manual_final, manual = m.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")
        handle.remove()
        unmasked_taps, _ = m.forward_masked(x, None, taps=[0, 2])
    for got, want in zip(taps + [final], manual + [manual_final]):
        torch.testing.assert_close(got, want)
    for got, want in zip(taps + [final], [ref[0], ref[2], ref[-1]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked_taps[0], taps[0])


def test_in_chans_4():
    m = small(in_chans=4)
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 4, 64, 96)).shape == (1, 24, 32)


def test_gradient_reaches_every_parameter():
    m = small(drop_path_rate=0.1).train()
    m.set_grad_checkpointing(True)  # the recompute path must keep every gradient too
    x = torch.randn(2, 3, 160, 160)
    mask = torch.rand(2, 100) < 0.5
    taps, final = m.forward_masked(x, mask, taps=[1])
    (taps[0].pow(2).mean() + final.pow(2).mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bad_inputs_raise_value_error():
    m = small()
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        m(torch.randn(1, 3, 100, 160))
    with pytest.raises(ValueError, match="mask shape"):
        m.forward_masked(torch.randn(1, 3, 160, 160), torch.zeros(1, 99, dtype=torch.bool), taps=[0])
    with pytest.raises(ValueError, match="taps"):
        m.forward_masked(torch.randn(1, 3, 160, 160), None, taps=[4])
    with pytest.raises(ValueError, match="global_blocks"):
        WindowedViT(depth=4, global_blocks=(4,))
