"""The selective scan: the chunked PyTorch form against the token-by-token reference, and the fused kernel."""

from __future__ import annotations

import pytest
import torch

from cdkd.models.ssm_scan import (
    default_chunk,
    fused_available,
    linear_scan,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)


def _inputs(length: int, batch: int = 2, d: int = 6, n: int = 4, seed: int = 0, big_steps: bool = False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, d, generator=g)
    delta = torch.randn(batch, length, d, generator=g) - 1.0
    if big_steps:  # decays far below e^-88 within a chunk: a ratio/cumsum form would overflow here
        delta = delta + 40.0
    A = -torch.exp(torch.randn(d, n, generator=g))
    B = torch.randn(batch, length, n, generator=g)
    C = torch.randn(batch, length, n, generator=g)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g) * 0.1
    return u, delta, A, B, C, D, bias


def _sequential(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 9, 31, 64, 100])
def test_linear_scan_equals_the_recurrence(length: int) -> None:
    g = torch.Generator().manual_seed(length)
    a, b = torch.rand(2, length, 3, 2, generator=g), torch.randn(2, length, 3, 2, generator=g)
    torch.testing.assert_close(linear_scan(a, b), _sequential(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,chunk", [(1, 8), (7, 8), (8, 8), (9, 8), (30, 8), (64, 16), (50, 16), (37, 5)])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_scan_equals_reference_in_values_and_gradients(length: int, chunk: int, reverse: bool) -> None:
    """Lengths below, at and past a chunk, non-multiples included; reversed = the backward direction of a block."""
    inputs = _inputs(length, seed=length)
    flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)

    def run(fn, **kw):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        u, delta, A, B, C, D, bias = leaves
        y = fn(flip(u), flip(delta), A, flip(B), flip(C), D, delta_bias=bias, delta_softplus=True, **kw)
        y = flip(y)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        # With one token the decay never acts (h[-1] = 0): no gradient reaches A in the chunked form, zero in the loop.
        return y.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]

    y_ref, g_ref = run(selective_scan_ref)
    y, grads = run(selective_scan_chunked, chunk=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(("u", "delta", "A", "B", "C", "D", "bias"), grads, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=name)


def test_exact_when_decays_underflow() -> None:
    """Steps of ~40 with |A| up to ~10 decay by far more than e^-88 per chunk: still exact and finite."""
    u, delta, A, B, C, D, _ = _inputs(40, big_steps=True)
    y = selective_scan_chunked(u, delta, A, B, C, D, delta_softplus=True, chunk=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(u, delta, A, B, C, D, delta_softplus=True), rtol=1e-4, atol=1e-5)


def test_dispatch_and_defaults() -> None:
    u, delta, A, B, C, D, bias = _inputs(20)
    y = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, backend="chunked")
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True), y)
    assert default_chunk(512, 16) == 32 and default_chunk(8, 2) == 256 and default_chunk(4096, 64) == 16
    with pytest.raises(ValueError, match="backend"):
        selective_scan(u, delta, A, B, C, backend="cuda")


def test_bfloat16_inputs_are_scanned_in_float32() -> None:
    u, delta, A, B, C, D, _ = _inputs(24)
    y = selective_scan_chunked(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, chunk=8)
    assert y.dtype == torch.bfloat16
    want = selective_scan_ref(
        u.bfloat16().float(), delta.bfloat16().float(), A, B.bfloat16().float(), C.bfloat16().float(), D
    )
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not fused_available(), reason="needs mamba_ssm's CUDA selective scan and a CUDA device")
def test_fused_kernel_equals_the_pytorch_scan() -> None:
    inputs = [t.cuda() for t in _inputs(300, batch=2, d=64, n=16)]
    u, delta, A, B, C, D, bias = inputs
    kw = dict(delta_bias=bias, delta_softplus=True)
    fused = selective_scan(u, delta, A, B, C, D, backend="fused", **kw)
    chunked = selective_scan(u, delta, A, B, C, D, backend="chunked", **kw)
    torch.testing.assert_close(fused, chunked, rtol=1e-3, atol=1e-3)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    grads = []
    for backend in ("fused", "chunked"):
        for t in leaves:
            t.grad = None
        u, delta, A, B, C, D, bias = leaves
        selective_scan(u, delta, A, B, C, D, backend=backend, **kw).square().sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
