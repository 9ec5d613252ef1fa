"""Decoder training on the frozen student: ``finetune(cfg, out_dir)`` is what ``cdkd finetune`` calls.

The DINOv2 protocol of the paper: the distilled student stays frozen and only a UPerNet (or linear) decoder
learns, from random crops of labeled tiles, with cross-entropy that honours the ignore index. The run folder,
checkpoints and resume work as for distillation (``cdkd.utils.rundir``).

``cfg.task == "instance"`` trains a Mask R-CNN on the student instead (``cdkd.finetune.instance``: COCO or
georeferenced vector labels in, ``detector.pt`` out) through the same loop, checkpoints and resume; only the data,
the model, the loss of a micro-batch and the artifact differ.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import cdkd
from cdkd.artifacts import TASKS, SegmenterInfo, StudentInfo, load_student, save_segmenter
from cdkd.config import FinetuneConfig, absolute_paths, check_ranges, save_config, to_dict
from cdkd.data import StepSampler, check_tile_size
from cdkd.data.sampler import batches
from cdkd.data.classes import ClassSchema
from cdkd.data.labelcheck import check_labels
from cdkd.data.labeled import FORMATS, LabeledTiles, class_frequencies, find_pairs, schema_for
from cdkd.errors import CdkdValueError
from cdkd.models.upernet import Segmenter
from cdkd.progress import progress_bar
from cdkd.utils.checkpoint import restore_model, rng_state, save_checkpoint, set_rng_state, trainable_state
from cdkd.utils.distributed import DistContext, resolve_device
from cdkd.utils.optim import adamw, autocast_dtype, check_train_config, lr_lambda
from cdkd.utils.paths import file_sha256, files_digest
from cdkd.utils.rundir import RunDir, check_identity, check_resumable

CHECKPOINT_FORMAT = "cdkd.finetune-checkpoint"
DEFAULT_EPOCHS = 30.0
RESUMABLE_KEYS = {"train.steps", "train.epochs", "train.checkpoint_every", "train.log_every", "train.device",
                  "train.tensorboard", "data.num_workers", "data.root", "student"}


def run_dir(root: str | Path, task: str = "semantic") -> RunDir:
    """The layout of a fine-tuning run folder (artifact ``segmenter.pt``, or ``detector.pt`` for instances)."""
    return RunDir(Path(root), "detector.pt" if task == "instance" else "segmenter.pt", "fine-tuning run")


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    segmenter_path: Path  # the artifact: segmenter.pt, or detector.pt for task "instance"
    steps: int
    loss: float
    seconds: float
    task: str = "semantic"


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
    """Train the decoder of ``cfg.head`` on the frozen student ``cfg.student`` into ``out_dir/segmenter.pt`` (task
    "instance": a Mask R-CNN into ``out_dir/detector.pt``)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    check_ranges(cfg)
    cfg = absolute_paths(cfg)
    if cfg.task not in TASKS:
        raise CdkdValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    instance = cfg.task == "instance"
    if instance:
        from cdkd.finetune import instance as task
    paths = run_dir(out_dir, cfg.task)
    if instance:
        task.check_format(cfg.data.format)
    elif cfg.data.format not in FORMATS:
        raise CdkdValueError(f"unknown format {cfg.data.format!r}; choose one of {', '.join(FORMATS)} (instance "
                             "formats coco and geo go with --task instance)")
    if not instance and cfg.head.type not in ("upernet", "linear"):
        raise CdkdValueError(f"head must be 'upernet' or 'linear', got {cfg.head.type!r}")
    if not instance and cfg.head.type == "upernet" and cfg.head.norm == "bn" and cfg.train.batch_size < 2:
        # BatchNorm after the 1x1 pyramid pooling sees one value per channel at batch 1 and cannot train
        raise CdkdValueError("--batch-size 1 cannot train the UPerNet's BatchNorm (its 1x1 pyramid pooling has one "
                             "value per channel); use --batch-size 2 or more (with --grad-accum to save memory), or "
                             "head.norm: gn in --config")
    check_train_config(cfg.train)
    student, sinfo = load_student(cfg.student)
    tile, overlap = resolve_tiling(cfg, sinfo)
    if instance:
        data = task.read_data(cfg.data, log)
        schema, samples = data.schema, len(data.images)
        sinfo = replace(sinfo, norm=task.training_norm(data, sinfo.norm, sinfo.in_chans, log))
    else:
        schema = schema_for(cfg.data.format, cfg.data.classes)
        pairs = find_pairs(cfg.data.root, cfg.data.format, cfg.data.split)
        check_labels(pairs, schema, cfg.data.format, log)
        samples = len(pairs)
    blob = paths.check(resume, overwrite, CHECKPOINT_FORMAT)
    if blob is not None:
        check_resumable(blob["config"], to_dict(cfg), RESUMABLE_KEYS, paths.checkpoints)
    files = ([im.path for im in data.images] if instance else [f for pair in pairs for f in (pair.image, pair.mask)])
    identity = run_identity(cfg, files)
    if blob is not None and "identity" in blob:
        check_identity(blob["identity"], identity, paths.checkpoints)

    device = resolve_device(cfg.train.device, DistContext())
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    epochs = cfg.train.epochs if cfg.train.epochs is not None else DEFAULT_EPOCHS
    steps = cfg.train.steps if cfg.train.steps is not None else max(1, math.ceil(epochs * samples / per_step))
    if blob is not None and int(blob["step"]) >= steps and paths.artifact.is_file():
        log(f"{paths.root}: already finished at step {blob['step']}; nothing to do (give more --steps to go on)")
        report = json.loads(paths.report.read_text()) if paths.report.is_file() else {}
        return FinetuneResult(paths.root, paths.artifact, int(blob["step"]), report.get("final_loss"), 0.0, cfg.task)
    torch.manual_seed(cfg.train.seed)
    if instance:
        model = task.build_detector(student, schema.num_classes, cfg).to(device)
    else:
        model = Segmenter(student, num_classes=schema.num_classes, head=cfg.head.type, layers=cfg.head.layers,
                          channels=cfg.head.channels, freeze_encoder=not cfg.head.unfreeze, norm=cfg.head.norm
                          ).to(device)
    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps,
                                                                       steps))
    weight = (class_weights(class_frequencies(pairs, schema)).to(device) if cfg.head.class_balanced and not instance
              else None)
    start = 0
    if blob is not None:
        restore_model(model, blob["model"], paths.checkpoints)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        start = int(blob["step"])

    if instance:
        dataset, collate = task.tiles(data, sinfo.norm, tile, cfg), task.collate_instances
    else:
        dataset, collate = LabeledTiles(pairs, schema, sinfo.norm, tile, augment=cfg.data.augment,
                                        seed=cfg.train.seed), None
    sampler = StepSampler(cfg.train.batch_size, start_micro_step=start * cfg.train.grad_accum,
                          num_micro_steps=steps * cfg.train.grad_accum)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate,
                        # Its own generator: drawing the workers' base seed from the global RNG would shift
                        # dropout's random stream after a resume.
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    what = (f"a Mask R-CNN on {sinfo.arch}" if instance else f"a {cfg.head.type} head on {sinfo.arch}")
    items = f"{samples} images, {data.num_objects} objects" if instance else f"{len(pairs)} pairs"
    with paths.session(fresh=blob is None, start=start, steps=steps, tensorboard=cfg.train.tensorboard):
        save_config(cfg, paths.config)
        paths.truncate_metrics(start)
        if start:
            log(f"resuming {paths.root} at step {start}")
        log(f"fine-tuning {what} ({'full' if cfg.head.unfreeze else 'frozen encoder'}) on {items}, "
            f"{schema.num_classes} classes, {steps} steps, tile {tile}, device {device}")
        loop = (task.InstanceLoop if instance else _Loop)(cfg, model, optimizer, scheduler, schema, weight, device,
                                                            paths, identity)
        t0 = time.perf_counter()
        loss = loop.run(batches(loader), start, steps, progress)
        seconds = time.perf_counter() - t0
        if math.isnan(loss):  # resumed at its last step: nothing ran, the loss is the one logged
            loss = paths.last_metrics().get("loss", loss)

        if instance:
            task.save(paths.artifact, model, sinfo, schema, tile, overlap)
        else:
            info = SegmenterInfo(student=sinfo, head=model.config(), classes=schema, tile_size=tile, overlap=overlap)
            save_segmenter(paths.artifact, model, info)
        paths.write_report({("detector" if instance else "segmenter"): str(paths.artifact), "task": cfg.task,
                            "steps": steps, "resumed_from": start, "seconds": round(seconds, 2), "final_loss": loss,
                            ("images" if instance else "pairs"): samples, "classes": list(schema.names),
                            "cdkd_version": cdkd.__version__})
    return FinetuneResult(paths.root, paths.artifact, steps, loss, seconds, cfg.task)


