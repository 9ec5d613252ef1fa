"""The selective scan of Mamba (S6): a chunked, parallel form in plain PyTorch, its sequential reference, and the
fused kernels for CUDA (``mamba_ssm``'s where installed, else cdkd's Triton kernel).

For every channel d and state n the scan runs the first-order linear recurrence (Gu & Dao 2023, eq. 2a-2b)::

    h[t] = exp(delta[t, d] * A[d, n]) * h[t-1] + delta[t, d] * B[t, n] * u[t, d]        (h[-1] = 0)
    y[t, d] = sum_n C[t, n] * h[t, n] + D[d] * u[t, d]

``A`` is diagonal and differs per (d, n), so unlike Mamba-2's SSD (a scalar decay per head) the decays do not
factor out of the sum over states: any exact non-fused form touches (L, D, N) numbers. This module keeps that to a
few passes and bounds the memory:

* **Within a chunk** of ``Q`` tokens the recurrence is an associative scan over the pairs (a, b) with
  (a1, b1) then (a2, b2) = (a2 * a1, a2 * b1 + b2), done by recursive halving (``linear_scan``): log2(Q) levels of
  out-of-place tensor operations, no division and no cumulative product of decays, so it is exact in float32
  whatever the decays (a ratio form, h = P * cumsum(b / P), overflows once a chunk decays by more than e^-88).
* **Across chunks** the state is carried by a short recurrence: L / Q steps, each one multiply-add folding the
  previous chunk's last state into the next chunk's first token. The (L, D, N) tensors exist one chunk at a time,
  so memory is bounded by the chunk (about 1 MB per image at D = 512, N = 16, Q = 32), not by the tile.

Everything is ordinary tensor algebra (Mul, Add, Exp, Concat, Slice, MatMul), so it runs on the CPU, trains with
autograd and exports to ONNX with torch's dynamo exporter. While exporting, the whole sequence is one chunk: the
graph then grows with log2(L) instead of L / Q (a chunk loop unrolls), which exported and ran faster in ONNX Runtime
too (rsmamba with 4 blocks at 256 px: 833 nodes, 25 s export, 0.66 s per tile against 2133 nodes, 92 s, 0.87 s
for chunks of 64; its arena allocator reuses the large temporaries that slow eager PyTorch down).
``selective_scan_ref`` is the literal token loop, for tests only. ``selective_scan`` dispatches, in this one place:
for CUDA tensors (not while exporting) the fused ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` when
``mamba_ssm`` imports, else the Triton kernel :mod:`cdkd.models.kernels.selective_scan_triton` (forward and
backward fused; Triton ships with the CUDA build of torch); on the CPU and while exporting the chunked form. Inside
``torch.compile`` a fused kernel runs eagerly between compiled graphs (one graph break per scan): dynamo cannot trace
its launch, and the compiled chunked form would be the slow one.

Layout: token-major, the way the Mamba mixer holds its activations: u and delta (batch, L, D), B and C
(batch, L, N), A (D, N), D (D,).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "default_chunk",
    "fused_available",
    "linear_scan",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "triton_available",
]

BACKENDS = ("auto", "chunked", "fused", "triton", "reference")
# Elements of one chunk's (Q, D, N) tensors per image: 1 MB in float32 (Q = 32 at D = 512, N = 16). Measured on a
# 2-core CPU (L = 4096, both directions): chunks of 32 ran 1.2-1.4x faster than 128 and ~3x faster than a
# whole-sequence scan, whose 100+ MB temporaries are page-faulted in afresh by every operation.
CHUNK_ELEMENTS = 1 << 18
_SEQUENTIAL_BELOW = 4  # levels this short are cheaper as a few unrolled multiply-adds than as another halving


def default_chunk(d_inner: int, d_state: int) -> int:
    """Chunk length for a scan over ``d_inner`` channels x ``d_state`` states: a power of two in [16, 256]."""
    q = CHUNK_ELEMENTS // max(d_inner * d_state, 1)
    return int(min(256, max(16, 2 ** int(math.log2(max(q, 1))))))


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Inclusive scan of h[t] = a[t] * h[t-1] + b[t] along dim 1, h[-1] = ``h0`` (zero if None); a and b
    (batch, T, ...), h0 (batch, ...).

    Recursive halving: neighbouring pairs are combined into one step of half the length, that shorter scan gives
    the state at every pair's right element, and one multiply-add recovers the left ones. Work O(T), depth
    O(log T), out of place (autograd and ONNX friendly). Odd lengths get one identity step (a = 1, b = 0).
    """
    length = a.shape[1]
    if length <= _SEQUENTIAL_BELOW:
        states = [b[:, 0] if h0 is None else torch.addcmul(b[:, 0], a[:, 0], h0)]
        for t in range(1, length):
            states.append(torch.addcmul(b[:, t], a[:, t], states[-1]))
        return torch.stack(states, 1)
    odd = length % 2
    if odd:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], 1)
    pairs = a.shape[1] // 2
    a2, b2 = a.unflatten(1, (pairs, 2)), b.unflatten(1, (pairs, 2))
    a_left, a_right, b_left, b_right = a2[:, :, 0], a2[:, :, 1], b2[:, :, 0], b2[:, :, 1]
    right = linear_scan(a_right * a_left, torch.addcmul(b_right, a_right, b_left), h0)  # state after each pair
    h = torch.stack([_left_states(a_left, b_left, right, h0), right], 2).flatten(1, 2)
    return h[:, :length] if odd else h


