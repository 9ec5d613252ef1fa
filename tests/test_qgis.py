"""The QGIS Processing provider: installed into a temporary QGIS profile and run by QGIS itself (``qgis_process``
headless, and PyQGIS for Cancel), plus its pieces that need no QGIS (install, ZIP, runner, styles)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import REPO_ROOT, SHARED_DATA, make_geotiff, make_segmenter, one_clean_error, synthetic_image

from cdkd.errors import CdkdValueError, OutputExistsError
from cdkd.qgis import PLUGIN_NAME, install_plugin, plugin_source, profiles_root, zip_plugin
from cdkd.qgis.plugin.runner import CdkdCommand, CdkdRunError, Listener, find_cdkd, run_cdkd
from cdkd.qgis.plugin.styles import raster_classes

QGIS_PROCESS = shutil.which("qgis_process.bin") or shutil.which("qgis_process")  # .bin: no wrapper options
needs_qgis = pytest.mark.skipif(QGIS_PROCESS is None, reason="QGIS (qgis_process) is missing; .ci/run installs it")
# the cdkd of this source tree, as `cdkd qgis install` records it
THIS_CDKD = CdkdCommand((sys.executable, "-m", "cli.main"), {"PYTHONPATH": str(REPO_ROOT)})


def qgis_python() -> str | None:
    """A Python that imports PyQGIS (Debian's python3-qgis lives in the system Python)."""
    for python in (os.environ.get("CDKD_QGIS_PYTHON"), "/usr/bin/python3", shutil.which("python3")):
        if (
            python
            and Path(python).is_file()
            and subprocess.run([python, "-c", "import qgis.core"], capture_output=True, timeout=60).returncode == 0
        ):
            return python
    return None


# ---------------------------------------------------------------------------------------------- no QGIS needed


def test_the_plugin_imports_only_the_standard_library_and_qgis():
    """It runs in QGIS's Python: no torch, no numpy, no cdkd."""
    allowed = set(sys.stdlib_module_names) | {"qgis", "processing"}
    for path in plugin_source().glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name} imports {names}"


def test_the_plugin_choices_mirror_the_library():
    """The plugin cannot import cdkd; its fixed choices are spelled out and must agree with cdkd's."""
    from cdkd.inference import runtimes
    from cdkd.scene.core.source import STATS_MODES
    from cdkd.vector.choices import AREA_MODES

    def constants(name: str) -> dict:
        tree = ast.parse((plugin_source() / name).read_text())
        return {
            t.id: ast.literal_eval(n.value)
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name) and isinstance(n.value, ast.Tuple)
        }

    segment, vectorize = constants("segment.py"), constants("vectorize.py")
    assert segment["RUNTIMES"] == ("auto", *runtimes.RUNTIMES) and set(segment["AMP"]) == set(runtimes.AMP_MODES)
    assert segment["STATS"] == STATS_MODES and vectorize["AREA"] == AREA_MODES


def test_install_copies_the_plugin_records_this_cdkd_and_enables_it(tmp_path):
    ini = tmp_path / "profiles" / "work" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[General]\nlocale=de\n\n[PythonPlugins]\nother=false\ncdkd_processing=false\n")
    result = install_plugin("work", tmp_path, command=["/opt/cdkd/bin/cdkd"], env={"GDAL_DATA": "/opt/gdal"})
    assert result.plugin_dir == tmp_path / "profiles" / "work" / "python" / "plugins" / PLUGIN_NAME
    assert (result.plugin_dir / "metadata.txt").is_file() and (result.plugin_dir / "models").is_dir()
    assert not list(result.plugin_dir.rglob("__pycache__"))
    assert ini.read_text() == "[General]\nlocale=de\n\n[PythonPlugins]\nother=false\ncdkd_processing=true\n"
    found = find_cdkd(result.plugin_dir, environ={})
    assert found.argv == ("/opt/cdkd/bin/cdkd",) and dict(found.env) == {"GDAL_DATA": "/opt/gdal"}
    assert find_cdkd(result.plugin_dir, environ={"CDKD_EXECUTABLE": "/x/cdkd"}).argv == ("/x/cdkd",)
    # again, into a profile QGIS has not created yet: replaced in place, the new profile's settings made
    install_plugin("work", tmp_path, command=["/opt/cdkd/bin/cdkd"])
    fresh = install_plugin("new", tmp_path, command=["cdkd"])
    assert fresh.settings.read_text() == "[PythonPlugins]\ncdkd_processing=true\n"
    foreign = tmp_path / "profiles" / "x" / "python" / "plugins" / PLUGIN_NAME
    foreign.mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="not the cdkd plugin"):
        install_plugin("x", tmp_path)
    with pytest.raises(CdkdValueError, match="profile name"):
        install_plugin("../y", tmp_path)