def run_identity(cfg: FinetuneConfig, files: list) -> dict[str, str]:
    """What a fine-tuning run reads, by content: the student's weights, the labeled files (paths relative to the
    data folder, sizes) and the class and label files. A resumed run must read the same."""
    identity = {"student": file_sha256(cfg.student), "data": files_digest(files, cfg.data.root)}
    for name in ("classes", "labels"):
        path = getattr(cfg.data, name)
        if path and Path(path).is_file():
            identity[name] = file_sha256(path)
    return identity


class _Loop:
    def __init__(self, cfg: FinetuneConfig, model: Segmenter, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, schema: ClassSchema, weight: torch.Tensor | None,
                 device: torch.device, paths: RunDir, identity: dict[str, str] | None = None) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.schema, self.weight, self.device, self.paths = schema, weight, device, paths
        self.identity = identity or {}
        self.amp_dtype = autocast_dtype(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)

    def run(self, batches: Iterator[dict], start: int, steps: int, progress: bool) -> float:
        cfg = self.cfg.train
        bar = None
        if progress:
            bar = progress_bar(steps, initial=start, desc="finetune", unit="step")
        self.model.train()
        loss = math.nan
        tick = time.perf_counter()
        for step in range(start, steps):
            loss, logs = self._step(batches)
            self.scheduler.step()
            done = step + 1
            now = time.perf_counter()
            speed = cfg.batch_size * cfg.grad_accum / max(now - tick, 1e-9)
            tick = now
            if done % cfg.log_every == 0 or done == steps:
                self.paths.write_metrics({"step": done, "lr": self.scheduler.get_last_lr()[0], "loss": loss,
                                          **logs, "images_per_s": speed})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", **self._postfix(logs), img_s=f"{speed:.1f}")
            if done % cfg.checkpoint_every == 0 or done == steps:
                save_checkpoint(self.paths.checkpoints, done, fmt=CHECKPOINT_FORMAT, payload={
                    "config": to_dict(self.cfg), "model": trainable_state(self.model),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(), "identity": self.identity, "cdkd_version": cdkd.__version__})
                self.paths.draw_curves()
        if bar is not None:
            bar.close()
        return loss

    def _micro(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch and the counts its log line sums over the step (``_logs``)."""
        ignore = self.schema.ignore_index
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, weight=self.weight, ignore_index=ignore)
        if not torch.isfinite(loss):  # a crop that is all ignore pixels: nothing to learn from
            loss = logits.sum() * 0.0
        keep = labels != ignore
        return loss, {"correct": int((logits.argmax(1)[keep] == labels[keep]).sum()), "counted": int(keep.sum())}

    def _logs(self, counts: dict[str, float]) -> dict[str, float]:
        """What a step's summed counts put in ``metrics.jsonl``."""
        return {"pixel_acc": counts["correct"] / max(counts["counted"], 1)}

    def _postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"acc": f"{logs['pixel_acc']:.3f}"}

    def _step(self, batches: Iterator[dict]) -> tuple[float, dict[str, float]]:
        """One optimiser step over ``grad_accum`` micro-batches; returns (mean loss, ``_logs``)."""
        cfg = self.cfg.train
        total, counts = 0.0, {}
        for _ in range(cfg.grad_accum):
            loss, parts = self._micro(next(batches))
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            for k, v in parts.items():
                counts[k] = counts.get(k, 0) + v
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, self._logs(counts)


__all__ = ["FinetuneResult", "class_weights", "finetune", "resolve_tiling", "run_dir"]
