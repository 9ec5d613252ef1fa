"""Decoder training on the frozen student: ``finetune(cfg, out_dir)`` is what ``cdkd finetune`` calls.

The DINOv2 protocol of the paper: the distilled student stays frozen and only a UPerNet (or linear) decoder
learns, from random crops of labeled tiles, with cross-entropy that honours the ignore index. The run folder,
checkpoints and resume work as for distillation (``cdkd.utils.rundir``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import cdkd
from cdkd.artifacts import SegmenterInfo, StudentInfo, load_student, save_segmenter
from cdkd.config import FinetuneConfig, save_config, to_dict
from cdkd.data import StepSampler, check_tile_size
from cdkd.data.classes import ClassSchema
from cdkd.data.labeled import FORMATS, LabeledTiles, class_frequencies, find_pairs, schema_for
from cdkd.errors import CdkdValueError
from cdkd.models.upernet import Segmenter
from cdkd.utils.checkpoint import restore_model, rng_state, save_checkpoint, set_rng_state, trainable_state
from cdkd.utils.distributed import DistContext, resolve_device
from cdkd.utils.optim import adamw, autocast_dtype, check_train_config, lr_lambda
from cdkd.utils.rundir import RunDir, check_resumable

CHECKPOINT_FORMAT = "cdkd.finetune-checkpoint"
DEFAULT_EPOCHS = 30.0
RESUMABLE_KEYS = {"train.steps", "train.epochs", "train.checkpoint_every", "train.log_every", "train.device",
                  "data.num_workers", "data.root", "student"}


def run_dir(root: str | Path) -> RunDir:
    """The layout of a fine-tuning run folder (artifact ``segmenter.pt``)."""
    return RunDir(Path(root), "segmenter.pt", "fine-tuning run")


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    segmenter_path: Path
    steps: int
    loss: float
    seconds: float


def resolve_tiling(cfg: FinetuneConfig, student: StudentInfo) -> tuple[int, int]:
    """(tile size, overlap): the configured ones, else the student's tile and a quarter of it."""
    tile = check_tile_size(cfg.data.tile_size or student.tile_size)
    overlap = tile // 4 if cfg.data.overlap is None else cfg.data.overlap
    if not 0 <= overlap < tile:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    return tile, overlap


def class_weights(freq: np.ndarray) -> torch.Tensor:
    """Inverse square-root frequency weights, mean 1; classes absent from the data get weight 0."""
    w = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1)), 0.0)
    return torch.tensor(w / max(w[w > 0].mean(), 1e-12), dtype=torch.float32)


