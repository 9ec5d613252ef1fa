"""Mamba's selective scan fused in Triton, forward and backward: the CUDA path of ``ssm_scan.selective_scan`` when
``mamba_ssm`` is not installed.

The recurrence and shapes are those of :mod:`cdkd.models.ssm_scan` (its chunked PyTorch form is the reference)::

    h[t] = exp(dt[t, d] * A[d, n]) * h[t-1] + dt[t, d] * B[t, n] * u[t, d],   y[t, d] = C[t] . h[t, d] + D[d] u[t, d]

with dt = softplus(delta + delta_bias). One program owns a batch row and ``BLOCK_D`` channels x all states and walks
the sequence in chunks of ``BLOCK_L`` tokens: a chunk's (BLOCK_D, N, BLOCK_L) decays and inputs are built in
registers from the (BLOCK_D, BLOCK_L) and (N, BLOCK_L) tiles, scanned along the tokens with
``tl.associative_scan`` (the pair operator (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)), the state entering the
chunk is folded in, y is contracted with C, and the chunk's last state carries into the next. Nothing of size
(L, D, N) ever reaches memory: the forward reads u, dt, B, C once and writes y and the state at every chunk start
(L / BLOCK_L states, for the backward).

The backward walks the chunks from the last to the first. Per chunk it recomputes the states h[t-1] from the saved
chunk-start state (a scan over the inputs shifted by one token), runs the adjoint recurrence
g[t] = C[t] dy[t] + exp(dt[t+1] A) g[t+1] as a reverse scan (the adjoint of the following chunk's first token is
carried), and forms every gradient from g, h[t-1] and the decays in registers. Sums over channels (dB, dC) are
written per channel block and summed by torch afterwards, and sums over tokens (dA, dD, d bias) per batch row:
no atomics, so gradients are deterministic.

All arithmetic is float32 whatever the input dtype (bf16 under autocast); y comes back in u's dtype and every
gradient in its input's dtype, as from the PyTorch scan. Any strides are accepted (the mixer hands over views).
Block sizes (``FORWARD``, ``BACKWARD``) are chosen from the compiled kernels' register use, not yet from timings:
``bench/scan_kernel.py`` (run by ``bench/gpu.sh``) times the alternatives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BACKWARD", "FORWARD", "selective_scan_triton"]

# (BLOCK_L, BLOCK_D, num_warps). Compiled for sm_90 (ptxas, no GPU needed) both take 168 registers a thread and
# spill nothing, so three programs fit an SM; wider tiles reached 255 registers and spilled (the backward holds
# about twice the forward's (BLOCK_D, N, BLOCK_L) tiles live). The backward walks the forward's chunks, so its
# BLOCK_L is the forward's. Not yet timed on a GPU: bench/scan_kernel.py compares block sizes.
FORWARD = (16, 16, 4)
BACKWARD = (16, 8, 4)


@triton.jit
def _combine(a1, b1, a2, b2):
    """Two steps of h -> a h + b, the first (a1, b1) then (a2, b2), as one."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    bias_ptr,
    y_ptr,
    state_ptr,
    length,
    dim,
    nstate,
    n_chunks,
    su_b,
    su_l,
    su_d,
    sdt_b,
    sdt_l,
    sdt_d,
    sa_d,
    sa_n,
    sb_b,
    sb_l,
    sb_n,
    sc_b,
    sc_l,
    sc_n,
    sy_b,
    sy_l,
    sy_d,
    HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Tiles are laid out (channel d, state n, token l): the scan runs along the last, fastest axis.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        skip = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_base = u_ptr + pid_b * su_b
    dt_base = dt_ptr + pid_b * sdt_b
    b_base = b_ptr + pid_b * sb_b
    c_base = c_ptr + pid_b * sc_b
    y_base = y_ptr + pid_b * sy_b
    state_base = state_ptr + pid_b * n_chunks * dim * nstate
    state_offs = offs_d[:, None] * nstate + offs_n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        tl.store(state_base + chunk * dim * nstate + state_offs, h, mask=mask_dn)  # h before the chunk
        rows = chunk * BLOCK_L + offs_l
        mask_dl = mask_d[:, None] & (rows < length)[None, :]
        mask_nl = mask_n[:, None] & (rows < length)[None, :]
        u = tl.load(u_base + offs_d[:, None] * su_d + rows[None, :] * su_l, mask=mask_dl, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + offs_d[:, None] * sdt_d + rows[None, :] * sdt_l, mask=mask_dl, other=0.0)
        dt = dt.to(tl.float32) + bias[:, None]
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # torch's softplus threshold
        dt = tl.where(mask_dl, dt, 0.0)  # padding: decay 1, input 0, an identity step
        bv = tl.load(b_base + offs_n[:, None] * sb_n + rows[None, :] * sb_l, mask=mask_nl, other=0.0).to(tl.float32)
        cv = tl.load(c_base + offs_n[:, None] * sc_n + rows[None, :] * sc_l, mask=mask_nl, other=0.0).to(tl.float32)
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        b = (dt * u)[:, None, :] * bv[None, :, :]
        scan_a, scan_b = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
        hs = scan_a * h[:, :, None] + scan_b
        y = tl.sum(hs * cv[None, :, :], axis=1)
        if HAS_D:
            y += u * skip[:, None]
        tl.store(y_base + offs_d[:, None] * sy_d + rows[None, :] * sy_l, y.to(y_ptr.dtype.element_ty), mask=mask_dl)
        h = tl.sum(tl.where((offs_l == BLOCK_L - 1)[None, None, :], hs, 0.0), axis=2)


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    bias_ptr,
    dy_ptr,
    state_ptr,
    du_ptr,
    ddt_ptr,
    da_ptr,
    db_ptr,
    dc_ptr,
    dd_ptr,
    dbias_ptr,
    length,
    dim,
    nstate,
    n_chunks,
    n_dblocks,
    su_b,
    su_l,
    su_d,
    sdt_b,
    sdt_l,
    sdt_d,
    sa_d,
    sa_n,
    sb_b,
    sb_l,
    sb_n,
    sc_b,
    sc_l,
    sc_n,
    sdy_b,
    sdy_l,
    sdy_d,
    HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        skip = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_base = u_ptr + pid_b * su_b
    dt_base = dt_ptr + pid_b * sdt_b
    b_base = b_ptr + pid_b * sb_b
    c_base = c_ptr + pid_b * sc_b
    dy_base = dy_ptr + pid_b * sdy_b
    state_base = state_ptr + pid_b * n_chunks * dim * nstate
    state_offs = offs_d[:, None] * nstate + offs_n[None, :]
    # Outputs: du and d delta (batch, L, D) contiguous; dB and dC per channel block (batch, n_dblocks, L, N).
    dl_offs = offs_d[:, None] + (pid_b * length) * dim
    part_base = (pid_b * n_dblocks + pid_d) * length * nstate
    g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # adjoint of the state at the next chunk's first token
    grad_a = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, n_chunks):
        chunk = n_chunks - 1 - i
        rows = chunk * BLOCK_L + offs_l
        mask_l = rows < length
        mask_dl = mask_d[:, None] & mask_l[None, :]
        mask_nl = mask_n[:, None] & mask_l[None, :]
        # Step t's inputs.
        u = tl.load(u_base + offs_d[:, None] * su_d + rows[None, :] * su_l, mask=mask_dl, other=0.0).to(tl.float32)
        x = tl.load(dt_base + offs_d[:, None] * sdt_d + rows[None, :] * sdt_l, mask=mask_dl, other=0.0)
        x = x.to(tl.float32) + bias[:, None]
        dt = x
        if SOFTPLUS:
            dt = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
        dt = tl.where(mask_dl, dt, 0.0)
        bv = tl.load(b_base + offs_n[:, None] * sb_n + rows[None, :] * sb_l, mask=mask_nl, other=0.0).to(tl.float32)
        cv = tl.load(c_base + offs_n[:, None] * sc_n + rows[None, :] * sc_l, mask=mask_nl, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + offs_d[:, None] * sdy_d + rows[None, :] * sdy_l, mask=mask_dl, other=0.0)
        dy = dy.to(tl.float32)
        # Step t-1's inputs; an identity step in front of the chunk, whose start state enters as h0.
        prev = rows - 1
        mask_pl = (offs_l >= 1) & (prev < length)
        mask_dp = mask_d[:, None] & mask_pl[None, :]
        u_p = tl.load(u_base + offs_d[:, None] * su_d + prev[None, :] * su_l, mask=mask_dp, other=0.0).to(tl.float32)
        dt_p = tl.load(dt_base + offs_d[:, None] * sdt_d + prev[None, :] * sdt_l, mask=mask_dp, other=0.0)
        dt_p = dt_p.to(tl.float32) + bias[:, None]
        if SOFTPLUS:
            dt_p = tl.where(dt_p > 20.0, dt_p, tl.log(1.0 + tl.exp(dt_p)))
        dt_p = tl.where(mask_dp, dt_p, 0.0)
        b_p = tl.load(
            b_base + offs_n[:, None] * sb_n + prev[None, :] * sb_l, mask=mask_n[:, None] & mask_pl[None, :], other=0.0
        ).to(tl.float32)
        # Step t+1's step size: the adjoint flows back through its decay (none past the sequence's end).
        nxt = rows + 1
        mask_dx = mask_d[:, None] & (nxt < length)[None, :]
        dt_x = tl.load(dt_base + offs_d[:, None] * sdt_d + nxt[None, :] * sdt_l, mask=mask_dx, other=0.0)
        dt_x = dt_x.to(tl.float32) + bias[:, None]
        if SOFTPLUS:
            dt_x = tl.where(dt_x > 20.0, dt_x, tl.log(1.0 + tl.exp(dt_x)))
        dt_x = tl.where(mask_dx, dt_x, 0.0)

        # States: h[t-1] recomputed from the chunk's start state, then h[t].
        h0 = tl.load(state_base + chunk * dim * nstate + state_offs, mask=mask_dn, other=0.0)
        pa, pb = tl.associative_scan(
            (tl.exp(dt_p[:, None, :] * A[:, :, None]), (dt_p * u_p)[:, None, :] * b_p[None, :, :]),
            axis=2,
            combine_fn=_combine,
        )
        h_prev = pa * h0[:, :, None] + pb
        decay = tl.exp(dt[:, None, :] * A[:, :, None])
        h = decay * h_prev + (dt * u)[:, None, :] * bv[None, :, :]
        # Adjoint: g[t] = C[t] dy[t] + exp(dt[t+1] A) g[t+1], the carry entering after the chunk's last token.
        ga, gb = tl.associative_scan(
            (tl.exp(dt_x[:, None, :] * A[:, :, None]), dy[:, None, :] * cv[None, :, :]),
            axis=2,
            combine_fn=_combine,
            reverse=True,
        )
        adj = gb + ga * g[:, :, None]
        g = tl.sum(tl.where((offs_l == 0)[None, None, :], adj, 0.0), axis=2)

        grad_decay = adj * h_prev * decay  # dL/d(decay) * decay, (BLOCK_D, N, BLOCK_L)
        grad_a += tl.sum(grad_decay * dt[:, None, :], axis=2)
        adj_b = tl.sum(adj * bv[None, :, :], axis=1)  # sum_n g B: (BLOCK_D, BLOCK_L)
        grad_dt = tl.sum(grad_decay * A[:, :, None], axis=1) + adj_b * u
        grad_u = adj_b * dt
        if HAS_D:
            grad_u += dy * skip[:, None]
            grad_skip += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            grad_dt = grad_dt * tl.sigmoid(x)
        grad_dt = tl.where(mask_dl, grad_dt, 0.0)
        grad_bias += tl.sum(grad_dt, axis=1)
        tl.store(du_ptr + dl_offs + rows[None, :] * dim, grad_u, mask=mask_dl)
        tl.store(ddt_ptr + dl_offs + rows[None, :] * dim, grad_dt, mask=mask_dl)
        part = part_base + rows[None, :] * nstate + offs_n[:, None]
        tl.store(db_ptr + part, tl.sum(adj * (dt * u)[:, None, :], axis=0), mask=mask_nl)
        tl.store(dc_ptr + part, tl.sum(h * dy[:, None, :], axis=0), mask=mask_nl)
    tl.store(da_ptr + pid_b * dim * nstate + state_offs, grad_a, mask=mask_dn)
    tl.store(dd_ptr + pid_b * dim + offs_d, grad_skip, mask=mask_d)
    tl.store(dbias_ptr + pid_b * dim + offs_d, grad_bias, mask=mask_d)