def test_cli_install_and_zip(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    for cmd in (["qgis"], ["qgis", "install"], ["qgis", "zip"]):
        assert "Usage" in runner.invoke(app, [*cmd, "--help"]).output
    res = runner.invoke(
        app,
        ["qgis", "install", "--config-path", str(tmp_path), "--profile", "gis", "--executable", "/opt/env/bin/cdkd"],
    )
    assert res.exit_code == 0, res.output
    plugin = tmp_path / "profiles" / "gis" / "python" / "plugins" / PLUGIN_NAME
    assert f"installed the cdkd Processing provider in {plugin}" in res.output
    assert find_cdkd(plugin, environ={}).argv == ("/opt/env/bin/cdkd",)
    res = runner.invoke(app, ["qgis", "install", "--config-path", str(tmp_path), "--profile", "a/b"])
    assert res.exit_code == 2 and one_clean_error(res.output).startswith("Error: --profile 'a/b'")
    assert runner.invoke(app, ["qgis", "zip", str(tmp_path / "p.zip")]).exit_code == 0
    res = runner.invoke(app, ["qgis", "zip", str(tmp_path / "p.zip")])
    assert res.exit_code == 1 and "--overwrite" in one_clean_error(res.output)


def test_profiles_folder_of_each_platform(tmp_path):
    home = {"HOME": "/home/u"}
    assert profiles_root(platform="linux", environ=home) == Path("/home/u/.local/share/QGIS/QGIS3/profiles")
    assert profiles_root(platform="darwin", environ=home) == Path(
        "/home/u/Library/Application Support/QGIS/QGIS3/profiles"
    )
    assert profiles_root(platform="win32", environ={"APPDATA": "C:/Users/u/AppData/Roaming"}) == Path(
        "C:/Users/u/AppData/Roaming/QGIS/QGIS3/profiles"
    )
    assert (
        profiles_root(platform="linux", environ={**home, "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path)})
        == tmp_path / "profiles"
    )


def test_zip_for_install_from_zip(tmp_path):
    out = zip_plugin(tmp_path / "cdkd.zip", command=["/opt/cdkd/bin/cdkd"])
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        recorded = json.loads(zf.read(f"{PLUGIN_NAME}/cdkd_processing.json"))
    assert {n.split("/")[0] for n in names} == {PLUGIN_NAME}  # one top folder, as QGIS requires
    assert f"{PLUGIN_NAME}/metadata.txt" in names and f"{PLUGIN_NAME}/models/segment_and_vectorize.model3" in names
    assert recorded["command"] == ["/opt/cdkd/bin/cdkd"] and not any(".pyc" in n for n in names)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        zip_plugin(out)


class Recorder(Listener):
    def __init__(self) -> None:
        self.percents: list[float] = []
        self.lines: list[str] = []

    def progress(self, percent: float, text: str) -> None:
        self.percents.append(percent)

    def info(self, text: str) -> None:
        self.lines.append(text)


def test_runner_streams_progress_and_passes_errors_through(tmp_path, class_raster):
    listener = Recorder()
    out = tmp_path / "polygons.fgb"
    result = run_cdkd(["vectorize", str(class_raster), "--out", str(out)], listener, THIS_CDKD)
    assert result.outputs == [str(out), f"{out}.json", str(out.with_suffix(".qml"))]
    assert listener.percents[0] == 0 and listener.percents[-1] == 100
    assert any("wrote" in line for line in listener.lines)  # cdkd's own report reaches the log
    with pytest.raises(CdkdRunError, match=r"polygons.fgb: already exists; pass --overwrite") as failed:
        run_cdkd(["vectorize", str(class_raster), "--out", str(out)], Listener(), THIS_CDKD)
    assert failed.value.exit_code == 1 and "\n" not in str(failed.value)


def test_class_legend_read_back_from_the_sidecar(class_raster):
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.classraster import write_gis_legend

    schema = BUILTIN_SCHEMAS["dubai"]
    write_gis_legend(class_raster, schema)
    classes = raster_classes(class_raster)
    assert [(c.value, c.name, c.rgba) for c in classes] == [(c.id, c.name, (*c.color, 255)) for c in schema.classes]
    assert raster_classes(class_raster.with_name("none.tif")) == []


# ---------------------------------------------------------------------------------------------- with QGIS


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    return make_segmenter(tmp_path_factory.mktemp("model") / "segmenter.pt")


@pytest.fixture(scope="module")
def qgis_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a headless QGIS whose settings (profiles, plugins) live in a temporary folder with the
    plugin installed, calling this source tree's cdkd."""
    root = tmp_path_factory.mktemp("qgis")
    install_plugin("default", root, command=THIS_CDKD.argv, env=THIS_CDKD.env)
    runtime = root / "runtime"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if not is_venv_bin(d))
    return dict(env, QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(root), XDG_RUNTIME_DIR=str(runtime))


def is_venv_bin(folder: str) -> bool:
    """QGIS embeds the system Python without naming its program, so that Python finds its home by the first
    ``python3`` on PATH: an activated virtual environment's (made from another Python, here pyenv's) would give
    it a foreign standard library and no PyQGIS, and qgis_process crashes. QGIS as a user starts it has no
    virtual environment on PATH; the plugin reaches cdkd by its absolute command."""
    return bool(folder) and (Path(folder).parent / "pyvenv.cfg").is_file()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A real scene (USGS aerial, 383 x 232, EPSG:26913) where the shared data is, else a generated one."""
    real = SHARED_DATA / "scenes" / "colorado_hro.tif"
    if real.is_file():
        return real
    return make_geotiff(tmp_path_factory.mktemp("scene") / "scene.tif", synthetic_image((3, 232, 383), seed=2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, scene, model_pt) -> Path:
    """The class raster cdkd itself gives for ``scene`` (the library's segment_scene, in this process)."""
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    out = tmp_path_factory.mktemp("reference") / "classes.tif"
    segment_scene(scene, open_runtime(model_pt, device="cpu"), out, SegmentOptions(batch_size=2, progress=False))
    return out


@pytest.fixture
def class_raster(tmp_path) -> Path:
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.classraster import write_class_metadata

    ids = np.zeros((1, 40, 60), np.uint8)
    ids[0, :, 30:] = 3
    path = make_geotiff(tmp_path / "classes.tif", ids, nodata=255)
    with rasterio.open(path, "r+") as dst:
        write_class_metadata(dst, BUILTIN_SCHEMAS["dubai"])
    return path


def qgis_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QGIS_PROCESS, *args], env=env, capture_output=True, text=True, timeout=300)


@needs_qgis
def test_qgis_process_segment_gives_what_cdkd_segment_gives(qgis_env, scene, model_pt, reference, tmp_path):
    out = tmp_path / "qgis classes.tif"  # a space: paths go through two command lines
    proc = qgis_process(
        qgis_env,
        "--json",
        "run",
        "cdkd:segment",
        "--",
        f"INPUT={scene}",
        f"MODEL={model_pt}",
        "DEVICE=cpu",
        "BATCH_SIZE=2",
        "PROBS=1",
        f"OUTPUT={out}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    assert results["OUTPUT"] == str(out) and Path(results["CONFIDENCE"]).is_file()
    assert out.read_bytes() == reference.read_bytes()  # bitwise: the same COG, georeferencing and legend
    assert Path(f"{out}.aux.xml").read_text() == Path(f"{reference}.aux.xml").read_text()
    assert json.loads(Path(results["REPORT"]).read_text())["tiles_run"] > 0


@needs_qgis
def test_qgis_process_vectorize_and_its_errors(qgis_env, reference, scene, tmp_path):
    import pyogrio

    out = tmp_path / "polygons.gpkg"
    proc = qgis_process(
        qgis_env,
        "run",
        "cdkd:vectorize",
        "--",
        f"INPUT={reference}",
        f"OUTPUT={out}",
        "MIN_AREA=4px",
        "SIMPLIFY=0.3",
        "AREA=0",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = pyogrio.read_dataframe(out, layer="classes")
    with rasterio.open(reference) as src:
        present = {int(v) for v in np.unique(src.read(1)) if v != src.nodata}
        assert table.crs == src.crs
    schema_names = [c["name"] for c in json.loads(rasterio.open(reference).tags()["CDKD_CLASSES"])["classes"]]
    assert set(table["class_id"]) == present and set(table["class_name"]) <= set(schema_names)
    assert "layer_styles" in [name for name, _ in pyogrio.list_layers(out)]  # QGIS opens it in class colours
    assert json.loads(Path(f"{out}.json").read_text())["settings"]["min_area"] == "4px"

    failed = qgis_process(qgis_env, "run", "cdkd:vectorize", "--", f"INPUT={scene}", f"OUTPUT={tmp_path / 'x.gpkg'}")
    assert failed.returncode != 0
    assert f"cdkd: {scene}: has 3 bands; a class raster has exactly one (class ids)" in failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr


@needs_qgis
def test_cancel_then_resume_gives_the_uninterrupted_output(qgis_env, model_pt, tmp_path):
    """In a PyQGIS session: Cancel (a QgsProcessingFeedback, as the dialog's button) sends cdkd SIGINT and it
    saves a checkpoint; the same algorithm with Resume ticked finishes the scene, bitwise as one uninterrupted
    run; its output, and the polygons of each class, open in the project in the class colours and names. The
    provider also holds the model "Segment and vectorize"."""
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    python = qgis_python()
    if python is None:
        pytest.skip("no Python with PyQGIS (python3-qgis) to drive Cancel")
    tall = make_geotiff(tmp_path / "tall.tif", synthetic_image((3, 6000, 64), seed=3))  # 125 window rows
    whole = tmp_path / "whole.tif"
    segment_scene(tall, open_runtime(model_pt, device="cpu"), whole, SegmentOptions(batch_size=1, progress=False))
    out = tmp_path / "resumed.tif"
    plugins = Path(qgis_env["QGIS_CUSTOM_CONFIG_PATH"]) / "profiles" / "default" / "python" / "plugins"
    proc = subprocess.run(
        [python, str(REPO_ROOT / "tests" / "qgis_session.py"), str(plugins), str(tall), str(model_pt), str(out)],
        env=qgis_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (record["canceled"] or "").startswith("Canceled: cdkd saved a checkpoint") and record["checkpoint"], record
    assert not record["finished_early"] and max(record["progress_seen"]) < 100
    report = json.loads(Path(record["resumed"]["REPORT"]).read_text())
    assert 0 < report["resumed_from_row"] < 125  # it continued, not started again
    assert out.read_bytes() == whole.read_bytes()

    names = [c.name for c in raster_classes(whole)]
    with rasterio.open(whole) as src:
        present = sorted(names[int(v)] for v in np.unique(src.read(1)) if v != src.nodata)
    polygons = tmp_path / "resumed.gpkg"
    assert record["layers"] == sorted(
        [[str(out), "paletted", names]] + [[f"{polygons}|layername={n}", "categorizedSymbol", names] for n in present]
    )
    # the model shipped with the provider, loaded by it
    assert set(record["model"]) >= {
        "scene",
        "model",
        "device",
        "min_area",
        "simplify",
        "segment:Class raster",
        "vectorize:Polygons",
    }
