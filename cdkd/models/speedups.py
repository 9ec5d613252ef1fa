"""GPU speed-ups applied to a built model, without changing what it computes or its parameter names:
regional ``torch.compile`` of the transformer / Mamba blocks and channels-last convolutions.

* **Compiling the blocks** (PyTorch's "regional compilation"): each block is compiled in place
  (``nn.Module.compile``), so state-dict keys stay the same and blocks of one kind share one compiled graph
  (parameters are graph inputs), which keeps the compile time to a few graphs instead of the whole model and
  leaves data-dependent code between blocks (masking, gathers) eager. Inductor fuses each block's norms,
  activations, residual adds and bias terms into the matmuls' neighbours: the memory-bound part of a ViT step.
  A fused selective scan inside an RSMamba block runs eagerly behind a graph break (``ssm_scan``).
* **Channels-last convolutions**: the MMoA adapters' convolutions read SAM's token grid, which is already
  (B, H, W, C) in memory; weights in channels-last memory let cuDNN run them as NHWC kernels without transposes.

Both pay on CUDA only; :func:`apply_speedups` is what the distillation trainer and ``bench/`` call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["apply_speedups", "channels_last_convs", "compile_blocks", "resolve_compile"]


def resolve_compile(mode: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA only: on the CPU the compile time does not pay back in a test or a short run."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile in place every block of every ``blocks`` ModuleList in ``model`` (teacher, student, decoders);
    returns how many. ``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``)."""
    count = 0
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for blk in blocks:
                blk.compile(**options)
                count += 1
    return count


def channels_last_convs(model: nn.Module, within: type | tuple[type, ...] | None = None) -> int:
    """Put the weight of every 2-D convolution of ``model`` (only those inside modules of the types ``within``,
    when given) in channels-last memory, values unchanged; returns how many. Their outputs then come out
    channels-last too, as the adapters' (B, H, W, C) grids already are."""
    scopes = [model] if within is None else [m for m in model.modules() if isinstance(m, within)]
    count = 0
    for module in (m for scope in scopes for m in scope.modules()):
        if isinstance(module, nn.Conv2d):
            with torch.no_grad():
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
            count += 1
    return count


def apply_speedups(
    model: nn.Module, device: torch.device, *, compile: str = "auto", channels_last: bool = True
) -> dict[str, int]:
    """The speed-ups that suit ``device`` (after ``model.to(device)``, before building the optimiser): blocks
    compiled per ``compile`` (see :func:`resolve_compile`), convolutions channels-last on CUDA when
    ``channels_last``. Returns what was done, for the run's log."""
    from cdkd.models.mmoa import MMoA

    done = {"compiled_blocks": 0, "channels_last_convs": 0}
    if channels_last and device.type == "cuda":
        done["channels_last_convs"] = channels_last_convs(model, within=MMoA)
    if resolve_compile(compile, device):
        done["compiled_blocks"] = compile_blocks(model)
    return done