def finetune(
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train the decoder of ``cfg.head`` on the frozen student ``cfg.student`` into ``out_dir/segmenter.pt``."""
    log = log or (lambda m: print(m, file=sys.stderr))
    paths = run_dir(out_dir)
    if cfg.data.format not in FORMATS:
        raise CdkdValueError(f"unknown format {cfg.data.format!r}; choose one of {', '.join(FORMATS)}")
    if cfg.head.type not in ("upernet", "linear"):
        raise CdkdValueError(f"head must be 'upernet' or 'linear', got {cfg.head.type!r}")
    check_train_config(cfg.train)
    student, sinfo = load_student(cfg.student)
    tile, overlap = resolve_tiling(cfg, sinfo)
    schema = schema_for(cfg.data.format, cfg.data.classes)
    pairs = find_pairs(cfg.data.root, cfg.data.format, cfg.data.split)
    blob = paths.check(resume, overwrite, CHECKPOINT_FORMAT)
    if blob is not None:
        check_resumable(blob["config"], to_dict(cfg), RESUMABLE_KEYS, paths.checkpoints)
    else:
        paths.reset()
    save_config(cfg, paths.config)

    device = resolve_device(cfg.train.device, DistContext())
    torch.manual_seed(cfg.train.seed)
    model = Segmenter(student, num_classes=schema.num_classes, head=cfg.head.type, layers=cfg.head.layers,
                      channels=cfg.head.channels, freeze_encoder=not cfg.head.unfreeze, norm=cfg.head.norm).to(device)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    epochs = cfg.train.epochs if cfg.train.epochs is not None else DEFAULT_EPOCHS
    steps = cfg.train.steps if cfg.train.steps is not None else max(1, math.ceil(epochs * len(pairs) / per_step))
    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps,
                                                                       steps))
    weight = class_weights(class_frequencies(pairs, schema)).to(device) if cfg.head.class_balanced else None
    start = 0
    if blob is not None:
        restore_model(model, blob["model"], paths.checkpoints)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        start = int(blob["step"])
        log(f"resuming {paths.root} at step {start}")
    paths.truncate_metrics(start)

    dataset = LabeledTiles(pairs, schema, sinfo.norm, tile, augment=cfg.data.augment, seed=cfg.train.seed)
    sampler = StepSampler(cfg.train.batch_size, start_micro_step=start * cfg.train.grad_accum,
                          num_micro_steps=steps * cfg.train.grad_accum)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda",
                        # Its own generator: drawing the workers' base seed from the global RNG would shift
                        # dropout's random stream after a resume.
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    log(f"fine-tuning a {cfg.head.type} head on {sinfo.arch} ({'full' if cfg.head.unfreeze else 'frozen encoder'}) "
        f"on {len(pairs)} pairs, {schema.num_classes} classes, {steps} steps, tile {tile}, device {device}")
    loop = _Loop(cfg, model, optimizer, scheduler, schema, weight, device, paths)
    t0 = time.perf_counter()
    loss = loop.run(iter(loader), start, steps, progress)
    seconds = time.perf_counter() - t0

    info = SegmenterInfo(student=sinfo, head=model.config(), classes=schema, tile_size=tile, overlap=overlap)
    save_segmenter(paths.artifact, model, info)
    paths.write_report({"segmenter": str(paths.artifact), "steps": steps, "resumed_from": start,
                        "seconds": round(seconds, 2), "final_loss": loss, "pairs": len(pairs),
                        "classes": list(schema.names), "cdkd_version": cdkd.__version__})
    return FinetuneResult(paths.root, paths.artifact, steps, loss, seconds)


class _Loop:
    def __init__(self, cfg: FinetuneConfig, model: Segmenter, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, schema: ClassSchema, weight: torch.Tensor | None,
                 device: torch.device, paths: RunDir) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.schema, self.weight, self.device, self.paths = schema, weight, device, paths
        self.amp_dtype = autocast_dtype(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)

    def run(self, batches: Iterator[dict], start: int, steps: int, progress: bool) -> float:
        cfg = self.cfg.train
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
        self.model.train()
        loss = math.nan
        tick = time.perf_counter()
        for step in range(start, steps):
            loss, acc = self._step(batches)
            self.scheduler.step()
            done = step + 1
            now = time.perf_counter()
            speed = cfg.batch_size * cfg.grad_accum / max(now - tick, 1e-9)
            tick = now
            if done % cfg.log_every == 0 or done == steps:
                self.paths.write_metrics({"step": done, "lr": self.scheduler.get_last_lr()[0], "loss": loss,
                                          "pixel_acc": acc, "images_per_s": speed})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{speed:.1f}")
            if done % cfg.checkpoint_every == 0 or done == steps:
                save_checkpoint(self.paths.checkpoints, done, fmt=CHECKPOINT_FORMAT, payload={
                    "config": to_dict(self.cfg), "model": trainable_state(self.model),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(), "cdkd_version": cdkd.__version__})
        if bar is not None:
            bar.close()
        return loss

    def _step(self, batches: Iterator[dict]) -> tuple[float, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns (mean loss, pixel accuracy)."""
        cfg = self.cfg.train
        total, correct, counted = 0.0, 0, 0
        ignore = self.schema.ignore_index
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, weight=self.weight, ignore_index=ignore)
            if not torch.isfinite(loss):  # a crop that is all ignore pixels: nothing to learn from
                loss = logits.sum() * 0.0
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            keep = labels != ignore
            correct += int((logits.argmax(1)[keep] == labels[keep]).sum())
            counted += int(keep.sum())
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, correct / max(counted, 1)


__all__ = ["FinetuneResult", "class_weights", "finetune", "resolve_tiling", "run_dir"]
