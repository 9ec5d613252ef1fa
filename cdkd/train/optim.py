"""Optimiser parameter groups and learning-rate schedules shared by distillation and fine-tuning."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from cdkd.errors import CdkdValueError

if TYPE_CHECKING:
    from cdkd.config import TrainConfig

LR_SCHEDULES = ("cosine", "poly")
COMPILE_MODES = ("auto", "on", "off")  # TrainConfig.compile; cdkd.models.speedups resolves them
AMP_MODES = ("auto", "bf16", "fp16", "none")


def adamw(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases, norms, tokens and position embeddings
    (decaying those only pulls them toward zero, the standard ViT practice since DeiT), nor on parameters marked
    ``_no_weight_decay`` (mamba_ssm's convention, e.g. the SSM's ``A_log``).

    ``fused``: one fused kernel for the whole update instead of a handful of multi-tensor passes; None = fused when
    every trainable parameter is a CUDA floating-point tensor (build the optimiser after moving the model), else
    torch's default multi-tensor form (the CPU's optimiser is unchanged).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keep = p.ndim <= 1 or "token" in name or "pos_embed" in name or getattr(p, "_no_weight_decay", False)
        (no_decay if keep else decay).append(p)
    if fused is None:
        params = decay + no_decay
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True) if fused else torch.optim.AdamW(groups, lr=lr)


def lr_lambda(kind: str, warmup: int, steps: int, power: float = 0.9) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``warmup`` steps, then cosine or polynomial (power 0.9,
    mmsegmentation's default) decay to zero at ``steps``."""
    if kind not in LR_SCHEDULES:
        raise CdkdValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    warm = min(warmup, max(steps - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(1, steps - warm), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** power

    return f


def check_train_config(train: TrainConfig) -> None:
    """User-facing checks of the training settings every job shares."""
    if train.steps is not None and train.epochs is not None:
        raise CdkdValueError("give --steps or --epochs, not both")
    if train.amp not in AMP_MODES:
        raise CdkdValueError(f"amp must be {', '.join(AMP_MODES)}, got {train.amp!r}")
    if train.batch_size < 1 or train.grad_accum < 1:
        raise CdkdValueError("batch size and gradient accumulation must be >= 1")
    if train.lr_schedule not in LR_SCHEDULES:
        raise CdkdValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {train.lr_schedule!r}")
    if train.tensorboard:  # before any data is read, not at the first row
        from cdkd.train.tensorboard import require_tensorboard

        require_tensorboard()
    if train.compile not in COMPILE_MODES:
        raise CdkdValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {train.compile!r}")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: bf16 by default on CUDA, none on the CPU.

    fp16 needs a ``GradScaler`` against underflow (enable it when this returns ``torch.float16``); bf16 does not.
    """
    if device.type != "cuda" or amp == "none":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16
