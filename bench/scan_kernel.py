"""The selective scan alone on a GPU: Triton kernel (a few block sizes), mamba_ssm's kernel if installed, and the
chunked PyTorch form, forward and forward + backward, at rsmamba_s's sizes.

    python bench/scan_kernel.py [--tiles 4] [--size 1024] [--json PATH]

Shapes: batch = 2 x tiles (both scan directions of each tile), L = (size / 16)^2 tokens, d_inner 512, d_state 16,
bf16 u / delta / B / C as under autocast, float32 A, D and bias. Median of 10 after 3 warm-ups (the first call
compiles the kernels). The Triton rows say which (BLOCK_L, BLOCK_D, num_warps) to make the defaults
(``cdkd.models.kernels.selective_scan_triton.FORWARD`` / ``BACKWARD``); every row is also checked against the
chunked form (max abs difference of y).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cdkd.models.ssm_scan import _fused_fn, selective_scan_chunked  # noqa: E402

# (forward, backward) (BLOCK_L, BLOCK_D, num_warps); the backward runs on the forward's BLOCK_L. First: the defaults.
# Register use a thread for sm_90 (ptxas): fwd 16,16,4: 168; 32,16,8: 182; 32,16,4: 255; 8,16,4 / 16,8,2: ~213;
# bwd 16,8,4: 168; 16,16,8: 238; 8,16,4: 243; 16,16,4: 255 + spills.
CONFIGS = [
    ((16, 16, 4), (16, 8, 4)),
    ((16, 16, 4), (16, 16, 8)),
    ((32, 16, 8), (32, 8, 4)),
    ((32, 16, 4), (32, 16, 8)),
    ((8, 16, 4), (8, 16, 4)),
    ((16, 8, 2), (16, 8, 4)),
]


def inputs(batch: int, length: int, d: int = 512, n: int = 16):
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    u = torch.randn(batch, length, d, generator=g, **bf)
    delta = torch.randn(batch, length, d, generator=g, **bf) - 2
    A = -torch.exp(torch.randn(d, n, device="cuda", generator=g))
    B = torch.randn(batch, length, n, generator=g, **bf)
    C = torch.randn(batch, length, n, generator=g, **bf)
    D = torch.randn(d, device="cuda", generator=g)
    bias = torch.randn(d, device="cuda", generator=g) * 0.1
    return [u, delta, A, B, C, D, bias]


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def row(name: str, scan, xs, ref) -> dict:
    leaves = [t.clone().requires_grad_(True) for t in xs]

    def forward():
        with torch.no_grad():
            return scan(*xs)

    def train():
        y = scan(*leaves)
        y.float().square().mean().backward()

    out = {"name": name}
    try:
        out["max_abs_diff"] = float((forward().float() - ref).abs().max())
        out["fwd_ms"] = timed(forward)
        out["fwd_bwd_ms"] = timed(train)
    except Exception as e:  # a block size the compiler rejects is a result too
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    print(
        f"{name:34} "
        + (
            f"fwd {out['fwd_ms']:8.2f} ms   fwd+bwd {out['fwd_bwd_ms']:8.2f} ms   max |dy| {out['max_abs_diff']:.1e}"
            if "error" not in out
            else out["error"]
        ),
        flush=True,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from cdkd.models.kernels.selective_scan_triton import selective_scan_triton

    xs = inputs(2 * a.tiles, (a.size // 16) ** 2)
    kw = dict(delta_softplus=True)

    def chunked(u, delta, A, B, C, D, bias):
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias=bias, **kw)

    with torch.no_grad():
        ref = chunked(*xs).float()
    print(f"{torch.cuda.get_device_name()}: scan of {2 * a.tiles} x {(a.size // 16) ** 2} tokens x 512 x 16")
    rows = []
    for fwd, bwd in CONFIGS:
        rows.append(
            row(
                f"triton fwd {fwd} bwd {bwd}",
                lambda u, delta, A, B, C, D, bias, fwd=fwd, bwd=bwd: selective_scan_triton(
                    u, delta, A, B, C, D, delta_bias=bias, config_fwd=fwd, config_bwd=bwd, **kw
                ),
                xs,
                ref,
            )
        )
    fused = _fused_fn()
    if fused is not None:
        from cdkd.models.ssm_scan import _selective_scan_fused

        rows.append(
            row(
                "mamba_ssm",
                lambda u, delta, A, B, C, D, bias: _selective_scan_fused(u, delta, A, B, C, D, bias, True),
                xs,
                ref,
            )
        )
    rows.append(row("chunked PyTorch", chunked, xs, ref))
    if a.json:
        a.json.write_text(
            json.dumps(
                {"device": torch.cuda.get_device_name(), "tiles": a.tiles, "size": a.size, "rows": rows}, indent=2
            )
        )


if __name__ == "__main__":
    main()
