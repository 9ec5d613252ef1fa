"""Shared test fixtures: the real-data folder (skipped when absent) and small synthetic rasters written in code."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
# Triton kernels run compiled on a GPU, else in Triton's interpreter, in the process ``run_interpreted`` starts
kernel_test = pytest.mark.skipif(
    not (CUDA or TRITON_INTERPRETED),
    reason="run by test_in_the_triton_interpreter (a process with TRITON_INTERPRET=1)",
)
# real imagery lives beside the repository (../shared/data) and is never copied into it
SHARED_DATA = Path(os.environ.get("CDKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def read_metrics(run: Path) -> list[dict]:
    """The rows of a training run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def distill_single_and_ddp(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """``cdkd <args>`` as one process at batch 2 and as two gloo ranks at batch 1 (torchrun, one thread each):
    the two run folders (``tmp_path/single``, ``tmp_path/ddp``)."""
    from typer.testing import CliRunner

    from cli.main import app

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    result = CliRunner().invoke(app, args + ["--out", str(single), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cli.main",
        *args,
        "--out",
        str(ddp),
        "--batch-size",
        "1",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, ddp


def one_clean_error(output: str) -> str:
    """The one ``Error: ...`` line of a CLI run's output (no traceback, no second error line)."""
    assert "Traceback" not in output
    errors = [ln for ln in output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


@dataclass
class Served:
    """A folder served over HTTP: its base ``url`` and the ``ranges`` requested, as (file path, start, end)."""

    url: str
    ranges: list = field(default_factory=list)


def _range_handler(root: Path, served: Served) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        """Serves the files under ``root`` with HTTP range requests, as an object store does (GDAL's /vsicurl/
        reads by ranges); anything else, folders included, is a 404."""

        def _send(self, body: bool) -> None:
            name = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
            path = (root / name).resolve()
            if not name or root not in path.parents or not path.is_file():
                self.send_error(404)
                return
            data, header = path.read_bytes(), self.headers.get("Range")
            if header:
                start, end = header.split("=")[1].split("-")
                start, end = int(start), min(int(end or len(data) - 1), len(data) - 1)
                served.ranges.append((name, start, end))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                data = data[start : end + 1]
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(False)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def http_folder(monkeypatch):
    """``http_folder(root)`` serves ``root`` on 127.0.0.1 (a free port) with range requests until the test ends and
    returns its ``Served`` (base URL, ranges requested)."""
    servers = []
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    def serve(root: Path) -> Served:
        root = Path(root).resolve()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), None)  # handler set below: it needs the URL
        served = Served(f"http://127.0.0.1:{server.server_address[1]}")
        server.RequestHandlerClass = _range_handler(root, served)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return served

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} (set CDKD_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder, or skip."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def rsscn7_dir() -> Path:
    """350 real 400x400 RGB JPEG tiles (RSSCN7), or skip."""
    return _require(SHARED_DATA / "unlabeled" / "rsscn7")


# --------------------------------------------------------------------------------------------------------------
# synthetic rasters


def synthetic_image(shape: tuple[int, int, int], seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    """(C, H, W) image with structure: per-band smooth gradients, a few Gaussian blobs and mild noise.

    Values span most of the dtype's range (uint8: ~10..245, uint16: ~1000..~12000) and are never 0, so a
    nodata value of 0 can be placed deliberately.
    """
    c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((c, h, w), dtype=np.float64)
    for b in range(c):
        angle = rng.uniform(0, 2 * np.pi)
        band = 0.5 + 0.3 * (np.cos(angle) * xx / w + np.sin(angle) * yy / h - 0.5)
        for _ in range(4):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.05, 0.2) * max(h, w)
            band += rng.uniform(-0.3, 0.3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        band += rng.normal(0, 0.02, size=(h, w))
        out[b] = np.clip(band, 0.04, 0.96)
    if dtype == "uint8":
        return np.round(out * 255).astype(np.uint8)
    if dtype == "uint16":
        return np.round(out * 12000 + 500).astype(np.uint16)
    return out.astype(dtype)


def make_geotiff(
    path: str | Path,
    array: np.ndarray,
    crs: str | None = "EPSG:32633",
    transform: Affine | None = None,
    nodata: float | None = None,
    **profile,
) -> Path:
    """Write (C, H, W) ``array`` as a GeoTIFF (10 m UTM pixels by default); ``profile`` overrides creation options."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = array.shape
    options = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=array.dtype.name,
        crs=crs,
        transform=transform if transform is not None else Affine(10, 0, 500_000, 0, -10, 5_000_000),
        nodata=nodata,
    )
    options.update(profile)
    with rasterio.open(path, "w", **options) as dst:
        dst.write(array)
    return path


def make_image(path: str | Path, array: np.ndarray, driver: str) -> Path:
    """Write (C, H, W) uint8 ``array`` as a plain JPEG or PNG (no georeferencing) through rasterio."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = array.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver=driver, width=width, height=height, count=count, dtype="uint8") as dst:
            dst.write(array)
    for aux in path.parent.glob(path.name + ".aux.xml"):
        aux.unlink()  # GDAL may leave a sidecar for formats without georeferencing
    return path


@pytest.fixture
def geotiff_factory(tmp_path):
    """``geotiff_factory(name, array, **kw)`` writes ``tmp_path/name`` with ``make_geotiff``."""

    def factory(name: str, array: np.ndarray, **kwargs) -> Path:
        return make_geotiff(tmp_path / name, array, **kwargs)

    return factory


# sizes below are (height, width)
TILE_DIR_USABLE = {
    "scenes/a/grass.jpg": (3, 96, 96),
    "scenes/b/FIELD.JPG": (3, 96, 96),  # upper-case suffix must match too
    "scenes/b/deep/river.png": (3, 80, 120),
    "geo/rgb.tif": (3, 260, 300),
    "geo/ms_uint16.tif": (4, 200, 200),
}
TILE_DIR_BROKEN = ("geo/broken.tif", "geo/truncated.tif")
MS_NODATA_CORNER = 40  # ms_uint16.tif: the top-left 40x40 pixels are nodata (0 in every band)


@pytest.fixture
def tile_dir(tmp_path) -> Path:
    """A nested folder of small structured images, plus files that must be skipped.

    Usable (5): two 96x96 RGB JPEGs, an RGB PNG of 80 rows x 120 columns, a 3-band uint8 GeoTIFF 260x300 and a
    4-band uint16 GeoTIFF 200x200 with nodata 0 in its top-left ``MS_NODATA_CORNER`` square.
    Skipped (2 of 7 candidates): ``broken.tif`` (random bytes) and ``truncated.tif`` (header intact, the second
    half of its strips cut off; its top-left 64 rows still decode). ``notes.txt`` is not a candidate.
    """
    root = tmp_path / "tiles"
    make_image(root / "scenes/a/grass.jpg", synthetic_image((3, 96, 96), seed=1), "JPEG")
    make_image(root / "scenes/b/FIELD.JPG", synthetic_image((3, 96, 96), seed=2), "JPEG")
    make_image(root / "scenes/b/deep/river.png", synthetic_image((3, 80, 120), seed=3), "PNG")
    make_geotiff(root / "geo/rgb.tif", synthetic_image((3, 260, 300), seed=4))
    ms = synthetic_image((4, 200, 200), seed=5, dtype="uint16")
    ms[:, :MS_NODATA_CORNER, :MS_NODATA_CORNER] = 0
    make_geotiff(root / "geo/ms_uint16.tif", ms, nodata=0)

    (root / "notes.txt").write_text("not an image\n")
    (root / "geo/broken.tif").write_bytes(np.random.default_rng(6).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = make_geotiff(
        root / "geo/truncated.tif", synthetic_image((3, 128, 128), seed=7), blockysize=16, interleave="pixel"
    )
    data = truncated.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.75)])
    return root


TINY_STUDENT = {"embed_dim": 48, "depth": 4, "num_heads": 2}  # a real vit_s, shrunk so tests run in milliseconds


def make_segmenter(
    path: str | Path,
    tile: int = 64,
    overlap: int = 16,
    in_chans: int = 3,
    schema=None,
    norm=None,
    seed: int = 0,
) -> Path:
    """Write a real (untrained, seeded) ``segmenter.pt``: a tiny vit_s + UPerNet, as ``cdkd finetune`` saves it."""
    import torch

    from cdkd.artifacts import SegmenterInfo, StudentInfo, save_segmenter
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.stats import NormStats
    from cdkd.models.student import build_student
    from cdkd.models.upernet import Segmenter

    schema = schema or BUILTIN_SCHEMAS["dubai"]
    norm = norm or NormStats(
        mean=(110.0,) * in_chans, std=(50.0,) * in_chans, bands=tuple(range(1, in_chans + 1)), dtype="uint8"
    )
    torch.manual_seed(seed)
    arch_args = dict(TINY_STUDENT, img_size=tile, in_chans=in_chans)
    model = Segmenter(build_student("vit_s", **arch_args), schema.num_classes, layers=(1, 2, 3, 4), channels=32)
    student = StudentInfo("vit_s", arch_args, norm, {"teacher": "none (test fixture)"})
    info = SegmenterInfo(student=student, head=model.config(), classes=schema, tile_size=tile, overlap=overlap)
    save_segmenter(path, model.eval(), info)
    return Path(path)


@pytest.fixture
def segmenter_pt(tmp_path) -> Path:
    """A tiny 3-band, 64 px, 5-class (Dubai schema) segmenter.pt with seeded random weights."""
    return make_segmenter(tmp_path / "segmenter.pt")


def run_interpreted(test_file: str) -> None:
    """The tests of ``test_file`` in a fresh process whose triton is imported with ``TRITON_INTERPRET=1``: Triton
    reads the variable when its library is imported, which torchvision and timm trigger while pytest collects, so
    a process that did not set it first cannot interpret kernels. Fails unless some passed and none failed;
    skipped where the kernels run in this process (a GPU, or this is that process)."""
    if CUDA or TRITON_INTERPRETED:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