def _blocks(config: tuple[int, int, int], length: int, dim: int) -> tuple[int, int, int]:
    """``config``'s block sizes shrunk to the problem (powers of two, at least 2 tokens)."""
    block_l, block_d, warps = config
    return (min(block_l, max(2, triton.next_power_of_2(length))), min(block_d, triton.next_power_of_2(dim)), warps)


class SelectiveScanFn(torch.autograd.Function):
    """y = selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus) with the Triton kernels above."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, config_fwd, config_bwd):
        batch, length, dim = u.shape
        nstate = A.shape[1]
        block_l, block_d, warps = _blocks(config_fwd, length, dim)
        n_chunks = triton.cdiv(length, block_l)
        y = torch.empty(batch, length, dim, device=u.device, dtype=u.dtype)
        states = torch.empty(batch, n_chunks, dim, nstate, device=u.device, dtype=torch.float32)
        D_ = D.contiguous() if D is not None else u
        bias = delta_bias.contiguous() if delta_bias is not None else u
        grid = (batch, triton.cdiv(dim, block_d))
        _scan_fwd_kernel[grid](
            u,
            delta,
            A,
            B,
            C,
            D_,
            bias,
            y,
            states,
            length,
            dim,
            nstate,
            n_chunks,
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B.stride(),
            *C.stride(),
            *y.stride(),
            HAS_D=D is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus),
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(nstate),
            num_warps=warps,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.block_l_fwd = block_l
        ctx.config_bwd = config_bwd
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        batch, length, dim = u.shape
        nstate = A.shape[1]
        _, block_d, warps = _blocks(ctx.config_bwd, length, dim)
        block_l = ctx.block_l_fwd  # the saved states sit at the forward's chunk starts
        n_chunks = states.shape[1]
        n_dblocks = triton.cdiv(dim, block_d)
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty(batch, length, dim, **f32)
        ddelta = torch.empty(batch, length, dim, **f32)
        dA = torch.empty(batch, dim, nstate, **f32)
        dB = torch.empty(batch, n_dblocks, length, nstate, **f32)
        dC = torch.empty(batch, n_dblocks, length, nstate, **f32)
        dD = torch.empty(batch, dim, **f32)
        dbias = torch.empty(batch, dim, **f32)
        D_ = D.contiguous() if D is not None else u
        bias = delta_bias.contiguous() if delta_bias is not None else u
        _scan_bwd_kernel[(batch, n_dblocks)](
            u,
            delta,
            A,
            B,
            C,
            D_,
            bias,
            dy,
            states,
            du,
            ddelta,
            dA,
            dB,
            dC,
            dD,
            dbias,
            length,
            dim,
            nstate,
            n_chunks,
            n_dblocks,
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B.stride(),
            *C.stride(),
            *dy.stride(),
            HAS_D=D is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus,
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(nstate),
            num_warps=warps,
        )
        grads = (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA.sum(0).to(A.dtype),
            dB.sum(1).to(B.dtype),
            dC.sum(1).to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
        )
        return (*grads, None, None, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    config_fwd: tuple[int, int, int] | None = None,
    config_bwd: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """y (batch, L, D) in u's dtype: u, delta (batch, L, D), A (D, N), B, C (batch, L, N), D and delta_bias (D,),
    any dtype (computed in float32). Differentiable in every tensor argument.

    ``config_fwd`` / ``config_bwd``: (BLOCK_L, BLOCK_D, num_warps), default ``FORWARD`` / ``BACKWARD``; the backward
    walks the forward's chunks, so only its BLOCK_D and warps apply.
    """
    return SelectiveScanFn.apply(
        u, delta, A, B, C, D, delta_bias, delta_softplus, config_fwd or FORWARD, config_bwd or BACKWARD
    )
