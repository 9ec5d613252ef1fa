"""Fine-tuning on the distilled student: ``finetune(cfg, out_dir)`` is what ``cdkd finetune`` calls.

The task (``cfg.task``, ``cdkd.tasks``) says what is trained: a UPerNet (or linear) head for land-cover classes
(``segmenter.pt``) or a Mask R-CNN for objects (``detector.pt``), its data, its loss and its artifact. This module
does what every task shares, on the one training loop (``cdkd.train.loop``): the run folder that is never silently
overwritten, its identity checked on ``--resume``, the optimiser and LR schedule, checkpoints that restore the
exact trajectory, the report.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

import cdkd
from cdkd.artifacts import StudentInfo, load_student
from cdkd.config import FinetuneConfig, absolute_paths, check_ranges, save_config, to_dict
from cdkd.data import StepSampler, check_tile_size
from cdkd.data.sampler import batches
from cdkd.errors import CdkdValueError
from cdkd.tasks import task_named
from cdkd.train.checkpoint import restore_model, rng_state, set_rng_state, trainable_state
from cdkd.train.distributed import DistContext, resolve_device
from cdkd.train.loop import TrainLoop
from cdkd.train.optim import adamw, check_train_config, lr_lambda
from cdkd.train.rundir import RESUMABLE_TRAINING_KEYS, RunDir, check_identity, check_resumable
from cdkd.utils.paths import file_sha256, files_digest

CHECKPOINT_FORMAT = "cdkd.finetune-checkpoint"
DEFAULT_EPOCHS = 30.0
RESUMABLE_KEYS = RESUMABLE_TRAINING_KEYS | {"student"}


def run_dir(root: str | Path, task: str = "semantic") -> RunDir:
    """The layout of a fine-tuning run folder for ``task`` (artifact ``segmenter.pt`` or ``detector.pt``)."""
    return RunDir(Path(root), task_named(task).artifact_name, "fine-tuning run")


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


def finetune(
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train ``cfg.task``'s model on the student ``cfg.student`` into ``out_dir`` (``segmenter.pt`` for the
    semantic task, ``detector.pt`` for instances)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    check_ranges(cfg)
    cfg = absolute_paths(cfg)
    task = task_named(cfg.task)
    task.check(cfg)
    check_train_config(cfg.train)
    paths = run_dir(out_dir, cfg.task)
    student, sinfo = load_student(cfg.student)
    tile, overlap = resolve_tiling(cfg, sinfo)
    data = task.training_data(cfg, sinfo, log)
    blob = paths.check(resume, overwrite, CHECKPOINT_FORMAT)
    if blob is not None:
        check_resumable(blob["config"], to_dict(cfg), RESUMABLE_KEYS, paths.checkpoints)
    identity = run_identity(cfg, data.files)
    if blob is not None and "identity" in blob:
        check_identity(blob["identity"], identity, paths.checkpoints)

    device = resolve_device(cfg.train.device, DistContext())
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    epochs = cfg.train.epochs if cfg.train.epochs is not None else DEFAULT_EPOCHS
    steps = cfg.train.steps if cfg.train.steps is not None else max(1, math.ceil(epochs * data.samples / per_step))
    if blob is not None and int(blob["step"]) >= steps and paths.artifact.is_file():
        log(f"{paths.root}: already finished at step {blob['step']}; nothing to do (give more --steps to go on)")
        report: Any = json.loads(paths.report.read_text()) if paths.report.is_file() else {}
        return FinetuneResult(paths.root, paths.artifact, int(blob["step"]), report.get("final_loss"), 0.0, cfg.task)
    torch.manual_seed(cfg.train.seed)
    model = task.build(student, data.schema, cfg).to(device)
    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, steps)
    )
    objective = task.objective(model, data, cfg, device)

    def payload(step: int) -> dict:
        return {
            "config": to_dict(cfg),
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "identity": identity,
            "cdkd_version": cdkd.__version__,
        }

    loop = TrainLoop(
        cfg.train,
        model,
        optimizer,
        scheduler,
        device,
        paths,
        payload,
        CHECKPOINT_FORMAT,
        name="finetune",
        progress=progress,
        log=log,
    )
    start = 0
    if blob is not None:
        restore_model(model, blob["model"], paths.checkpoints)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        start = int(blob["step"])

    dataset, collate = task.dataset(data, tile, cfg)
    sampler = StepSampler(
        cfg.train.batch_size,
        start_micro_step=start * cfg.train.grad_accum,
        num_micro_steps=steps * cfg.train.grad_accum,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        # Its own generator: drawing the workers' base seed from the global RNG would shift
        # dropout's random stream after a resume.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    with paths.session(fresh=blob is None):
        save_config(cfg, paths.config)
        paths.truncate_metrics(start)
        if start:
            log(f"resuming {paths.root} at step {start}")
        log(
            f"fine-tuning {task.describe(cfg, sinfo)} ({'full' if cfg.head.unfreeze else 'frozen encoder'}) on "
            f"{data.describe}, {data.schema.num_classes} classes, {steps} steps, tile {tile}, device {device}"
        )
        t0 = time.perf_counter()
        last = loop.run(objective, batches(loader), start, steps)
        seconds = time.perf_counter() - t0
        # resumed at its last step, nothing ran: the loss is the one logged
        loss = last.loss if last is not None else paths.last_metrics().get("loss", math.nan)
        task.save(paths.artifact, model, replace(sinfo, norm=data.norm), data.schema, tile, overlap)
        loop.finish(
            {
                task.artifact_name.removesuffix(".pt"): str(paths.artifact),
                "task": cfg.task,
                "steps": steps,
                "resumed_from": start,
                "seconds": round(seconds, 2),
                "final_loss": loss,
                **task.report(data),
                "classes": list(data.schema.names),
                "cdkd_version": cdkd.__version__,
            }
        )
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


__all__ = ["FinetuneResult", "finetune", "resolve_tiling", "run_dir"]
