"""Counting the FLOPs of a piece of work with ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees matrix products and convolutions (a multiply-add = 2 FLOPs), forward and backward: a linear layer
costs 2 x in x out per token forward and twice that backward. Attention is forced onto SDPA's math path while
counting, whose two products the counter sees whatever the device (it has no formula for every fused kernel).
Element-wise work (norms, activations, softmax, a selective scan's recurrence) is not counted, as in the usual
model-FLOPs utilisation (MFU) figures this feeds.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops"]


def count_flops(work: Callable[[], Any]) -> int:
    """FLOPs of the matrix products and convolutions ``work()`` runs (include ``.backward()`` in it to count the
    backward too)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        work()
    return int(counter.get_total_flops())
