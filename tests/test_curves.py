"""Training curves (cdkd.train): curves.png and the summary from run folders of every recipe and task, unfinished
and half-written ones, a real distill and finetune run, ``cdkd report`` and TensorBoard events across a resume."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_clean_error, read_metrics
from PIL import Image
from test_finetune import folder_data  # noqa: F401 (a fixture: labeled 48 px tiles with a class file)
from typer.testing import CliRunner

from cdkd.config import DistillConfig, FinetuneConfig, apply_overrides, save_config
from cdkd.train.curves import MAX_POINTS, figure_size, layout
from cdkd.train.history import History
from cdkd.train.rundir import RunDir
from cdkd.train.summary import summarize, write_curves
from cdkd.train.tensorboard import TensorBoardLog
from cli.main import app

runner = CliRunner()
T0 = 1_700_000_000.0  # the rows' wall-clock time: 0.5 s per step from here
SECONDS_PER_STEP = 0.5

# method -> (kind, artifact, the panels its curves.png holds)
METHODS = {
    "mask-cdkd": ("distill", "student.pt", ["loss", "terms", "schedule", "lr", "throughput"]),
    "rs4d": ("distill", "student.pt", ["loss", "terms", "corruption", "lr", "throughput"]),
    "hyperkd": ("distill", "student.pt", ["loss", "terms", "lr", "throughput", "other"]),
    "semantic": ("finetune", "segmenter.pt", ["loss", "accuracy", "lr", "throughput"]),
    "instance": ("finetune", "detector.pt", ["loss", "terms", "lr", "throughput", "other"]),
}
MASK_RCNN = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def _rows(method: str, steps: int, seed: int = 0) -> list[dict]:
    """The rows (and events) the trainer of ``method`` logs over ``steps`` steps, in the order it writes them."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    stage = {"mask-cdkd": "early", "rs4d": "adaptive", "hyperkd": "fixed"}.get(method)
    for s in range(1, steps + 1):
        decay = math.exp(-3 * s / steps)

        def noisy(scale: float, decay: float = decay) -> float:
            return float(scale * decay * (1 + 0.1 * rng.random()))

        row: dict = {"step": s, "lr": 1e-4 * 0.5 * (1 + math.cos(math.pi * s / steps))}
        if method == "mask-cdkd":
            terms = {"kd": noisy(2.0), "t_mae": noisy(1.0), "s_mae": noisy(1.2)}
            if s == steps // 2:
                stage = "middle"
                out.append(
                    {
                        "step": s,
                        "event": "stage",
                        "stage": stage,
                        "ratio": 0.84,
                        "weights": [0.6, 0.2, 0.2],
                        "time": T0 + SECONDS_PER_STEP * s,
                    }
                )
            extra = {"ratio": terms["t_mae"] / terms["s_mae"], "stage": stage, "weights": [0.2, 0.4, 0.4]}
        elif method == "rs4d":
            terms = {"l1": noisy(0.5)}
            if s == 2:
                out.append({"step": s, "event": "reference", "reference_loss": 0.5, "time": T0 + SECONDS_PER_STEP * s})
            extra = {"noise_ratio": 0.2 + 0.1 * s / steps, "mask_ratio": 0.2, "stage": stage, "weights": [1.0]}
        elif method == "hyperkd":
            terms = {"kd": noisy(1.0), "pix": noisy(0.8), "spec": noisy(0.3), "mask_saliency": 0.6}
            extra = {"stage": stage, "weights": [1.0, 1.0, 0.5, 0.0]}
        elif method == "semantic":
            terms, extra = {}, {"pixel_acc": 1 - 0.5 * decay}
        else:
            terms = {k: noisy(0.4) for k in MASK_RCNN}
            extra = {"objects_per_tile": 3.0}
        loss = sum(v for k, v in terms.items() if k != "mask_saliency") or noisy(1.5)
        out.append(
            {
                **row,
                "loss": loss,
                **terms,
                **extra,
                "images_per_s": float(30 + rng.normal()),
                "time": T0 + SECONDS_PER_STEP * s,
            }
        )
    return out


