"""The distillation run: data, models, optimiser and the training loop, with checkpoints and resume.

``distill(cfg, out_dir)`` is what ``cdkd distill`` calls, for any recipe (``cfg.recipe``, see
:mod:`cdkd.distill.recipes`): the recipe supplies the teacher, the objective module, the training items and a
``LossControl`` (term weights and the knobs its forward reads); this module supplies the rest. The loop itself
(``_train_step``) is small; the rest is bookkeeping a long job needs: an output folder that is never silently
overwritten, atomic checkpoints that restore the exact trajectory, JSON-lines metrics, a progress bar and a
final report.

Under ``torchrun --nproc_per_node K`` the same call trains with DDP; every rank reads its own share of each
step's samples (``StepSampler``) and the recipe's control is steered by losses averaged over ranks.
"""

from __future__ import annotations

import contextlib
import json
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
from cdkd.config import DistillConfig, absolute_paths, check_ranges, save_config, to_dict
from cdkd.data import NormStats, StepSampler, check_tile_size, compute_stats, find_rasters, require_one_dtype
from cdkd.data.sampler import batches
from cdkd.data.stats import with_band_metadata
from cdkd.distill.bands import choose_bands, readable
from cdkd.distill.recipes import LossControl, Recipe, build_recipe, frozen_fingerprint
from cdkd.errors import CheckpointError, CdkdValueError
from cdkd.models.speedups import apply_speedups
from cdkd.models.student import STUDENT_REGISTRY, build_student
from cdkd.models.teacher import check_teacher_source, teacher_provenance
from cdkd.progress import progress_bar
from cdkd.utils.checkpoint import restore_model, rng_state, save_checkpoint, set_rng_state, trainable_state
from cdkd.utils.distributed import DistContext, cleanup_distributed, init_distributed, resolve_device
from cdkd.utils.optim import adamw, autocast_dtype, check_train_config, lr_lambda
from cdkd.utils.paths import file_sha256, files_digest
from cdkd.utils.rundir import RunDir, check_identity, check_resumable

DEFAULT_STEPS = 1000
# Settings a resumed run may change: they do not alter the trajectory (or, for steps, only extend it).
RESUMABLE_KEYS = {"train.steps", "train.epochs", "train.checkpoint_every", "train.log_every", "train.device",
                  "train.tensorboard", "data.num_workers", "data.root", "teacher.checkpoint",
                  "teacher.grad_checkpointing",
                  "train.compile", "train.channels_last", "teacher.attention"}  # the last three: speed only


CHECKPOINT_FORMAT = "cdkd.distill-checkpoint"


def run_dir(root: str | Path) -> RunDir:
    """The layout of a distillation run folder (artifact ``student.pt``)."""
    return RunDir(Path(root), "student.pt", "distillation run")


@dataclass(frozen=True)
class DistillResult:
    out_dir: Path
    student_path: Path
    steps: int
    losses: dict[str, float]  # the last step's unweighted terms and their weighted sum ("loss")
    stage: str  # the recipe control's stage at the end
    seconds: float
    recipe: str = "mask-cdkd"