def _left_states(
    a_left: torch.Tensor, b_left: torch.Tensor, right: torch.Tensor, h0: torch.Tensor | None
) -> torch.Tensor:
    """States at the pairs' left elements from the states after the previous pairs (``right`` shifted by one)."""
    if h0 is None:
        return torch.cat([b_left[:, :1], torch.addcmul(b_left[:, 1:], a_left[:, 1:], right[:, :-1])], 1)
    return torch.addcmul(b_left, a_left, torch.cat([h0.unsqueeze(1), right[:, :-1]], 1))


def _contract(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_n h[..., n] * c[..., n]: (batch, T, D, N) x (batch, T, N) -> (batch, T, D), as one batched matmul."""
    b, t, d, n = h.shape
    return torch.matmul(h.reshape(b * t, d, n), c.reshape(b * t, n, 1)).view(b, t, d)


def _scan_chunk(
    dt: torch.Tensor, du: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: dt, du (batch, q, D), B, C (batch, q, N), h0 (batch, D, N) or None -> y (batch, q, D) without
    the skip term, and the last state (batch, D, N).

    The first halving level is fused with building the steps: the pairs' decays and inputs are computed from the
    small (q, D) and (q, N) tensors directly (exp((dt_l + dt_r) A) for the pair's decay), and the contraction with
    C is done on the two halves, so no full-size (q, D, N) decay, input or state tensor is ever written.
    """
    q = dt.shape[1]
    if q % 2 or q <= _SEQUENTIAL_BELOW:
        h = linear_scan(torch.exp(dt.unsqueeze(-1) * A), du.unsqueeze(-1) * B.unsqueeze(2), h0)
        return _contract(h, C), h[:, -1]
    dt_l, dt_r = dt[:, 0::2], dt[:, 1::2]
    a_left, a_right = torch.exp(dt_l.unsqueeze(-1) * A), torch.exp(dt_r.unsqueeze(-1) * A)
    b_left = du[:, 0::2].unsqueeze(-1) * B[:, 0::2].unsqueeze(2)
    b_right = du[:, 1::2].unsqueeze(-1) * B[:, 1::2].unsqueeze(2)
    right = linear_scan(torch.exp((dt_l + dt_r).unsqueeze(-1) * A), torch.addcmul(b_right, a_right, b_left), h0)
    left = _left_states(a_left, b_left, right, h0)
    y = torch.stack([_contract(left, C[:, 0::2]), _contract(right, C[:, 1::2])], 2).flatten(1, 2)
    return y, right[:, -1]


def _prepare(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 u, the effective step (bias added, softplus applied) and A: the scan's numerics stay in float32."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    return u.float(), delta, A.float()


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """The selective scan in chunks of ``chunk`` tokens (default ``default_chunk``; the whole sequence while
    exporting). Shapes in the module doc; returns y (batch, L, D) in u's dtype, computed in float32."""
    dtype = u.dtype
    # Autocast off: the scan's numerics stay float32 (meta tensors, used to count FLOPs, have no autocast).
    no_autocast = contextlib.nullcontext() if u.device.type == "meta" else torch.autocast(u.device.type, enabled=False)
    with no_autocast:
        u, delta, A = _prepare(u, delta, A, delta_bias, delta_softplus)
        B, C = B.float(), C.float()
        length, d_inner, d_state = u.shape[1], u.shape[2], A.shape[1]
        q = chunk or (length if _exporting() or _compiling() else default_chunk(d_inner, d_state))
        du = delta * u
        ys, h_last = [], None
        for s in range(0, length, q):  # the short recurrence across chunks: the last state enters the next one
            y, h_last = _scan_chunk(delta[:, s : s + q], du[:, s : s + q], A, B[:, s : s + q], C[:, s : s + q], h_last)
            ys.append(y)
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
        if D is not None:
            y = y + u * D.float()
    return y.to(dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The recurrence exactly as written, one token at a time: the reference for tests (slow)."""
    dtype = u.dtype
    u, delta, A = _prepare(u, delta, A, delta_bias, delta_softplus)
    B, C = B.float(), C.float()
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + u * D.float()
    return y.to(dtype)


@functools.lru_cache(maxsize=1)
def _fused_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a CUDA extension built for another torch: fall back
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def _triton_fn():
    try:
        from cdkd.models.kernels.selective_scan_triton import selective_scan_triton
    except Exception:  # ImportError on a CPU-only torch build without triton, or a broken triton: fall back
        return None
    return selective_scan_triton


def fused_available() -> bool:
    """True when ``mamba_ssm``'s CUDA selective scan imports and a CUDA device is present."""
    return torch.cuda.is_available() and _fused_fn() is not None


def triton_available() -> bool:
    """True when cdkd's Triton selective scan imports (triton installed); it runs on CUDA devices."""
    return _triton_fn() is not None


def _selective_scan_fused(u, delta, A, B, C, D, delta_bias, delta_softplus) -> torch.Tensor:
    """``mamba_ssm``'s kernel, which takes channel-major (batch, D, L) and (batch, N, L) tensors."""
    fn = _fused_fn()
    if fn is None:
        raise RuntimeError("mamba_ssm's selective_scan_fn is not importable; pip install mamba-ssm on a CUDA machine")
    y = fn(
        u.transpose(1, 2).contiguous(),
        delta.transpose(1, 2).contiguous(),
        A.float().contiguous(),
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        None if D is None else D.float().contiguous(),
        None,
        None if delta_bias is None else delta_bias.float().contiguous(),
        delta_softplus,
    )
    return y.transpose(1, 2)


def _selective_scan_kernel(backend, u, delta, A, B, C, D, delta_bias, delta_softplus) -> torch.Tensor:
    """A fused CUDA kernel: "fused" (``mamba_ssm``), "triton", or "auto" (``mamba_ssm`` when importable, else Triton,
    else the chunked form)."""
    if backend == "auto":
        backend = "fused" if _fused_fn() is not None else "triton" if _triton_fn() is not None else "chunked"
    if backend == "fused":
        return _selective_scan_fused(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
    fn = _triton_fn()
    if fn is None:
        raise RuntimeError("the Triton selective scan needs triton (it ships with the CUDA build of torch)")
    return fn(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)


def _exporting() -> bool:
    """True while torch.export / the ONNX exporter traces: the scan must then be plain tensor algebra."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_exporting", lambda: False)():
        return True
    return bool(torch.onnx.is_in_onnx_export())


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """y (batch, L, D) of the selective scan; see the module doc for the recurrence and shapes.

    ``backend``: "auto" (on CUDA: ``mamba_ssm``'s kernel when installed, else the Triton kernel; the chunked form
    on the CPU and always while exporting), "chunked", "fused" (``mamba_ssm``), "triton" or "reference" (the
    token loop).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    args = (u, delta, A, B, C, D)
    if backend == "reference":
        return selective_scan_ref(*args, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if backend in ("fused", "triton") or (backend == "auto" and u.is_cuda and not _exporting()):
        # Inside torch.compile the kernel runs eagerly, one graph break per scan (wrapped here, not at import: that
        # would import dynamo for every user of this module).
        kernel = torch.compiler.disable(_selective_scan_kernel) if _compiling() else _selective_scan_kernel
        return kernel(backend, *args, delta_bias, delta_softplus)
    return selective_scan_chunked(*args, delta_bias=delta_bias, delta_softplus=delta_softplus)
