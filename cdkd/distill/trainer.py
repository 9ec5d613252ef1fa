"""The distillation run: data, models, optimiser and the training loop, with checkpoints and resume.

``distill(cfg, out_dir)`` is what ``cdkd distill`` calls. The loop itself (``_train_step``) is small; the rest
is bookkeeping a long job needs: an output folder that is never silently overwritten, atomic checkpoints that
restore the exact trajectory, JSON-lines metrics, a progress bar and a final report.

Under ``torchrun --nproc_per_node K`` the same call trains with DDP; every rank reads its own share of each
step's samples (``StepSampler``) and the loss schedule is steered by losses averaged over ranks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import cdkd
from cdkd.artifacts import StudentInfo, save_student
from cdkd.config import DistillConfig, save_config, to_dict
from cdkd.data import (NormStats, StepSampler, UnlabeledTiles, check_tile_size, compute_stats, find_rasters,
                       require_one_dtype)
from cdkd.distill.objective import MaskCDKD
from cdkd.distill.schedule import LossSchedule
from cdkd.errors import CheckpointError, CdkdValueError
from cdkd.models.mae import PatchMasker
from cdkd.models.student import STUDENT_REGISTRY, build_student
from cdkd.models.teacher import build_teacher, check_teacher_source, teacher_provenance
from cdkd.utils.checkpoint import restore_model, rng_state, save_checkpoint, set_rng_state, trainable_state
from cdkd.utils.distributed import DistContext, cleanup_distributed, init_distributed, resolve_device
from cdkd.utils.optim import adamw, autocast_dtype, check_train_config, lr_lambda
from cdkd.utils.rundir import RunDir, check_resumable

DEFAULT_STEPS = 1000
# Settings a resumed run may change: they do not alter the trajectory (or, for steps, only extend it).
RESUMABLE_KEYS = {"train.steps", "train.epochs", "train.checkpoint_every", "train.log_every", "train.device",
                  "data.num_workers", "data.root", "teacher.checkpoint", "teacher.grad_checkpointing"}


CHECKPOINT_FORMAT = "cdkd.distill-checkpoint"


def run_dir(root: str | Path) -> RunDir:
    """The layout of a distillation run folder (artifact ``student.pt``)."""
    return RunDir(Path(root), "student.pt", "distillation run")


@dataclass(frozen=True)
class DistillResult:
    out_dir: Path
    student_path: Path
    steps: int
    losses: dict[str, float]
    stage: str
    seconds: float


def validate_config(cfg: DistillConfig) -> None:
    """User-facing checks before any heavy work."""
    check_tile_size(cfg.data.tile_size)
    check_train_config(cfg.train)
    if cfg.student.arch not in STUDENT_REGISTRY:
        raise CdkdValueError(f"unknown student {cfg.student.arch!r}; choose one of {', '.join(STUDENT_REGISTRY)}")
    # Fail on a missing SAM checkpoint before minutes of data scanning, not after.
    check_teacher_source(cfg.teacher.variant, cfg.teacher.checkpoint, cfg.teacher.random_init)
    if cfg.data.bands is not None and len(cfg.data.bands) != cfg.student.in_chans:
        raise CdkdValueError(f"--bands selects {len(cfg.data.bands)} bands but the student takes "
                             f"{cfg.student.in_chans} (--in-chans)")


def total_steps(cfg: DistillConfig, num_files: int, world_size: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    if cfg.train.epochs is not None:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * world_size
        return max(1, math.ceil(cfg.train.epochs * num_files / per_step))
    return DEFAULT_STEPS


def distill(
    cfg: DistillConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DistillResult:
    """Run Mask-CDKD distillation described by ``cfg`` into ``out_dir``; returns where ``student.pt`` is.

    ``resume`` continues the newest checkpoint in ``out_dir/checkpoints`` on the same trajectory;
    ``overwrite`` discards an earlier run in ``out_dir``. Without either, an existing run is an error.
    """
    validate_config(cfg)
    ctx = init_distributed(cfg.train.device)
    try:
        return _Run(cfg, run_dir(out_dir), ctx, progress, log or _stderr).run(resume, overwrite)
    finally:
        cleanup_distributed(ctx)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class _Run:
    def __init__(self, cfg: DistillConfig, paths: RunDir, ctx: DistContext, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.paths, self.ctx, self.progress = cfg, paths, ctx, progress
        self.log = log if ctx.is_main else (lambda _msg: None)
        self.device = resolve_device(cfg.train.device, ctx)
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    # ----------------------------------------------------------------------------------------------- set-up
    def _check_out_dir(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        blob = self.paths.check(resume, overwrite, CHECKPOINT_FORMAT)
        if blob is not None:
            check_resumable(blob["config"], to_dict(self.cfg), RESUMABLE_KEYS, self.paths.checkpoints)
        return blob

    def _reset_out_dir(self) -> None:
        self.ctx.barrier()  # every rank has looked before rank 0 deletes
        if self.ctx.is_main:
            self.paths.reset()

    def _build(self, stats: NormStats) -> tuple[MaskCDKD, StudentInfo]:
        cfg = self.cfg
        # Seeding before construction makes a random teacher (and all fresh heads) a function of the seed,
        # which is how a resumed run rebuilds the same frozen random weights without storing them.
        torch.manual_seed(cfg.train.seed)
        teacher = build_teacher(cfg.teacher)
        arch_args = {"img_size": cfg.data.tile_size, "in_chans": cfg.student.in_chans}
        student = build_student(cfg.student.arch, **arch_args)
        model = MaskCDKD(teacher, student, cfg.objective, in_chans=cfg.student.in_chans)
        info = StudentInfo(arch=cfg.student.arch, arch_args=arch_args, norm=stats, provenance={})
        return model.to(self.device), info

    # ----------------------------------------------------------------------------------------------- the run
    def run(self, resume: bool, overwrite: bool) -> DistillResult:
        cfg = self.cfg
        blob = self._check_out_dir(resume, overwrite)
        bands = cfg.data.bands or tuple(range(1, cfg.student.in_chans + 1))
        rasters = find_rasters(cfg.data.root, bands=bands, min_bands=max(bands))
        require_one_dtype(rasters, cfg.data.root)
        if blob is None:
            self._reset_out_dir()
        if blob is not None:
            stats = NormStats.from_dict(blob["norm"])
        else:
            stats = compute_stats(rasters, bands, n_samples=cfg.data.stats_samples, window=cfg.data.tile_size,
                                  seed=cfg.train.seed)
        steps = total_steps(cfg, len(rasters), self.ctx.world_size)
        model, info = self._build(stats)
        optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, steps))
        o = cfg.objective
        schedule = LossSchedule(o.schedule, o.fixed_weights, o.ema_decay, o.schedule_warmup)
        start = 0
        if blob is not None:
            if abs(blob["teacher_fingerprint"] - model.teacher.fingerprint()) > 1e-6 * abs(blob["teacher_fingerprint"]):
                raise CheckpointError(f"{self.paths.checkpoints}: the teacher's frozen weights differ from the run "
                                      "being resumed (another SAM checkpoint or seed?)")
            restore_model(model, blob["model"], self.paths.checkpoints)
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
            schedule.load_state_dict(blob["schedule"])
            if blob.get("scaler"):
                self.scaler.load_state_dict(blob["scaler"])
            set_rng_state(blob["rng"])
            start = int(blob["step"])
            self.log(f"resuming {self.paths.root} at step {start} (stage {schedule.stage_name})")
        if self.ctx.is_main:
            save_config(cfg, self.paths.config)
            self.paths.truncate_metrics(start)
        self.ctx.barrier()

        dataset = UnlabeledTiles(rasters, stats, cfg.data.tile_size, augment=cfg.data.augment, seed=cfg.train.seed,
                                 mask_fn=PatchMasker(cfg.data.tile_size, o.mask_ratio))
        accum = cfg.train.grad_accum
        sampler = StepSampler(cfg.train.batch_size, self.ctx.world_size, self.ctx.rank,
                              start_micro_step=start * accum, num_micro_steps=steps * accum)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                            num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False,
                        # Its own generator: drawing the workers' base seed from the global RNG would shift
                        # dropout's random stream after a resume.
                        generator=torch.Generator().manual_seed(cfg.train.seed))
        net: nn.Module = model
        if self.ctx.enabled:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        model.train()
        self.log(f"distilling {cfg.teacher.variant} -> {cfg.student.arch} on {len(rasters)} images, "
                 f"{steps} steps, batch {cfg.train.batch_size}x{accum}x{self.ctx.world_size}, device {self.device}")
        t0 = time.perf_counter()
        last = self._loop(net, model, optimizer, scheduler, schedule, iter(loader), start, steps, stats)
        seconds = time.perf_counter() - t0

        if self.ctx.is_main:
            info = replace(info, provenance=self._provenance(steps, len(rasters)))
            save_student(self.paths.artifact, model.student, info)
            report = {"student": str(self.paths.artifact), "steps": steps, "resumed_from": start,
                      "images_seen": (steps - start) * cfg.train.batch_size * accum * self.ctx.world_size,
                      "seconds": round(seconds, 2), "final_losses": last, "stage": schedule.stage_name,
                      "ratio": schedule.ratio, "files": len(rasters), "cdkd_version": cdkd.__version__}
            self.paths.write_report(report)
        self.ctx.barrier()
        return DistillResult(self.paths.root, self.paths.artifact, steps, last, schedule.stage_name, seconds)

    def _loop(self, net: nn.Module, model: MaskCDKD, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, schedule: LossSchedule, batches: Iterator[dict],
              start: int, steps: int, stats: NormStats) -> dict[str, float]:
        cfg = self.cfg.train
        bar = None
        if self.progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        images_per_step = cfg.batch_size * cfg.grad_accum * self.ctx.world_size
        tick = time.perf_counter()
        for step in range(start, steps):
            weights = schedule.weights
            values = self._train_step(net, model, optimizer, batches, weights)
            scheduler.step()
            kd, t_mae, s_mae = (float(v) for v in self.ctx.mean(values))
            event = schedule.update(t_mae, s_mae)
            now = time.perf_counter()
            speed = images_per_step / max(now - tick, 1e-9)
            tick = now
            last = {"loss": sum(w * v for w, v in zip(weights, (kd, t_mae, s_mae))), "kd": kd, "t_mae": t_mae,
                    "s_mae": s_mae}
            done = step + 1
            if event:
                self.log(event)
                self._write_metrics({"step": done, "event": "stage", "stage": schedule.stage_name,
                                     "ratio": schedule.ratio, "weights": list(schedule.weights)})
            if done % cfg.log_every == 0 or done == steps:
                self._write_metrics(dict(step=done, lr=scheduler.get_last_lr()[0], **last, ratio=schedule.ratio,
                                         stage=schedule.stage_name, weights=list(weights), images_per_s=speed))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", kd=f"{kd:.3f}", t=f"{t_mae:.3f}", s=f"{s_mae:.3f}",
                                stage=schedule.stage_name, r=f"{schedule.ratio:.2f}", img_s=f"{speed:.1f}")
            if done % cfg.checkpoint_every == 0 or done == steps:
                self._checkpoint(done, model, optimizer, scheduler, schedule, stats)
        if bar is not None:
            bar.close()
        return last

    def _train_step(self, net: nn.Module, model: MaskCDKD, optimizer: torch.optim.Optimizer,
                    batches: Iterator[dict], weights: tuple[float, float, float]) -> torch.Tensor:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean (KD, T_MAE, S_MAE) losses."""
        cfg = self.cfg.train
        amp_dtype = self.amp_dtype
        totals = torch.zeros(3)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            images = batch["image"].to(self.device, non_blocking=True)
            mask = batch["mask"].to(self.device, non_blocking=True)
            valid = batch["valid"].to(self.device, non_blocking=True)
            # Skip the gradient all-reduce on all but the last micro-batch of the step.
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = net(images, mask, valid)
                self.scaler.scale(losses.weighted(weights) / cfg.grad_accum).backward()
            totals += losses.detached().cpu() / cfg.grad_accum
        if cfg.clip_grad > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return totals

    # ------------------------------------------------------------------------------------------- bookkeeping
    def _checkpoint(self, step: int, model: MaskCDKD, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, schedule: LossSchedule, stats: NormStats) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(self.paths.checkpoints, step, fmt=CHECKPOINT_FORMAT, payload={
            "config": to_dict(self.cfg), "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "schedule": schedule.state_dict(), "rng": rng_state(),
            "scaler": self.scaler.state_dict(),
            "norm": stats.to_dict(), "teacher_fingerprint": model.teacher.fingerprint(),
            "cdkd_version": cdkd.__version__,
        })

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.paths.write_metrics(record)

    def _provenance(self, steps: int, files: int) -> dict[str, Any]:
        return {"teacher": teacher_provenance(self.cfg.teacher), "data": {"root": self.cfg.data.root, "files": files},
                "steps": steps, "objective": to_dict(self.cfg.objective), "cdkd_version": cdkd.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