def validate_config(cfg: DistillConfig) -> Recipe:
    """User-facing checks before any heavy work; returns the recipe ``cfg`` names."""
    check_ranges(cfg)
    recipe = build_recipe(cfg)
    check_tile_size(cfg.data.tile_size)
    check_train_config(cfg.train)
    if cfg.student.arch not in STUDENT_REGISTRY:
        raise CdkdValueError(f"unknown student {cfg.student.arch!r}; choose one of {', '.join(STUDENT_REGISTRY)}")
    recipe.validate()
    # Fail on a missing SAM checkpoint before minutes of data scanning, not after.
    check_teacher_source(cfg.teacher.variant, cfg.teacher.checkpoint, cfg.teacher.random_init)
    if cfg.data.bands is not None and cfg.student.in_chans is not None and len(cfg.data.bands) != cfg.student.in_chans:
        raise CdkdValueError(f"--bands selects {len(cfg.data.bands)} bands but the student takes "
                             f"{cfg.student.in_chans} (--in-chans)")
    return recipe


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
    """Run the distillation ``cfg`` describes (recipe ``cfg.recipe``) into ``out_dir``; returns where
    ``student.pt`` is.

    ``resume`` continues the newest checkpoint in ``out_dir/checkpoints`` on the same trajectory;
    ``overwrite`` discards an earlier run in ``out_dir``. Without either, an existing run is an error.
    """
    cfg = absolute_paths(cfg)
    recipe = validate_config(cfg)
    ctx = init_distributed(cfg.train.device)
    try:
        return _Run(cfg, recipe, run_dir(out_dir), ctx, progress, log or _stderr).run(resume, overwrite)
    finally:
        cleanup_distributed(ctx)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class _Run:
    def __init__(self, cfg: DistillConfig, recipe: Recipe, paths: RunDir, ctx: DistContext, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.recipe, self.paths, self.ctx, self.progress = cfg, recipe, paths, ctx, progress
        self.log = log if ctx.is_main else (lambda _msg: None)
        self.device = resolve_device(cfg.train.device, ctx)
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    # ----------------------------------------------------------------------------------------------- set-up
    def _settle_bands(self, rasters: list) -> DistillConfig:
        """The configuration with the bands it reads settled (``cdkd.distill.bands``); the recipe follows it."""
        cfg = choose_bands(self.cfg, rasters, self.recipe.every_band, self.log)
        if cfg != self.cfg:
            self.cfg, self.recipe = cfg, validate_config(cfg)
        return cfg

    def _identity(self, rasters: list) -> dict[str, Any]:
        """What the run reads, by content: the data files (paths relative to the data folder, sizes) and the
        teacher's weights. A resumed run must read the same."""
        teacher = self.cfg.teacher
        weights = (f"random (seed {self.cfg.train.seed})" if teacher.random_init or not teacher.checkpoint
                   else file_sha256(teacher.checkpoint))
        return {"data": files_digest([r.path for r in rasters], self.cfg.data.root), "teacher": weights}

    def _build(self, stats: NormStats) -> tuple[nn.Module, StudentInfo]:
        cfg = self.cfg
        # Seeding before construction makes a random teacher (and all fresh heads) a function of the seed,
        # which is how a resumed run rebuilds the same frozen random weights without storing them.
        torch.manual_seed(cfg.train.seed)
        teacher = self.recipe.build_teacher()
        arch_args = {"img_size": cfg.data.tile_size, "in_chans": cfg.student.in_chans}
        student = build_student(cfg.student.arch, **arch_args)
        if cfg.student.grad_checkpointing:
            student.set_grad_checkpointing(True)
        model = self.recipe.build(teacher, student).to(self.device)
        done = apply_speedups(model, self.device, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
        if any(done.values()):
            self.log(f"speed-ups: {done['compiled_blocks']} blocks compiled, "
                     f"{done['channels_last_convs']} convolutions channels-last")
        info = StudentInfo(arch=cfg.student.arch, arch_args=arch_args, norm=stats, provenance={})
        return model, info

    # ----------------------------------------------------------------------------------------------- the run
    def run(self, resume: bool, overwrite: bool) -> DistillResult:
        blob = self.paths.check(resume, overwrite, CHECKPOINT_FORMAT)
        rasters = find_rasters(self.cfg.data.root, bands=self.cfg.data.bands, min_bands=self.cfg.student.in_chans or 1)
        require_one_dtype(rasters, self.cfg.data.root)
        cfg = self._settle_bands(rasters)
        bands = cfg.data.bands
        rasters = readable(rasters, bands, cfg.data.root)
        if blob is not None:
            check_resumable(blob["config"], to_dict(cfg), RESUMABLE_KEYS, self.paths.checkpoints)
        identity = self._identity(rasters)
        if blob is not None and "identity" in blob:
            check_identity(blob["identity"], identity, self.paths.checkpoints)
        steps = total_steps(cfg, len(rasters), self.ctx.world_size)
        if blob is not None and int(blob["step"]) >= steps and self.paths.artifact.is_file():
            return self._finished(int(blob["step"]), blob)
        if blob is not None:
            stats = NormStats.from_dict(blob["norm"])
        else:
            stats = compute_stats(rasters, bands, n_samples=cfg.data.stats_samples, window=cfg.data.tile_size,
                                  seed=cfg.train.seed)
            stats = with_band_metadata(stats, rasters, cfg.data.wavelengths)  # student.pt says what its bands measure
        self.recipe.stats = stats
        model, info = self._build(stats)
        optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, steps))
        control = self.recipe.control()
        start = 0
        if blob is not None:
            if abs(blob["teacher_fingerprint"] - frozen_fingerprint(model)) > 1e-6 * abs(blob["teacher_fingerprint"]):
                raise CheckpointError(f"{self.paths.checkpoints}: the teacher's frozen weights differ from the run "
                                      "being resumed (another SAM checkpoint or seed?)")
            restore_model(model, blob["model"], self.paths.checkpoints)
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
            control.load_state_dict(blob["schedule"])
            if blob.get("scaler"):
                self.scaler.load_state_dict(blob["scaler"])
            set_rng_state(blob["rng"])
            start = int(blob["step"])
        dataset = self.recipe.dataset(rasters, stats)
        self.ctx.barrier()  # every rank has looked at the folder before rank 0 changes it
        with self.paths.session(fresh=blob is None, main=self.ctx.is_main, start=start, steps=steps,
                                tensorboard=cfg.train.tensorboard):
            if start:
                self.log(f"resuming {self.paths.root} at step {start} (stage {control.stage})")
            if self.ctx.is_main:
                save_config(cfg, self.paths.config)
                self.paths.truncate_metrics(start)
            self.ctx.barrier()
            self.identity = identity
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
                net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None)
            model.train()
            self.log(f"distilling {cfg.teacher.variant} -> {cfg.student.arch} ({self.recipe.name}) on {len(rasters)} "
                     f"images, {steps} steps, batch {cfg.train.batch_size}x{accum}x{self.ctx.world_size}, "
                     f"device {self.device}")
            t0 = time.perf_counter()
            last = self._loop(net, model, optimizer, scheduler, control, batches(loader), start, steps, stats)
            seconds = time.perf_counter() - t0

            if self.ctx.is_main:
                last = last or {k: v for k, v in self.paths.last_metrics().items()
                                if k == "loss" or k in self.recipe.terms}
                info = replace(info, provenance=self._provenance(steps, len(rasters)))
                save_student(self.paths.artifact, model.student, info)
                report = {"student": str(self.paths.artifact), "recipe": self.recipe.name, "steps": steps,
                          "resumed_from": start,
                          "images_seen": (steps - start) * cfg.train.batch_size * accum * self.ctx.world_size,
                          "seconds": round(seconds, 2), "final_losses": last, **control.summary(),
                          "files": len(rasters), "cdkd_version": cdkd.__version__}
                self.paths.write_report(report)
            self.ctx.barrier()
        return DistillResult(self.paths.root, self.paths.artifact, steps, last, control.stage, seconds,
                             self.recipe.name)

    def _finished(self, step: int, blob: dict[str, Any]) -> DistillResult:
        """``--resume`` of a run that has reached its steps: nothing runs and nothing is written."""
        self.log(f"{self.paths.root}: already finished at step {step}; nothing to do (give more --steps to go on)")
        report = json.loads(self.paths.report.read_text()) if self.paths.report.is_file() else {}
        stage = report.get("stage") or blob.get("schedule", {}).get("stage", "")
        return DistillResult(self.paths.root, self.paths.artifact, step, report.get("final_losses") or {}, str(stage),
                             0.0, self.recipe.name)

    def _loop(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, control: LossControl, batches: Iterator[dict],
              start: int, steps: int, stats: NormStats) -> dict[str, float]:
        cfg = self.cfg.train
        bar = None
        if self.progress and self.ctx.is_main:
            bar = progress_bar(steps, initial=start, desc="distill", unit="step")
        last: dict[str, float] = {}
        terms = self.recipe.terms
        images_per_step = cfg.batch_size * cfg.grad_accum * self.ctx.world_size
        tick = time.perf_counter()
        for step in range(start, steps):
            weights, knobs = control.weights(), control.knobs()
            values = self._train_step(net, model, optimizer, batches, weights, knobs)
            scheduler.step()
            losses = dict(zip(terms, (float(v) for v in self.ctx.mean(values))))
            event = control.update(losses)
            now = time.perf_counter()
            speed = images_per_step / max(now - tick, 1e-9)
            tick = now
            last = {"loss": sum(weights[k] * losses[k] for k in terms), **losses}
            done = step + 1
            if event:
                self.log(event.message)
                self._write_metrics({"step": done, **event.record})
            if done % cfg.log_every == 0 or done == steps:
                self._write_metrics(dict(step=done, lr=scheduler.get_last_lr()[0], **last, **knobs,
                                         **control.log_fields(), weights=[weights[k] for k in terms],
                                         images_per_s=speed))
            if bar is not None:
                bar.update(1)
                shown = {k: f"{v:.3f}" for k, v in {**last, **knobs}.items()}
                bar.set_postfix(**shown, stage=control.stage, img_s=f"{speed:.1f}")
            if done % cfg.checkpoint_every == 0 or done == steps:
                self._checkpoint(done, model, optimizer, scheduler, control, stats)
        if bar is not None:
            bar.close()
        return last

    def _train_step(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterator[dict], weights: dict[str, float], knobs: dict[str, float]) -> torch.Tensor:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean unweighted losses in the
        recipe's ``terms`` order."""
        cfg = self.cfg.train
        amp_dtype = self.amp_dtype
        terms = self.recipe.terms
        totals = torch.zeros(len(terms))
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            # Skip the gradient all-reduce on all but the last micro-batch of the step.
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = net(batch, knobs)
                total = sum(weights[k] * losses[k] for k in terms)
                self.scaler.scale(total / cfg.grad_accum).backward()
            totals += torch.stack([losses[k].detach().float() for k in terms]).cpu() / cfg.grad_accum
        if cfg.clip_grad > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return totals

    # ------------------------------------------------------------------------------------------- bookkeeping
    def _checkpoint(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, control: LossControl, stats: NormStats) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(self.paths.checkpoints, step, fmt=CHECKPOINT_FORMAT, payload={
            "config": to_dict(self.cfg), "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "schedule": control.state_dict(), "rng": rng_state(),
            "scaler": self.scaler.state_dict(),
            "norm": stats.to_dict(), "teacher_fingerprint": frozen_fingerprint(model),
            "identity": self.identity, "cdkd_version": cdkd.__version__,
        })
        self.paths.draw_curves()

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.paths.write_metrics(record)

    def _provenance(self, steps: int, files: int) -> dict[str, Any]:
        return {"teacher": teacher_provenance(self.cfg.teacher), "data": {"root": self.cfg.data.root, "files": files},
                "steps": steps, **self.recipe.provenance(), "cdkd_version": cdkd.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
