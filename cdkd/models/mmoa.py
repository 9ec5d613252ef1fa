"""Multi-scale mixture of adapters (MMoA): calibrates a frozen SAM block to satellite imagery.

In every adapted block the FFN residual branch becomes a gated mixture of three streams computed from the same
normalised input ``h = norm2(x)``:

    y = x + S * sum_j g_j(h) * s_j(h),     s = (FFN(h), fine(h), coarse(h)),  sum_j g_j = 1,  S = 3

* ``fine`` / ``coarse``: :class:`MultiScaleAdapter` with atrous dilations {1,3,5} / {7,9,11}.
* ``g``: :class:`StreamGate`, per-token attention over the streams (query from ``h``, keys from the streams).

Why the factor ``S`` (the number of streams): the published code mixes with softmax weights that start at 1/3
each, which scales SAM's FFN by 1/3 at step 0 and corrupts the teacher before it has learned anything. Biasing
the gate toward the FFN stream fixes step 0 only by saturating the softmax (its gradient ~ g(1-g) vanishes, so
the gate barely learns). Instead the gate starts exactly uniform (zero-initialised query projection) and the
mixture is scaled by ``S``: with zero-initialised adapter up-projections the adapted block then equals SAM
exactly at initialisation, and the gate sits in the steep middle of its softmax where it learns fastest.
"""

from __future__ import annotations

from typing import Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018) on (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w


class AtrousPyramid(nn.Module):
    """Depthwise atrous 3x3 convolutions at several dilations plus a global-pooling branch, fused by a 1x1 conv.

    The dilations set the receptive field on the token grid: {1,3,5} sees parcels and buildings (fine),
    {7,9,11} sees fields and districts (coarse) without the cost of larger kernels.
    """

    def __init__(self, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=channels) for d in dilations
        )
        self.global_branch = nn.Conv2d(channels, channels, 1)
        self.fuse = nn.Conv2d(channels * (len(dilations) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        g = self.global_branch(x.mean(dim=(2, 3), keepdim=True))
        feats.append(g.expand_as(x))
        if x.is_cuda:
            # Concatenated channels-last: the adapter's grid is (B, H, W, C) in memory and the branches keep that
            # layout, but a plain cat along dim 1 (its layout set by the expanded global branch) writes NCHW and
            # turns every later convolution NCHW, and the adapter's last permute into a copy. (The CPU keeps the
            # plain cat: no faster there, and its class rasters stay bitwise what they were.)
            return self.fuse(torch.cat([f.permute(0, 2, 3, 1) for f in feats], dim=-1).permute(0, 3, 1, 2))
        return self.fuse(torch.cat(feats, dim=1))


class MultiScaleAdapter(nn.Module):
    """down-projection -> atrous pyramid -> squeeze-excitation -> 3x3 depthwise conv -> up-projection.

    Input and output are SAM's channels-last token grid (B, H, W, C). The up-projection is zero-initialised so
    the adapter contributes nothing until it has learned something.
    """

    def __init__(self, dim: int, bottleneck: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.pyramid = AtrousPyramid(bottleneck, dilations)
        self.se = SqueezeExcite(bottleneck)
        self.dwconv = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, groups=bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.gelu(self.down(h)).permute(0, 3, 1, 2)
        z = self.se(self.pyramid(z))
        z = F.gelu(self.dwconv(z)).permute(0, 2, 3, 1)
        return self.up(z)


class BottleneckAdapter(nn.Module):
    """The ``--adapter single`` ablation: one plain down -> GELU -> up adapter (Houlsby et al. 2019)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(h)))


class StreamGate(nn.Module):
    """Per-token softmax weights over S streams: attention with the block input as query, streams as keys.

    ``weights(h, streams)``: h (B, H, W, C), streams S x (B, H, W, C) -> (B, H, W, S), summing to 1 per token.
    The streams themselves are the values. The query projection is zero-initialised so the gate starts uniform.
    """

    def __init__(self, dim: int, gate_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, gate_dim)
        self.key = nn.Linear(dim, gate_dim, bias=False)
        self.scale = gate_dim**-0.5
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)

    def forward(self, h: torch.Tensor, streams: Sequence[torch.Tensor]) -> torch.Tensor:
        q = self.query(h)
        logits = torch.stack([(q * self.key(s)).sum(-1) for s in streams], dim=-1) * self.scale
        return logits.softmax(dim=-1)


class MMoA(nn.Module):
    """The FFN branch of an adapted block: ``forward(h)`` replaces ``mlp(h)`` in ``x + mlp(norm2(x))``.

    ``adapter``: "multi" (fine + coarse streams) or "single" (one bottleneck stream).
    ``fusion``: "gate" (:class:`StreamGate`) or "add" (plain sum of the streams; the ``--fusion add`` ablation).
    The frozen ``mlp`` is held, not copied: it stays SAM's module and keeps requires_grad False.
    """

    def __init__(
        self,
        mlp: nn.Module,
        dim: int,
        *,
        adapter: str = "multi",
        fusion: str = "gate",
        bottleneck: int = 64,
        fine_dilations: Sequence[int] = (1, 3, 5),
        coarse_dilations: Sequence[int] = (7, 9, 11),
        gate_dim: int = 64,
    ) -> None:
        super().__init__()
        if adapter not in ("multi", "single"):
            raise ValueError(f"adapter must be 'multi' or 'single', got {adapter!r}")
        if fusion not in ("gate", "add"):
            raise ValueError(f"fusion must be 'gate' or 'add', got {fusion!r}")
        self.mlp = mlp
        if adapter == "multi":
            self.adapters = nn.ModuleList(
                [
                    MultiScaleAdapter(dim, bottleneck, fine_dilations),
                    MultiScaleAdapter(dim, bottleneck, coarse_dilations),
                ]
            )
        else:
            self.adapters = nn.ModuleList([BottleneckAdapter(dim, bottleneck)])
        self.gate = StreamGate(dim, gate_dim) if fusion == "gate" else None

    @property
    def num_streams(self) -> int:
        return 1 + len(self.adapters)

    def stream_weights(self, h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The streams [FFN, adapters...] and the gate weights (B, H, W, S), or None for fusion="add"."""
        streams = [self.mlp(h)] + [a(h) for a in self.adapters]
        return streams, (self.gate(h, streams) if self.gate is not None else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        streams, weights = self.stream_weights(h)
        if weights is None:
            return torch.stack(streams, dim=0).sum(0)
        mixed = cast(torch.Tensor, sum(weights[..., j : j + 1] * s for j, s in enumerate(streams)))
        return mixed * self.num_streams
