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

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, cast

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
from cdkd.errors import CdkdValueError, CheckpointError
from cdkd.models.speedups import apply_speedups
from cdkd.models.student import STUDENT_REGISTRY, build_student
from cdkd.models.teacher import check_teacher_source, teacher_provenance
from cdkd.train.checkpoint import restore_model, rng_state, set_rng_state, trainable_state
from cdkd.train.distributed import DistContext, cleanup_distributed, init_distributed, resolve_device
from cdkd.train.loop import StepLog, TrainLoop
from cdkd.train.optim import adamw, check_train_config, lr_lambda
from cdkd.train.rundir import RESUMABLE_TRAINING_KEYS, RunDir, check_identity, check_resumable
from cdkd.utils.paths import file_sha256, files_digest

DEFAULT_STEPS = 1000
# Settings a resumed run may change: they do not alter the trajectory (or, for steps, only extend it).
RESUMABLE_KEYS = RESUMABLE_TRAINING_KEYS | {
    "teacher.checkpoint",
    "teacher.grad_checkpointing",
    "train.compile",
    "train.channels_last",
    "teacher.attention",
}  # the last three: speed only


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
        raise CdkdValueError(
            f"--bands selects {len(cfg.data.bands)} bands but the student takes {cfg.student.in_chans} (--in-chans)"
        )
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
    def __init__(
        self,
        cfg: DistillConfig,
        recipe: Recipe,
        paths: RunDir,
        ctx: DistContext,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.recipe, self.paths, self.ctx, self.progress = cfg, recipe, paths, ctx, progress
        self.log = log if ctx.is_main else (lambda _msg: None)
        self.device = resolve_device(cfg.train.device, ctx)

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
        weights = (
            f"random (seed {self.cfg.train.seed})"
            if teacher.random_init or not teacher.checkpoint
            else file_sha256(teacher.checkpoint)
        )
        return {"data": files_digest([r.path for r in rasters], self.cfg.data.root), "teacher": weights}

    def _build(self, stats: NormStats) -> tuple[nn.Module, StudentInfo]:
        cfg = self.cfg
        # Seeding before construction makes a random teacher (and all fresh heads) a function of the seed,
        # which is how a resumed run rebuilds the same frozen random weights without storing them.
        torch.manual_seed(cfg.train.seed)
        teacher = self.recipe.build_teacher()
        arch_args: dict[str, Any] = {"img_size": cfg.data.tile_size, "in_chans": cfg.student.in_chans}
        student = build_student(cfg.student.arch, **arch_args)
        if cfg.student.grad_checkpointing:
            student.set_grad_checkpointing(True)  # type: ignore[operator]  # timm's method on every student
        model = self.recipe.build(teacher, student).to(self.device)
        done = apply_speedups(model, self.device, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
        if any(done.values()):
            self.log(
                f"speed-ups: {done['compiled_blocks']} blocks compiled, "
                f"{done['channels_last_convs']} convolutions channels-last"
            )
        info = StudentInfo(arch=cfg.student.arch, arch_args=arch_args, norm=stats, provenance={})
        return model, info

    # ----------------------------------------------------------------------------------------------- the run
    def run(self, resume: bool, overwrite: bool) -> DistillResult:
        blob = self.paths.check(resume, overwrite, CHECKPOINT_FORMAT)
        rasters = find_rasters(self.cfg.data.root, bands=self.cfg.data.bands, min_bands=self.cfg.student.in_chans or 1)
        require_one_dtype(rasters, self.cfg.data.root)
        cfg = self._settle_bands(rasters)
        bands = cast("tuple[int, ...]", cfg.data.bands)  # settled just above
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
            stats = compute_stats(
                rasters, bands, n_samples=cfg.data.stats_samples, window=cfg.data.tile_size, seed=cfg.train.seed
            )
            stats = with_band_metadata(stats, rasters, cfg.data.wavelengths)  # student.pt says what its bands measure
        self.recipe.stats = stats
        model, info = self._build(stats)
        optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, steps)
        )
        control = self.recipe.control()
        net: nn.Module = model
        if self.ctx.enabled:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loop = TrainLoop(
            cfg.train,
            model,
            optimizer,
            scheduler,
            self.device,
            self.paths,
            lambda step: self._payload(loop, model, control, stats, identity),
            CHECKPOINT_FORMAT,
            net=net,
            ctx=self.ctx,
            name="distill",
            progress=self.progress,
            log=self.log,
        )
        start = 0
        if blob is not None:
            if abs(blob["teacher_fingerprint"] - frozen_fingerprint(model)) > 1e-6 * abs(blob["teacher_fingerprint"]):
                raise CheckpointError(
                    f"{self.paths.checkpoints}: the teacher's frozen weights differ from the run "
                    "being resumed (another SAM checkpoint or seed?)"
                )
            restore_model(model, blob["model"], self.paths.checkpoints)
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
            control.load_state_dict(blob["schedule"])
            if blob.get("scaler"):
                loop.scaler.load_state_dict(blob["scaler"])
            set_rng_state(blob["rng"])
            start = int(blob["step"])
        dataset = self.recipe.dataset(rasters, stats)
        self.ctx.barrier()  # every rank has looked at the folder before rank 0 changes it
        with self.paths.session(fresh=blob is None, main=self.ctx.is_main):
            if start:
                self.log(f"resuming {self.paths.root} at step {start} (stage {control.stage})")
            if self.ctx.is_main:
                save_config(cfg, self.paths.config)
                self.paths.truncate_metrics(start)
            self.ctx.barrier()
            accum = cfg.train.grad_accum
            sampler = StepSampler(
                cfg.train.batch_size,
                self.ctx.world_size,
                self.ctx.rank,
                start_micro_step=start * accum,
                num_micro_steps=steps * accum,
            )
            loader = DataLoader(
                dataset,
                batch_size=cfg.train.batch_size,
                sampler=sampler,
                num_workers=cfg.data.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=False,
                # Its own generator: drawing the workers' base seed from the global RNG would shift
                # dropout's random stream after a resume.
                generator=torch.Generator().manual_seed(cfg.train.seed),
            )
            self.log(
                f"distilling {cfg.teacher.variant} -> {cfg.student.arch} ({self.recipe.name}) on {len(rasters)} "
                f"images, {steps} steps, batch {cfg.train.batch_size}x{accum}x{self.ctx.world_size}, "
                f"device {self.device}"
            )
            t0 = time.perf_counter()
            step_log = loop.run(
                RecipeObjective(net, self.recipe.terms, control, self.device), batches(loader), start, steps
            )
            seconds = time.perf_counter() - t0
            last = (
                {k: step_log.row[k] for k in ("loss", *self.recipe.terms)}
                if step_log is not None
                else {k: v for k, v in self.paths.last_metrics().items() if k == "loss" or k in self.recipe.terms}
            )
            if self.ctx.is_main:
                info = replace(info, provenance=self._provenance(steps, len(rasters)))
                save_student(self.paths.artifact, cast(nn.Module, model.student), info)
            loop.finish(
                {
                    "student": str(self.paths.artifact),
                    "recipe": self.recipe.name,
                    "steps": steps,
                    "resumed_from": start,
                    "images_seen": (steps - start) * cfg.train.batch_size * accum * self.ctx.world_size,
                    "seconds": round(seconds, 2),
                    "final_losses": last,
                    **control.summary(),
                    "files": len(rasters),
                    "cdkd_version": cdkd.__version__,
                }
            )
            self.ctx.barrier()
        return DistillResult(
            self.paths.root, self.paths.artifact, steps, last, control.stage, seconds, self.recipe.name
        )

    def _finished(self, step: int, blob: dict[str, Any]) -> DistillResult:
        """``--resume`` of a run that has reached its steps: nothing runs and nothing is written."""
        self.log(f"{self.paths.root}: already finished at step {step}; nothing to do (give more --steps to go on)")
        report = json.loads(self.paths.report.read_text()) if self.paths.report.is_file() else {}
        stage = report.get("stage") or blob.get("schedule", {}).get("stage", "")
        return DistillResult(
            self.paths.root,
            self.paths.artifact,
            step,
            report.get("final_losses") or {},
            str(stage),
            0.0,
            self.recipe.name,
        )

    def _payload(
        self, loop: TrainLoop, model: nn.Module, control: LossControl, stats: NormStats, identity: dict[str, Any]
    ) -> dict[str, Any]:
        """What a checkpoint holds: everything that changes during training, and what the run read."""
        return {
            "config": to_dict(self.cfg),
            "model": trainable_state(model),
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(),
            "schedule": control.state_dict(),
            "rng": rng_state(),
            "scaler": loop.scaler.state_dict(),
            "norm": stats.to_dict(),
            "teacher_fingerprint": frozen_fingerprint(model),
            "identity": identity,
            "cdkd_version": cdkd.__version__,
        }

    def _provenance(self, steps: int, files: int) -> dict[str, Any]:
        return {
            "teacher": teacher_provenance(self.cfg.teacher),
            "data": {"root": self.cfg.data.root, "files": files},
            "steps": steps,
            **self.recipe.provenance(),
            "cdkd_version": cdkd.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


class RecipeObjective:
    """A recipe's objective for the training loop: its loss terms weighted by its control (``LossControl``), which
    the step's losses, averaged over the ranks, then steer (mask-cdkd's r and stage, rs4d's ratios)."""

    def __init__(self, net: nn.Module, terms: tuple[str, ...], control: LossControl, device: torch.device) -> None:
        self.net, self.terms, self.control, self.device = net, terms, control, device

    def begin_step(self) -> None:
        self.weights, self.knobs = self.control.weights(), self.control.knobs()

    def micro(self, batch: dict, autocast: Callable) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            losses = self.net(batch, self.knobs)
        total = sum(self.weights[k] * losses[k] for k in self.terms)
        return total, {k: losses[k] for k in self.terms}

    def end_step(self, parts: dict[str, Any]) -> StepLog:
        terms, weights, control = self.terms, self.weights, self.control
        losses = {k: float(parts[k]) for k in terms}
        event = control.update(losses)
        last = {"loss": sum(weights[k] * losses[k] for k in terms), **losses}
        return StepLog(
            last["loss"],
            {**last, **self.knobs, **control.log_fields(), "weights": [weights[k] for k in terms]},
            shown={**{k: f"{v:.3f}" for k, v in {**last, **self.knobs}.items()}, "stage": control.stage},
            events=[(event.message, event.record)] if event else [],
        )
