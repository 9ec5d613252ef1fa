"""Nothing silently wrong, nothing lost: a run's identity on resume, exclusive runs, honest reports, quiet output.

The concurrency cases hold a real lock from a second process (or a second open of the lock file in this process,
which ``flock`` treats as another owner), then kill it the hard way to leave a stale lock.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import REPO_ROOT, make_geotiff, make_image, make_segmenter, synthetic_image
from rasterio.errors import NotGeoreferencedWarning
from typer.testing import CliRunner

from cdkd.errors import CheckpointError, DataError
from cdkd.inference.runtimes import open_runtime
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.runstate import output_paths
from cdkd.scene.engine import segment_scene
from cdkd.utils.runlock import RunInUseError, RunLock, holder
from cli.main import app

runner = CliRunner()
QUIET = dict(progress=False, checkpoint_seconds=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two segmenters with the same classes, tile size and metadata, but other weights."""
    root = tmp_path_factory.mktemp("models")
    return (make_segmenter(root / "a" / "segmenter.pt", seed=0), make_segmenter(root / "b" / "segmenter.pt", seed=1))


@pytest.fixture
def tall(tmp_path) -> Path:
    return make_geotiff(tmp_path / "tall.tif", synthetic_image((3, 260, 90), seed=3))


class Interrupting:
    """A runtime interrupted (KeyboardInterrupt) on its ``after``-th forward; ``during`` runs at that call."""

    def __init__(self, runtime, after: int, during=None) -> None:
        self.inner, self.after, self.calls, self.during = runtime, after, 0, during

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.after:
            if self.during is not None:
                self.during()
            raise KeyboardInterrupt
        return self.inner.forward(batch)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# ------------------------------------------------------------------------------------------------ run identity


def test_resume_with_another_model_is_refused(models, tall, tmp_path):
    a, b = (open_runtime(m) for m in models)
    assert a.meta.to_json() == b.meta.to_json()  # only the weights tell them apart
    out = tmp_path / "lc.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_scene(tall, Interrupting(a, after=3), out, SegmentOptions(batch_size=2, **QUIET))
    with pytest.raises(CheckpointError, match="cannot resume: model differ") as e:
        segment_scene(tall, b, out, SegmentOptions(batch_size=2, resume=True, **QUIET))
    assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    report = segment_scene(tall, a, out, SegmentOptions(batch_size=2, resume=True, **QUIET))
    whole = segment_scene(tall, a, tmp_path / "whole.tif", SegmentOptions(batch_size=2, **QUIET))
    assert np.array_equal(_read(out), _read(tmp_path / "whole.tif"))
    # counted once: a batch that ran tiles of the next row before the checkpoint does not count them twice
    assert report.tiles_run == whole.tiles_run == report.tiles


