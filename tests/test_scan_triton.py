"""The Triton selective scan against the PyTorch references, in values and gradients.

Without a GPU the kernels run on CPU tensors in Triton's interpreter. Triton 3.8 reads ``TRITON_INTERPRET`` when a
``@triton.jit`` function is decorated (``triton.knobs.runtime.interpret``): its own library functions (``tl.sum``,
``tl.sigmoid``, ...) at ``import triton``, which torchvision and timm already trigger while pytest collects other
test files. So on a CPU-only machine ``test_in_the_triton_interpreter`` runs this file again in a fresh process
with ``TRITON_INTERPRET=1`` set before anything imports triton, and there the kernel tests run; in this process
they skip. With a GPU the kernel tests run here, compiled, on CUDA tensors, plus the CUDA-only ones at model sizes.

Tolerances (float32): values rtol 1e-5, atol 1e-5; gradients rtol 1e-4, atol 1e-4 (the kernel sums in another
order than the token loop; measured differences are ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, TRITON_INTERPRETED, kernel_test, run_interpreted

pytest.importorskip("triton")

from cdkd.models.ssm_scan import selective_scan, selective_scan_chunked, selective_scan_ref  # noqa: E402

INTERPRETED = TRITON_INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"


def test_in_the_triton_interpreter() -> None:
    """This file's kernel tests in a fresh process whose triton is imported with ``TRITON_INTERPRET=1``."""
    run_interpreted(__file__)


def test_kernels_compile_for_the_gpu(tmp_path, monkeypatch) -> None:
    """The interpreter runs the kernels' Python; this runs Triton's compiler on them, down to a cubin for sm_90
    (H100 / H200) with triton's own ptxas, no GPU needed: what the interpreter accepts but the compiler would
    reject (a scan over a 3-D tile, say) fails here. Default block sizes, bf16 inputs."""
    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from cdkd.models.kernels import selective_scan_triton as module

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a fresh compile, not a cached one
    bf16, f32 = "*bf16", "*fp32"
    pointers = {
        module._scan_fwd_kernel: [bf16, bf16, f32, bf16, bf16, f32, f32, bf16, f32],
        module._scan_bwd_kernel: [bf16, bf16, f32, bf16, bf16, f32, f32, f32, f32] + [f32] * 7,
    }
    for kernel, config in ((module._scan_fwd_kernel, module.FORWARD), (module._scan_bwd_kernel, module.BACKWARD)):
        consts = dict(
            HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_L=module.FORWARD[0], BLOCK_D=config[1], BLOCK_N=16
        )
        kinds = iter(pointers[kernel] + ["i32"] * len(kernel.arg_names))
        signature = {n: "constexpr" if n in consts else next(kinds) for n in kernel.arg_names}
        source = ASTSource(
            fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()}
        )
        compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config[2]})
        assert len(compiled.asm["cubin"]) > 1000 and compiled.metadata.shared < 100_000


@pytest.fixture(scope="module")
def kernels():
    from cdkd.models.kernels import selective_scan_triton as module

    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(module._scan_fwd_kernel, InterpretedFunction)
    return module


# Small blocks make the interpreter fast and exercise several chunks and channel blocks, padding included.
SMALL = dict(config_fwd=(8, 4, 1), config_bwd=(8, 4, 1))


def _inputs(
    length: int, batch: int = 2, d: int = 6, n: int = 3, seed: int = 0, big_steps: bool = False, device: str = DEVICE
):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, d, generator=g)
    delta = torch.randn(batch, length, d, generator=g) - 1.0 + (40.0 if big_steps else 0.0)
    A = -torch.exp(torch.randn(d, n, generator=g))
    B = torch.randn(batch, length, n, generator=g)
    C = torch.randn(batch, length, n, generator=g)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g) * 0.1
    return [t.to(device) for t in (u, delta, A, B, C, D, bias)]


