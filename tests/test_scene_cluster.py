"""A dask.distributed cluster (2 worker processes, on this machine): many scenes, one scene split into blocks
(bitwise the local engine's output), a worker killed mid-run, and --resume of a cluster run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import make_geotiff, make_segmenter, synthetic_image
from typer.testing import CliRunner

from cdkd.inference.runtimes import RuntimeSpec, open_runtime
from cdkd.scene.batch import segment_many
from cdkd.scene.blocks import segment_scene_on_cluster
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.runstate import output_paths
from cdkd.scene.engine import segment_scene
from cli.main import app

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow
QUIET = SegmentOptions(progress=False, probs=True)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    return make_segmenter(tmp_path_factory.mktemp("model") / "segmenter.pt", tile=64, overlap=16)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _local(scene: Path, model_pt: Path, out: Path, options: SegmentOptions = QUIET) -> Path:
    segment_scene(scene, open_runtime(model_pt), out, options)
    return out


def test_many_scenes_one_task_each(cluster, tmp_path, model_pt):
    scenes = [make_geotiff(tmp_path / f"s{i}.tif", synthetic_image((3, 80, 100), seed=i)) for i in range(3)]
    local = segment_many(scenes, tmp_path / "local", RuntimeSpec(str(model_pt)), SegmentOptions(progress=False))
    addresses = set(cluster.scheduler_info["workers"])
    report = segment_many(
        scenes, tmp_path / "dask", RuntimeSpec(str(model_pt)), SegmentOptions(), cluster.scheduler_address
    )
    assert report.failed == [] and [Path(s.scene) for s in report.scenes] == scenes and not local.failed
    assert {s.worker for s in report.scenes} <= addresses  # ran on the cluster's workers, not here
    for s in scenes:
        assert np.array_equal(_read(tmp_path / "dask" / s.name), _read(tmp_path / "local" / s.name))


def test_one_scene_in_blocks_equals_the_local_engine_bitwise(cluster, tmp_path, model_pt):
    image = synthetic_image((3, 420, 300), seed=3)
    image[:, 380:, :120] = 0
    scene = make_geotiff(tmp_path / "s.tif", image, nodata=0)
    local = _local(scene, model_pt, tmp_path / "local.tif")
    report = segment_scene_on_cluster(
        scene, RuntimeSpec(str(model_pt)), tmp_path / "cl.tif", cluster.scheduler_address, QUIET, rows_per_block=2
    )
    assert np.array_equal(_read(tmp_path / "cl.tif"), _read(local))
    assert np.array_equal(_read(tmp_path / "cl_confidence.tif"), _read(tmp_path / "local_confidence.tif"))
    assert report.runtime_options["blocks"] == 5 and len(report.runtime_options["workers"]) == 2
    assert report.runtime_options["blend"] == "numpy"  # what the workers ran, as they report it
    with rasterio.open(tmp_path / "cl.tif") as a, rasterio.open(local) as b:
        assert a.overviews(1) == b.overviews(1) and a.tags() == b.tags()
    assert not output_paths(tmp_path / "cl.tif")[3].exists()


def test_a_worker_killed_mid_run_costs_only_its_blocks(cluster, tmp_path, model_pt):
    scene = make_geotiff(tmp_path / "big.tif", synthetic_image((3, 700, 400), seed=5))
    local = _local(scene, model_pt, tmp_path / "local.tif")
    out = tmp_path / "cl.tif"
    markers = output_paths(out)[3] / "blocks"
    client = distributed.Client(cluster.scheduler_address)
    pids = client.run(os.getpid)
    done: dict = {}

    def run() -> None:
        done["report"] = segment_scene_on_cluster(
            scene, RuntimeSpec(str(model_pt)), out, cluster.scheduler_address, QUIET, rows_per_block=1
        )

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(markers.glob("block_*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    finished_before = len(list(markers.glob("block_*.json")))
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    thread.join(timeout=300)
    assert "report" in done and finished_before < 14  # killed while most of the 14 blocks were still to run
    assert np.array_equal(_read(out), _read(local))
    client.wait_for_workers(2, timeout=120)  # the nanny restarts the worker; later tests get two again
    client.close()


def test_resume_of_a_cluster_run_redoes_only_missing_blocks(cluster, tmp_path, model_pt, monkeypatch):
    import cdkd.scene.blocks as blocks

    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 300, 200), seed=6))
    pinned = replace(QUIET, edge_context=0)  # 0: the block counts below are without margin
    local = _local(scene, model_pt, tmp_path / "local.tif", pinned)
    out = tmp_path / "cl.tif"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(blocks, "_assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        segment_scene_on_cluster(
            scene, RuntimeSpec(str(model_pt)), out, cluster.scheduler_address, pinned, rows_per_block=2
        )
    monkeypatch.undo()
    markers = sorted((output_paths(out)[3] / "blocks").glob("block_*.json"))
    assert len(markers) == 3
    kept = {m.name: json.loads(m.read_text())["seconds"] for m in markers[:2]}
    markers[2].unlink()  # as if the last block had not finished
    segment_scene_on_cluster(
        scene,
        RuntimeSpec(str(model_pt)),
        out,
        cluster.scheduler_address,
        replace(pinned, resume=True),
        rows_per_block=2,
    )
    assert np.array_equal(_read(out), _read(local))
    with pytest.raises(Exception, match="is complete|nothing to resume"):
        segment_scene_on_cluster(
            scene,
            RuntimeSpec(str(model_pt)),
            out,
            cluster.scheduler_address,
            SegmentOptions(progress=False, resume=True, edge_context=0),
            rows_per_block=2,
        )
    assert kept  # the kept blocks' markers were read back, not recomputed (their results stood)


def test_cli_runs_one_scene_on_the_cluster(cluster, tmp_path, model_pt):
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 150, 120), seed=7))
    local = _local(scene, model_pt, tmp_path / "local.tif")
    res = CliRunner().invoke(
        app,
        [
            "segment",
            str(scene),
            "--model",
            str(model_pt),
            "--out",
            str(tmp_path / "c.tif"),
            "--scheduler",
            cluster.scheduler_address,
            "--block-rows",
            "1",
            "--probs",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert np.array_equal(_read(tmp_path / "c.tif"), _read(local))