def _write_run(root: Path, method: str, rows: list[dict], steps: int, finished: bool = False) -> RunDir:
    """A run folder as the trainers leave it: config.yaml, metrics.jsonl; report.json and the artifact if
    ``finished``."""
    kind, artifact, _ = METHODS[method]
    paths = RunDir(root, artifact)
    if kind == "distill":
        cfg = apply_overrides(DistillConfig(), {"recipe": method, "train.steps": steps})
    else:
        cfg = apply_overrides(FinetuneConfig(), {"task": method, "train.steps": steps})
    save_config(cfg, paths.config)
    paths.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        paths.artifact.write_bytes(b"")  # the summary looks at whether it exists, never inside
        paths.write_report({"steps": steps, "seconds": steps * SECONDS_PER_STEP})
        write_curves(paths.root)  # the final curves.png, as the training loop's finish() draws it
    return paths


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a whole, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize("method", list(METHODS))
def test_curves_and_summary_of_each_recipe_and_task(method: str, tmp_path: Path) -> None:
    steps = 60
    rows = _rows(method, steps)
    paths = _write_run(tmp_path / method, method, rows, steps, finished=True)
    kind, _, panels = METHODS[method]
    assert [p.name for p, _ in layout(History.read(paths.metrics))] == panels
    assert _png_size(paths.curves) == figure_size(len(panels))
    summary = summarize(paths.root)
    last = [r for r in rows if "event" not in r][-1]
    assert (summary.kind, summary.method, summary.status) == (kind, method, "finished")
    assert (summary.step, summary.total, summary.artifact_present) == (steps, steps, True)
    assert set(summary.losses) == {
        k for k in last if k == "loss" or k in ("kd", "t_mae", "s_mae", "l1", "pix", "spec") or k.startswith("loss_")
    }
    assert all(summary.losses[k] == last[k] for k in summary.losses)
    assert summary.stage == last.get("stage")
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    assert summary.images_per_s == pytest.approx(float(np.median(speeds[-20:])))
    assert summary.elapsed_s == pytest.approx(steps * SECONDS_PER_STEP)
    if method == "mask-cdkd":
        assert summary.ratio == pytest.approx(last["ratio"])
        assert History.read(paths.metrics).marks() == [(steps // 2, "middle")]
    if method == "semantic":
        assert summary.extra["pixel_acc"] == pytest.approx(last["pixel_acc"])


def test_long_unfinished_run_with_a_pause_and_a_half_written_last_line(tmp_path: Path) -> None:
    """More rows than are drawn one by one; stopped for an hour (then resumed); killed while writing a line."""
    steps = MAX_POINTS + 500
    rows = _rows("mask-cdkd", steps)
    for r in rows:
        if r["step"] > 1000:
            r["time"] += 3600.0
    paths = _write_run(tmp_path / "run", "mask-cdkd", rows, 10_000)
    with paths.metrics.open("a") as f:
        f.write(f'{{"step": {steps + 1}, "lr": 1e-05, "loss": 0.')  # no newline: cut mid-row
    summary = write_curves(paths.root)
    assert (summary.status, summary.step, summary.total) == ("stopped", steps, 10_000)
    assert not summary.artifact_present and summary.checkpoints == []
    assert summary.elapsed_s == pytest.approx(steps * SECONDS_PER_STEP)  # the hour stopped is not training time
    assert _png_size(paths.curves) == figure_size(5)
    # the trainer's own reading of the file survives the cut line too (resume drops it)
    assert paths.last_metrics()["step"] == steps
    paths.truncate_metrics(steps)
    assert len(read_metrics(paths.root)) == len(rows)


def test_a_run_with_one_row_or_none(tmp_path: Path) -> None:
    paths = _write_run(tmp_path / "one", "semantic", _rows("semantic", 1), 100)
    summary = write_curves(paths.root)
    assert (summary.step, summary.total, summary.elapsed_s) == (1, 100, None)
    assert _png_size(paths.curves) == figure_size(4)
    empty = _write_run(tmp_path / "none", "rs4d", [], 100)
    summary = write_curves(empty.root)
    assert (summary.step, summary.losses, summary.images_per_s, summary.elapsed_s) == (0, {}, None, None)
    assert _png_size(empty.curves) == figure_size(0)


def test_report_command_errors_and_out(tmp_path: Path) -> None:
    paths = _write_run(tmp_path / "run", "rs4d", _rows("rs4d", 8), 8)
    res = runner.invoke(app, ["report", str(paths.root), "--json", "--out", str(tmp_path / "c.svg")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["kind"] == "distill" and data["method"] == "rs4d" and data["step"] == 8
    assert data["curves"] == str(tmp_path / "c.svg") and (tmp_path / "c.svg").read_text().startswith("<?xml")
    assert not paths.curves.exists()  # --out: the run folder is left as it was
    res = runner.invoke(app, ["report", str(paths.root), "--out", str(tmp_path / "c.svg")])
    assert res.exit_code == 1 and "--overwrite" in one_clean_error(res.output)
    res = runner.invoke(app, ["report", str(paths.root), "--out", str(tmp_path / "c.txt")])
    assert res.exit_code == 2 and ".png" in one_clean_error(res.output)
    (tmp_path / "plain").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "plain")])
    assert res.exit_code == 1 and "not a training run" in one_clean_error(res.output)
    assert not (tmp_path / "plain" / "curves.png").exists()


def test_tensorboard_flag_without_the_package_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of it now fails as if not installed
    res = runner.invoke(
        app,
        [
            "distill",
            "--data",
            str(tmp_path),
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--tensorboard",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 2 and "pip install tensorboard" in one_clean_error(res.output)
    assert not (tmp_path / "run").exists()


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))  # honours purge_step, as TensorBoard does
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_tensorboard_switched_on_at_a_resume_and_a_fresh_run_that_fails(tmp_path: Path) -> None:
    """Through the run folder's sessions, as the trainers open them: rows logged before --tensorboard was given are
    written first; a fresh run that fails before its first checkpoint leaves no folder, events included."""
    pytest.importorskip("tensorboard")
    paths = RunDir(tmp_path / "run", "student.pt")
    with paths.session(fresh=True):
        for step in (1, 2, 3):
            paths.write_metrics({"step": step, "loss": 1.0 / step})
    with paths.session(fresh=False):  # resumed at the step-2 checkpoint, --tensorboard given now
        paths.truncate_metrics(2)
        board = TensorBoardLog(paths.tensorboard, 2, paths.metrics)
        row = {"step": 3, "loss": 0.25}
        paths.write_metrics(row)
        board.write(row)
        board.close()
    assert _tensorboard_steps(paths.tensorboard, "loss/loss") == [1, 2, 3]
    failed = RunDir(tmp_path / "failed", "student.pt")
    with pytest.raises(KeyboardInterrupt), failed.session(fresh=True):
        board = TensorBoardLog(failed.tensorboard, 0, failed.metrics)
        failed.write_metrics({"step": 1, "loss": 1.0})
        board.close()
        raise KeyboardInterrupt
    assert not failed.root.exists()


def test_real_runs_draw_curves_report_and_continue_tensorboard(
    folder_data: Path,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    monkeypatch,
) -> None:
    """A tiny real distill (rs4d into the smallest student: megabytes of checkpoints, not hundreds; with TensorBoard,
    stopped after its first checkpoint and resumed), then a tiny finetune on its student: each writes curves.png,
    and ``cdkd report`` reads them."""
    monkeypatch.setenv("CDKD_CACHE_DIR", str(tmp_path / "cache"))  # the label check's memory
    board = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []  # events checked where installed
    run = tmp_path / "distill"
    args = [
        "distill",
        "--recipe",
        "rs4d",
        "--data",
        str(folder_data / "images"),
        "--teacher",
        "vit_t",
        "--random-teacher",
        "--student",
        "rsmamba_test",
        "--tile-size",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--checkpoint-every",
        "1",
        "--out",
        str(run),
        "--no-progress",
        *board,
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert _png_size(run / "curves.png") == figure_size(5)
    if board:
        assert _tensorboard_steps(run / "tensorboard", "terms/l1") == [1, 2]
    # stopped after the step-1 checkpoint: what step 2 wrote is gone but its metrics row remains
    (run / "checkpoints" / "step_0000002.pt").unlink()
    (run / "student.pt").unlink()
    stopped = summarize(run)
    assert (stopped.status, stopped.step, stopped.checkpoint_step, stopped.artifact_present) == ("stopped", 2, 1, False)
    res = runner.invoke(app, ["distill", "--out", str(run), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    if board:  # the resumed session's step 2 replaces the stopped one's: each step once
        assert _tensorboard_steps(run / "tensorboard", "terms/l1") == [1, 2]
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    res = runner.invoke(app, ["report", str(run), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    last = read_metrics(run)[-1]
    assert (data["kind"], data["method"], data["status"], data["step"], data["total"]) == (
        "distill",
        "rs4d",
        "finished",
        2,
        2,
    )
    assert data["checkpoints"] == ["step_0000001.pt", "step_0000002.pt"] and data["artifact_present"]
    assert data["losses"] == {k: last[k] for k in ("loss", "l1")} and data["stage"] == "fixed"
    assert data["images_per_s"] == pytest.approx(np.median([r["images_per_s"] for r in read_metrics(run)]))

    seg = tmp_path / "seg"
    head = tmp_path / "head.yaml"
    head.write_text("head: {layers: [1, 2, 3, 4]}\n")  # rsmamba_test has 4 blocks
    res = runner.invoke(
        app,
        [
            "finetune",
            "--student",
            str(run / "student.pt"),
            "--config",
            str(head),
            "--data",
            str(folder_data),
            "--format",
            "folder",
            "--classes",
            str(folder_data / "classes.yaml"),
            "--split",
            "train",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--decoder-channels",
            "16",
            "--workers",
            "0",
            "--out",
            str(seg),
            "--no-progress",
            *board,
        ],
    )
    assert res.exit_code == 0, res.output
    assert _png_size(seg / "curves.png") == figure_size(4)
    res = runner.invoke(app, ["report", str(seg)])
    assert res.exit_code == 0, res.output
    assert "finetune (semantic), finished" in res.output and "pixel_acc" in res.output
    if board:
        assert _tensorboard_steps(seg / "tensorboard", "accuracy/pixel_acc") == [2]
