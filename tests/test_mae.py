"""Masking, pixel targets and the reconstruction decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdkd.models.mae import MAEDecoder, PatchMasker, patchify, random_patch_mask, reconstruction_loss


def test_mask_ratio_is_exact_and_masks_are_fresh() -> None:
    rng = np.random.default_rng(0)
    masks = [random_patch_mask(64 * 64, 0.75, rng) for _ in range(20)]
    assert all(m.sum() == 3072 for m in masks)
    # A fixed stride-2 grid allows only 4 masks; fresh random masks essentially never repeat.
    assert len({m.tobytes() for m in masks}) == 20
    # every patch gets masked sometimes and left visible sometimes: no positional bias
    freq = np.mean(masks, axis=0)
    assert 0.5 < freq.mean() < 1.0 and freq.min() >= 0.0
    many = np.mean([random_patch_mask(16, 0.75, rng) for _ in range(2000)], axis=0)
    assert np.allclose(many, 0.75, atol=0.05)


def test_masker_sizes_and_bad_ratio() -> None:
    m = PatchMasker(64, 0.75)(np.random.default_rng(1))
    assert m.shape == (16,) and m.sum() == 12
    with pytest.raises(ValueError):
        random_patch_mask(16, 1.0, np.random.default_rng(0))


def test_patchify_order() -> None:
    img = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    p = patchify(img, 16)
    assert p.shape == (2, 6, 16 * 16 * 3)
    # patch 4 is row 1, column 1; its first value is pixel (16, 16) of channel 0
    assert p[1, 4, 0] == img[1, 0, 16, 16]
    assert p[1, 4, 1] == img[1, 1, 16, 16]  # channels innermost
    assert p[1, 4, 3] == img[1, 0, 16, 17]


def test_loss_counts_masked_and_valid_patches_only() -> None:
    torch.manual_seed(0)
    img = torch.randn(1, 3, 32, 32)
    target = patchify(img)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    perfect = (target - mean) / (var + 1e-6) ** 0.5
    mask = torch.tensor([[True, True, False, False]])
    pred = perfect.clone()
    pred[0, 2:] += 10.0  # errors on visible patches must not count
    assert reconstruction_loss(pred, img, mask) < 1e-8
    pred[0, 1] += 1.0
    assert torch.isclose(reconstruction_loss(pred, img, mask), torch.tensor(0.5))
    valid = torch.tensor([[True, False, True, True]])  # patch 1 is padding: excluded
    assert reconstruction_loss(pred, img, mask, valid=valid) < 1e-8


def test_decoder_shapes_and_fill() -> None:
    dec = MAEDecoder(in_dim=48, dim=32, depth=1, num_heads=4, out_chans=4)
    tokens = torch.randn(2, 12, 48)
    fill = torch.zeros(2, 12, dtype=torch.bool)
    fill[:, :9] = True
    out = dec(tokens, (3, 4), fill=fill)
    assert out.shape == (2, 12, 16 * 16 * 4)
    # filled positions ignore what the encoder put there
    tokens2 = tokens.clone()
    tokens2[:, :9] = 123.0
    assert torch.allclose(dec(tokens2, (3, 4), fill=fill), out, atol=1e-5)
    no_fill = MAEDecoder(in_dim=48, dim=32, depth=1, num_heads=4, fills_masked=False)
    assert no_fill.mask_token is None
    with pytest.raises(ValueError):
        no_fill(tokens, (3, 4), fill=fill)