def test_resumed_summary_counts_each_tile_once(models, tall, tmp_path):
    out = tmp_path / "lc.tif"
    a = open_runtime(models[0])
    with pytest.raises(KeyboardInterrupt):  # batch 3 over rows of 2 windows: the interrupted batch spans rows
        segment_scene(tall, Interrupting(a, after=4), out, SegmentOptions(batch_size=3, **QUIET))
    res = runner.invoke(
        app,
        [
            "segment",
            str(tall),
            "--model",
            str(models[0]),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--resume",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tiles_run"] + report["tiles_skipped"] == report["tiles"]
    assert f"{report['tiles']} of {report['tiles']} tiles run" in res.output


# ------------------------------------------------------------------------------------------------ exclusive runs


def test_a_second_run_never_destroys_a_live_one(models, tall, tmp_path):
    out = tmp_path / "lc.tif"
    partial = output_paths(out)[3]
    a = open_runtime(models[0])
    refused = []

    def second_run():  # while the first runs: --overwrite, --resume and a plain run are all refused
        for opts in (dict(overwrite=True), dict(resume=True), {}):
            with pytest.raises(RunInUseError, match=f"pid {os.getpid()}") as e:
                segment_scene(tall, a, out, SegmentOptions(**opts, **QUIET))
            refused.append(str(e.value))
        assert partial.is_dir()  # untouched

    with pytest.raises(KeyboardInterrupt):
        segment_scene(tall, Interrupting(a, after=3, during=second_run), out, SegmentOptions(batch_size=2, **QUIET))
    assert len(refused) == 3 and all("wait for it" in r for r in refused)
    assert holder(partial) is None  # the interrupted run let go
    segment_scene(tall, a, out, SegmentOptions(batch_size=2, resume=True, **QUIET))
    assert not partial.exists() and out.is_file()


def test_a_dead_runs_lock_is_stale(models, tall, tmp_path):
    out = tmp_path / "lc.tif"
    partial = output_paths(out)[3]
    a = open_runtime(models[0])
    with pytest.raises(KeyboardInterrupt):
        segment_scene(tall, Interrupting(a, after=3), out, SegmentOptions(batch_size=2, **QUIET))
    code = (
        "import sys; from cdkd.utils.runlock import RunLock; RunLock(sys.argv[1], 'x').acquire(); "
        "print('held', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(partial)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(partial)["pid"] == proc.pid
        with pytest.raises(RunInUseError, match=f"pid {proc.pid}"):
            segment_scene(tall, a, out, SegmentOptions(resume=True, **QUIET))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(partial) is None  # kill -9 released it: the lock file left behind is stale
    segment_scene(tall, a, out, SegmentOptions(batch_size=2, resume=True, **QUIET))
    assert out.is_file()


def test_training_run_folders_are_exclusive(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys; from cdkd.utils.runlock import RunLock; RunLock(sys.argv[1], 'x').acquire(); "
        "print('held', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        data = tmp_path / "unl"
        make_image(data / "a.png", synthetic_image((3, 40, 40)), "PNG")
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = runner.invoke(
                app,
                [
                    "distill",
                    "--data",
                    str(data),
                    "--teacher",
                    "vit_t",
                    "--random-teacher",
                    "--tile-size",
                    "32",
                    "--steps",
                    "1",
                    "--out",
                    str(run),
                    *extra,
                ],
            )
            assert res.exit_code == 1 and f"pid {proc.pid}" in res.output, res.output
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_exclusive_across_open_files(tmp_path):
    with RunLock(tmp_path / "p", "out.tif"):
        with pytest.raises(RunInUseError, match="out.tif: another cdkd run is writing it"):
            RunLock(tmp_path / "p", "out.tif").acquire()
    with RunLock(tmp_path / "p", "out.tif"):  # released: free again
        pass


# ------------------------------------------------------------------------------------------------ honest reports


@pytest.fixture
def finetune_run(tmp_path) -> tuple[list[str], Path]:
    from cdkd.artifacts import StudentInfo, save_student
    from cdkd.data.stats import NormStats
    from cdkd.models.student import build_student

    torch.manual_seed(0)
    student = tmp_path / "student.pt"
    arch = {"img_size": 32, "in_chans": 3, "embed_dim": 48, "depth": 12, "num_heads": 2}
    save_student(
        student,
        build_student("vit_s", **arch),
        StudentInfo("vit_s", arch, NormStats((120.0,) * 3, (60.0,) * 3, (1, 2, 3), "uint8"), {}),
    )
    data = tmp_path / "lab"
    for i in range(2):
        make_image(data / "images" / f"p{i}.png", synthetic_image((3, 40, 40), seed=i), "PNG")
        make_image(
            data / "masks" / f"p{i}.png", np.random.default_rng(i).integers(0, 2, (1, 40, 40)).astype(np.uint8), "PNG"
        )
    (data / "classes.yaml").write_text(
        "classes:\n  - {id: 0, name: a, color: '#000000'}\n  - {id: 1, name: b, color: '#FFFFFF'}\n"
    )
    args = [
        "finetune",
        "--student",
        str(student),
        "--data",
        str(data),
        "--format",
        "folder",
        "--classes",
        str(data / "classes.yaml"),
        "--tile-size",
        "32",
        "--decoder-channels",
        "16",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--steps",
        "2",
        "--no-progress",
        "--out",
    ]
    return args, tmp_path / "run"


def test_resuming_a_finished_run_changes_nothing(finetune_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CDKD_CACHE_DIR", str(tmp_path / "cache"))
    args, run = finetune_run
    first = runner.invoke(app, [*args, str(run)])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    report = json.loads((run / "report.json").read_text())
    assert report["final_loss"] is not None and np.isfinite(report["final_loss"])
    res = runner.invoke(app, [*args, str(run), "--resume"])
    assert res.exit_code == 0 and "already finished at step 2" in res.output, res.output
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (run / "run.lock").exists()


def test_resume_refuses_other_inputs(finetune_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CDKD_CACHE_DIR", str(tmp_path / "cache"))
    args, run = finetune_run
    steps = args.index("--steps") + 1
    args[steps] = "1"  # one step, then resume to two
    first = runner.invoke(app, [*args, str(run)])
    assert first.exit_code == 0, first.output
    extra = Path(args[args.index("--data") + 1])
    make_image(extra / "images" / "p9.png", synthetic_image((3, 40, 40), seed=9), "PNG")
    make_image(extra / "masks" / "p9.png", np.zeros((1, 40, 40), np.uint8), "PNG")
    args[steps] = "2"
    res = runner.invoke(app, [*args, str(run), "--resume"])
    assert res.exit_code == 1 and "cannot resume: data differ" in res.output, res.output
    # a run started from another folder finds its inputs: config.yaml holds absolute paths
    saved = (run / "config.yaml").read_text()
    assert f"student: {Path(args[args.index('--student') + 1]).absolute()}" in saved


def test_reports_never_hold_nan(tmp_path):
    from cdkd.train.rundir import RunDir

    paths = RunDir(tmp_path, "x.pt")
    paths.write_report({"loss": float("nan"), "terms": [1.0, float("inf")], "ok": 2.5})
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"loss": None, "terms": [1.0, None], "ok": 2.5}


def test_distill_steps_zero_is_refused_and_leaves_nothing(tmp_path):
    data = tmp_path / "unl"
    make_image(data / "a.png", synthetic_image((3, 40, 40)), "PNG")
    res = runner.invoke(
        app,
        [
            "distill",
            "--data",
            str(data),
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--tile-size",
            "32",
            "--steps",
            "0",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 2 and "--steps" in res.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ data checked early


def test_a_dataloader_workers_error_comes_back_as_its_one_line():
    from torch.utils.data import DataLoader, Dataset

    from cdkd.data.sampler import batches

    class Broken(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            if i == 2:
                raise DataError("masks/p2.png: 1 unknown value: 7 (36 px)")
            return torch.zeros(1)

    loader = DataLoader(Broken(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as e:
        list(batches(loader))
    assert str(e.value) == "masks/p2.png: 1 unknown value: 7 (36 px)"


def test_label_checks_are_remembered(tmp_path, monkeypatch):
    from cdkd.data import labelcheck
    from cdkd.data.classes import ClassSchema
    from cdkd.data.labeled import find_pairs

    monkeypatch.setenv("CDKD_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "lab"
    for i in range(3):
        make_image(data / "images" / f"p{i}.png", synthetic_image((3, 30, 30), seed=i), "PNG")
        make_image(data / "masks" / f"p{i}.png", np.zeros((1, 30, 30), np.uint8), "PNG")
    (data / "c.yaml").write_text("classes:\n  - {id: 0, name: a, color: '#000000'}\n")
    schema, pairs = ClassSchema.load(data / "c.yaml"), find_pairs(data, "folder")
    seen = []
    monkeypatch.setattr(labelcheck, "check_pair", lambda p, s, f: seen.append(p.mask))
    labelcheck.check_labels(pairs, schema, "folder")
    labelcheck.check_labels(pairs, schema, "folder")
    assert len(seen) == 3  # the second opening read nothing
    time.sleep(0.01)
    make_image(data / "masks" / "p1.png", np.ones((1, 30, 30), np.uint8), "PNG")  # a changed file is read again
    labelcheck.check_labels(pairs, schema, "folder")
    assert seen[3:] == [pairs[1].mask]


# ------------------------------------------------------------------------------------------------ bands by meaning


def test_the_teacher_reads_red_green_blue_by_wavelength(tmp_path):
    from cdkd.config import DistillConfig, StudentConfig
    from cdkd.data.files import find_rasters
    from cdkd.distill.bands import choose_bands

    path = make_geotiff(tmp_path / "s2.tif", synthetic_image((4, 40, 40), dtype="uint16"))
    with rasterio.open(path, "r+") as dst:
        dst.descriptions = ("B02", "B03", "B04", "B08")  # Sentinel-2 band names: blue, green, red, NIR
    rasters = find_rasters(tmp_path, min_bands=1)
    said: list[str] = []
    cfg = choose_bands(DistillConfig(), rasters, every_band=False, log=said.append)
    assert cfg.data.bands == (3, 2, 1) and cfg.student.in_chans == 3
    assert "bands 3,2,1" in said[0] and "B04 (665 nm)" in said[0]
    every = choose_bands(DistillConfig(), rasters, every_band=True, log=said.append)
    assert every.data.bands == (1, 2, 3, 4) and every.student.in_chans == 4
    given = DistillConfig(student=StudentConfig(in_chans=2))
    assert choose_bands(given, rasters, every_band=True, log=said.append).data.bands == (1, 2)


def test_real_sentinel2_feeds_b04_b03_b02(shared_data):
    from cdkd.config import DistillConfig
    from cdkd.data.files import find_rasters
    from cdkd.distill.bands import choose_bands

    rasters = find_rasters(shared_data / "multispectral" / "bigearthnet_s2" / "stacked", min_bands=1)
    cfg = choose_bands(DistillConfig(), rasters, every_band=False, log=lambda m: None)
    assert cfg.data.bands == (4, 3, 2)
    assert choose_bands(DistillConfig(), rasters, every_band=True, log=lambda m: None).student.in_chans == 12


# ------------------------------------------------------------------------------------------------ quiet output


def test_good_runs_print_no_library_warning(models, tmp_path):
    small = make_geotiff(tmp_path / "small.tif", synthetic_image((3, 30, 40)))  # smaller than one tile
    a = open_runtime(models[0])
    out = tmp_path / "lc.tif"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            segment_scene(
                make_geotiff(tmp_path / "t.tif", synthetic_image((3, 200, 64))),
                Interrupting(a, 3),
                out,
                SegmentOptions(batch_size=1, **QUIET),
            )
        segment_scene(tmp_path / "t.tif", a, out, SegmentOptions(batch_size=1, resume=True, **QUIET))
        segment_scene(small, a, tmp_path / "small_lc.tif", SegmentOptions(**QUIET))
    noisy = [str(w.message) for w in caught if issubclass(w.category, (NotGeoreferencedWarning, UserWarning))]
    assert not noisy, noisy


def test_geopackages_are_version_1_2_and_areas_print_in_one_unit(models, tmp_path):
    from cdkd.units import area_unit, format_area

    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 64, 64)))
    segment_scene(scene, open_runtime(models[0]), tmp_path / "lc.tif", SegmentOptions(**QUIET))
    res = runner.invoke(app, ["vectorize", str(tmp_path / "lc.tif"), "--out", str(tmp_path / "lc.gpkg")])
    assert res.exit_code == 0, res.output
    with sqlite3.connect(tmp_path / "lc.gpkg") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10200
    assert format_area(1600) == "1,600 m²" and format_area(1600, ("ha", 1e4)) == "0.16 ha"
    assert format_area(12, ("ha", 1e4)) == "<0.01 ha" and format_area(0, ("ha", 1e4)) == "0.00 ha"
    assert area_unit([5e3]) == ("m²", 1.0) and area_unit([5e5, 2]) == ("ha", 1e4) and area_unit([3e8])[0] == "km²"


def test_formats_share_one_style_sidecar(models, tmp_path):
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 64, 64)))
    segment_scene(scene, open_runtime(models[0]), tmp_path / "lc.tif", SegmentOptions(**QUIET))
    for suffix in (".fgb", ".parquet"):
        res = runner.invoke(app, ["vectorize", str(tmp_path / "lc.tif"), "--out", str(tmp_path / f"a{suffix}")])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a.qml").is_file()