def _run(fn, inputs, *, skip: bool = True, bias: bool = True, softplus: bool = True, **kw):
    """y and the gradients of a fixed linear functional of y with respect to every input (None = unused)."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    u, delta, A, B, C, D, b = leaves
    y = fn(u, delta, A, B, C, D if skip else None, delta_bias=b if bias else None, delta_softplus=softplus, **kw)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y.float() * weights).sum().backward()
    return y.detach(), [t.grad for t in leaves]


def _assert_equal(got, want, names=("u", "delta", "A", "B", "C", "D", "bias")):
    (y, grads), (y_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=name)


@kernel_test
@pytest.mark.parametrize("length", [1, 8, 19])
def test_values_and_gradients_equal_the_token_loop(kernels, length: int) -> None:
    """One token, exactly one chunk, and three chunks with a padded tail; 6 channels in blocks of 4, 3 states
    padded to 4."""
    inputs = _inputs(length, seed=length)
    _assert_equal(_run(kernels.selective_scan_triton, inputs, **SMALL), _run(selective_scan_ref, inputs))


@kernel_test
def test_without_skip_bias_or_softplus(kernels) -> None:
    inputs = _inputs(11, seed=3)
    inputs[1] = inputs[1].abs() * 0.5  # steps taken as given must be positive (else the states grow without bound)
    opts = dict(skip=False, bias=False, softplus=False)
    got = _run(kernels.selective_scan_triton, inputs, **opts, **SMALL)
    _assert_equal(got, _run(selective_scan_ref, inputs, **opts))


@kernel_test
def test_strided_views_as_the_mixer_hands_them_over(kernels) -> None:
    """u channel-major (the conv's transpose), delta contiguous, B and C slices of one projection."""
    u, delta, A, B, C, D, bias = _inputs(13, seed=5)
    u_view = u.transpose(1, 2).contiguous().transpose(1, 2)
    dbc = torch.cat([torch.zeros_like(B[..., :2]), B, C], -1)
    n = B.shape[-1]
    views = [u_view, delta, A, dbc[..., 2 : 2 + n], dbc[..., 2 + n :], D, bias]
    assert not views[0].is_contiguous() and not views[3].is_contiguous()
    _assert_equal(_run(kernels.selective_scan_triton, views, **SMALL), _run(selective_scan_ref, views))


@kernel_test
def test_exact_when_decays_underflow(kernels) -> None:
    inputs = _inputs(20, big_steps=True, seed=7)
    got = _run(kernels.selective_scan_triton, inputs, **SMALL)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1])
    _assert_equal(got, _run(selective_scan_ref, inputs))


@kernel_test
def test_bfloat16_inputs_are_scanned_in_float32(kernels) -> None:
    """bf16 in (autocast's dtype): y and each gradient come back in their input's dtype, equal to the float32 scan
    of the same rounded inputs within bf16's resolution of the outputs."""
    inputs = _inputs(10, seed=9)
    half = [t.bfloat16() if i in (0, 1, 3, 4) else t for i, t in enumerate(inputs)]
    y, grads = _run(kernels.selective_scan_triton, half, **SMALL)
    y_ref, grads_ref = _run(selective_scan_ref, [t.float() for t in half])
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [t.dtype for t in half]
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, rtol=2e-2, atol=2e-2)


@kernel_test
def test_dispatch_backend_triton_and_under_torch_compile(kernels) -> None:
    """``selective_scan(backend="triton")`` is this kernel; inside torch.compile it runs eagerly behind a graph
    break (the compiled function's result equals the eager one)."""
    u, delta, A, B, C, D, bias = _inputs(9, seed=11)
    want = selective_scan_chunked(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
    # Default blocks here: one chunk of 16 tokens and one block of 8 channels (shrunk to the problem).
    got = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def scan(u, delta):
        return selective_scan(u * 1.0, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, backend="triton")

    compiled = torch.compile(scan, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(u, delta), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")


@cuda_only
def test_cuda_kernel_equals_the_chunked_scan_at_model_sizes(kernels) -> None:
    """RSMamba-S's mixer sizes (d_inner 512, d_state 16), 1000 tokens, default blocks."""
    inputs = _inputs(1000, batch=2, d=512, n=16, seed=13)
    got = _run(kernels.selective_scan_triton, inputs)
    want = _run(selective_scan_chunked, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for name, g, g_ref in zip(("u", "delta", "A", "B", "C", "D", "bias"), got[1], want[1]):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3 * g_ref.abs().max().item(), msg=name)


@cuda_only
def test_cuda_rsmamba_dispatches_to_a_fused_kernel() -> None:
    """``auto`` on CUDA: the mixer's output and gradients equal the chunked form's (the model's own layout)."""
    from cdkd.models.student import build_student

    torch.manual_seed(0)
    model = build_student("rsmamba_test", img_size=64).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    outs = []
    for backend in ("auto", "chunked"):
        for blk in model.blocks:
            blk.mixer.scan_backend = backend
        model.zero_grad()
        y = model.forward_features(x)
        y.square().mean().backward()
        outs.append((y.detach(), model.blocks[0].mixer.A_log.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-3, atol=1e-5)
