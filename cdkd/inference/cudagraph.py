"""A segmenter's forward pass replayed as a CUDA graph: one launch per batch instead of a few hundred.

A ViT-S + UPerNet forward is about three hundred kernels. Launched one by one from Python they cost the thread
that feeds the GPU several milliseconds per batch, and that thread shares the interpreter lock with the reader
threads, so the GPU waits between kernels whenever a reader holds the lock. Captured once as a CUDA graph, the
whole forward is one ``replay``.

A graph is captured for each tile shape, at the largest batch seen so far (a scene's tiles have one shape and the
engine's batch size, so a scene captures once); a smaller batch, a scene's last, runs padded to the captured
one. At most ``max_graphs`` shapes keep their graph (and its memory pool), the least recently used going first.
The captured kernels are the eager model's own, so the logits are those of the eager forward with the same batch
size. What the graph writes is copied out, so a caller may hold the logits across batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["GraphedForward"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # the static input the graph reads
    y: torch.Tensor  # and the output it writes


class GraphedForward:
    """``forward`` (a function of a (B, C, H, W) CUDA tensor, run without autograd) as CUDA graphs, one per
    (C, H, W). ``warmup`` eager runs on a side stream come before each capture (cuDNN and cuBLAS choose their
    algorithms and allocate their workspaces there, outside the graph)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2, max_graphs: int = 4) -> None:
        self.forward, self.warmup, self.max_graphs = forward, warmup, max_graphs
        self._graphs: dict[tuple[int, ...], _Graph] = {}  # in order of last use

    @property
    def captured(self) -> dict[tuple[int, ...], int]:
        """The batch size captured for each (C, H, W)."""
        return {shape: len(g.x) for shape, g in self._graphs.items()}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape, n = tuple(x.shape[1:]), len(x)
        entry = self._graphs.pop(shape, None)  # a smaller one's memory pool goes with it
        if entry is None or len(entry.x) < n:
            while len(self._graphs) >= self.max_graphs:  # images of many sizes: the least recently used goes
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._capture(x)
        self._graphs[shape] = entry
        entry.x[:n].copy_(x)  # a padded tail keeps the last batch's tiles: each tile's logits are its own
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            entry.graph.replay()
        return entry.y[:n].clone()

    def _capture(self, x: torch.Tensor) -> _Graph:
        with torch.cuda.device(x.device):  # the graph's streams and memory pool on the model's device
            return self._capture_here(x)

    def _capture_here(self, x: torch.Tensor) -> _Graph:
        static = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(static)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the reader threads go on pinning host memory (cudaHostAlloc) while this thread captures,
        # which the default global mode would make them fail
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            y = self.forward(static)
        return _Graph(graph, static, y)
