"""RSMamba: the state-space student of RS4D, Mamba selective-scan blocks over 16 px patch tokens.

The architecture of RS4D's reference ``RSMamba`` backbone (its ``mmdet/rs4d/models.py``), written here from that
description and from Mamba's papers:

* 16 px patch embedding (a convolution without bias) + a learnt absolute position embedding, resampled
  (bicubic, as timm does) for any tile size that is a multiple of 16;
* ``depth`` residual blocks, each ``x + mean(mixer(norm(x)), flip(mixer(norm(flip(x)))))``: ONE Mamba mixer,
  shared by the two directions, scans the row-major token sequence forward and reversed and the two results
  are averaged (the reference's ``forward_reverse_mean`` path);
* the Mamba-1 mixer (Gu & Dao 2023): in-projection to 2 x ``d_inner`` (the SSM branch and its SiLU gate), a
  depthwise causal conv1d of width 4 with SiLU, input-dependent step ``dt`` (through a rank-``dt_rank``
  bottleneck), ``B`` and ``C``, the selective scan with diagonal ``A = -exp(A_log)`` (d_inner x d_state) and skip
  ``D``, the gate, out-projection;
* a final LayerNorm.

Variants (``cdkd.models.student.STUDENT_REGISTRY``): ``rsmamba_s|b|l|h`` with 16 / 24 / 28 / 32 blocks, d_model
256, d_state 16, d_inner 512 (s, b) or 640 (l, h), dt_rank 16: 8.3 M, 11.8 M, 16.6 M and 18.8 M parameters
with the 1024 px position embedding.

Departures from the reference, deliberately: each block has its own pre-norm (mamba_ssm's ``Block``; the
reference shares one LayerNorm across all blocks), and the step projection gets Mamba's initialisation (steps
log-uniform in [0.001, 0.1], out-projections scaled by 1/sqrt(depth); the reference builds HuggingFace's
``MambaMixer`` outside a ``PreTrainedModel`` and so keeps PyTorch's default initialisation for them).

The scan is :func:`cdkd.models.ssm_scan.selective_scan`: pure PyTorch in chunks (CPU, ONNX export), and on CUDA
a fused kernel: ``mamba_ssm``'s when installed, else cdkd's Triton kernel (``cdkd.models.kernels``). The student
speaks timm's contract like the ViT students (``forward_features``, ``forward_head``, ``forward_intermediates``)
plus ``forward_masked`` for distillation; a masked patch's embedding is swapped for a learnt mask token (SimMIM),
the grid is kept, so ``encodes_visible_only`` is False.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from cdkd.errors import CdkdValueError
from cdkd.models.ssm_scan import BACKENDS, selective_scan
from cdkd.models.tokengrid import TokenGridBackbone

__all__ = ["BiMambaBlock", "MambaMixer", "RSMamba"]


class MambaMixer(nn.Module):
    """Mamba-1's selective-SSM mixer: (B, L, d_model) -> (B, L, d_model), causal along L.

    Parameter names and shapes are mamba_ssm's ``Mamba`` / HuggingFace's ``MambaMixer``: ``in_proj``, ``conv1d``,
    ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``.
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if scan_backend not in BACKENDS:
            raise CdkdValueError(f"scan_backend must be one of {', '.join(BACKENDS)}, got {scan_backend!r}")
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # mamba_ssm's convention, honoured by cdkd.train.optim.adamw: decaying A_log would pull every decay to e^-dt.
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self._init_dt(dt_min, dt_max, dt_init_floor)

    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's step initialisation: softplus(bias) log-uniform in [dt_min, dt_max], weights ~ U(+-rank^-0.5)."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        # Slices, not chunk/split: torch exports those as opset-18 Split, which opset 17 (TensorRT 8.x) lacks.
        uz = self.in_proj(x)
        u, z = uz[..., : self.d_inner], uz[..., self.d_inner :]  # (B, L, d_inner) each: SSM branch and its gate
        # Depthwise conv over the sequence, causal: padded by d_conv - 1 on both sides, the tail dropped.
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dbc = self.x_proj(u)
        r, n = self.dt_rank, self.d_state
        dt, B, C = dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :]
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added inside the scan (the fused kernel's delta_bias)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            u, dt, A, B, C, self.D, delta_bias=self.dt_proj.bias, delta_softplus=True, backend=self.scan_backend
        )
        return self.out_proj(y * F.silu(z))


class BiMambaBlock(nn.Module):
    """Pre-norm residual block scanning both ways with one mixer: x + mean(forward, reversed). (B, L, C) -> same."""

    def __init__(self, dim: int, mixer: MambaMixer, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        # Both directions in one batch: one pass of the projections and one scan for the two.
        y = self.mixer(torch.cat([y, y.flip(1)], dim=0))
        b = x.shape[0]
        return x + self.drop_path((y[:b] + y[b:].flip(1)) * 0.5)


class RSMamba(TokenGridBackbone):
    """RSMamba backbone: (B, in_chans, H, W), H and W multiples of 16 -> tokens (B, H/16 * W/16, embed_dim).

    Args:
        img_size: tile size the position embedding is learnt for; other multiples of ``patch_size`` resample it.
        embed_dim: d_model of the blocks (256 in every RS4D variant).
        depth: number of bidirectional Mamba blocks.
        d_inner: width of the mixer's SSM branch (expand x embed_dim).
        d_state, d_conv, dt_rank: the mixer's state size, conv width and step rank (None = ceil(embed_dim / 16)).
        scan_backend: "auto" (fused kernel on CUDA when mamba_ssm is installed), "chunked", "fused", "reference".
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 256,
        depth: int = 16,
        d_inner: int = 512,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int | None = None,
        drop_path_rate: float = 0.0,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self._init_grid(img_size, patch_size, in_chans, embed_dim, depth, bias=False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        mixer = partial(
            MambaMixer, embed_dim, d_inner, d_state=d_state, d_conv=d_conv, dt_rank=dt_rank, scan_backend=scan_backend
        )
        self.blocks = nn.ModuleList(BiMambaBlock(embed_dim, mixer(), dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        """Position embedding and mask token trunc-normal 0.02; out-projections scaled by 1/sqrt(depth) (GPT-2 /
        mamba_ssm: the residual stream's variance then does not grow with depth)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            for blk in self.blocks:
                blk.mixer.out_proj.weight.div_(math.sqrt(self.depth))  # type: ignore[union-attr, operator]
