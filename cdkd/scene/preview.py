"""A quick-look PNG of a segmented scene: the scene beside its class map, with a legend of class names and colours.

For people who would rather look than open a GIS. Both rasters are read decimated (``out_shape``: GDAL serves the
read from overviews where the file has them, the class COG always does), so the cost does not grow with the
scene beyond what GDAL reads. The scene gets a 2-98 % percentile stretch per band over its valid pixels; its
nodata and the class map's nodata are transparent (white in the PNG). The figure is laid out in pixels
(``PreviewLayout``) so every raster pixel of a panel is one PNG pixel. The legend is also stored as JSON in
the PNG's text chunk ``cdkd:legend``, for scripts that read the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdkd.data.classes import ClassSchema
from cdkd.errors import CdkdIOError, CdkdValueError, OutputExistsError
from cdkd.utils.atomic import atomic_path

LEGEND_KEY = "cdkd:legend"  # PNG text chunk holding the legend as JSON
STRETCH = (2.0, 98.0)  # percentiles mapped to black and white
DPI = 100  # figure inches x DPI = PNG pixels
PAD, GAP, TITLE, ROW, SWATCH, CHAR = 12, 12, 24, 22, 16, 7  # layout in px; CHAR: width of a 9 pt character


Box = tuple[int, int, int, int]  # (left, top, width, height) in PNG pixels, origin top-left


@dataclass(frozen=True)
class PreviewLayout:
    """Where everything sits in the PNG, in pixels: two ``panel`` boxes (scene, classes) and one swatch per class."""

    width: int
    height: int
    scene: Box
    classes: Box
    legend: Box
    swatches: tuple[Box, ...]  # one per class, in id order

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG."""
        return self.width, self.height


def panel_shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(rows, cols) of a panel: the raster scaled so its longer side is at most ``max_size`` (never enlarged)."""
    if max_size < 1:
        raise CdkdValueError(f"preview size must be at least 1 px, got {max_size}")
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def preview_layout(rows: int, cols: int, names: Sequence[str]) -> PreviewLayout:
    """The layout for two ``rows`` x ``cols`` panels side by side and a legend of ``names`` to their right."""
    legend_w = max(120, SWATCH + 16 + CHAR * max(len(n) for n in names))
    legend_h = ROW * len(names)
    top = PAD + TITLE
    scene = (PAD, top, cols, rows)
    classes = (PAD + cols + GAP, top, cols, rows)
    legend = (PAD + 2 * (cols + GAP), top, legend_w, legend_h)
    swatches = tuple((legend[0], top + i * ROW + (ROW - SWATCH) // 2, SWATCH, SWATCH) for i in range(len(names)))
    return PreviewLayout(
        width=legend[0] + legend_w + PAD,
        height=top + max(rows, legend_h) + PAD,
        scene=scene,
        classes=classes,
        legend=legend,
        swatches=swatches,
    )


def stretch(pixels: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float] = STRETCH) -> np.ndarray:
    """(C, H, W) pixels of any dtype and (H, W) bool validity -> (H, W, C) uint8, each band stretched so its
    ``percentiles`` of valid pixels map to 0 and 255 (a band without valid pixels, or a flat one, maps to 0)."""
    out = np.zeros((*pixels.shape[1:], pixels.shape[0]), dtype=np.uint8)
    for b, band in enumerate(pixels.astype(np.float64)):
        values = band[valid & np.isfinite(band)]
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, percentiles)
        scaled = (band - lo) / max(hi - lo, 1e-12)
        out[..., b] = np.rint(255 * np.clip(np.nan_to_num(scaled), 0, 1)).astype(np.uint8)
    return out


def _display_bands(src: Any, bands: Sequence[int] | None) -> tuple[int, ...]:
    """1-based bands to show: ``bands``; else the red/green/blue bands by colour interpretation; else 1,2,3
    (or band 1 alone as grey for a scene with fewer than three)."""
    if bands is None:
        from rasterio.enums import ColorInterp

        interp = list(src.colorinterp)
        rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        if all(c in interp for c in rgb):
            return tuple(interp.index(c) + 1 for c in rgb)
        return (1, 2, 3) if src.count >= 3 else (1,)
    bands = tuple(int(b) for b in bands)
    if len(bands) not in (1, 3) or not all(1 <= b <= src.count for b in bands):
        raise CdkdValueError(f"{src.name}: preview bands {list(bands)} must be 1 or 3 of its bands 1..{src.count}")
    return bands


def read_scene_rgba(src: Any, shape: tuple[int, int], bands: Sequence[int] | None = None) -> np.ndarray:
    """The open scene ``src`` decimated to ``shape`` (rows, cols) as (rows, cols, 4) uint8 RGBA, stretched;
    pixels outside GDAL's dataset mask are transparent."""
    from rasterio.enums import Resampling

    idx = _display_bands(src, bands)
    pixels = src.read(list(idx), out_shape=(len(idx), *shape), resampling=Resampling.average)
    valid = src.dataset_mask(out_shape=shape) > 0
    rgb = stretch(pixels, valid)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.dstack([rgb, np.where(valid, 255, 0).astype(np.uint8)])


def read_class_rgba(src: Any, shape: tuple[int, int], schema: ClassSchema) -> np.ndarray:
    """The open class raster ``src`` at ``shape`` (nearest: from its mode overviews) as (rows, cols, 4) uint8
    RGBA in the class colours; nodata and values that are no class are transparent."""
    from rasterio.enums import Resampling

    ids = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    lut = np.zeros((256, 4), dtype=np.uint8)
    lut[: schema.num_classes, :3] = schema.palette()
    lut[: schema.num_classes, 3] = 255
    return lut[ids.astype(np.uint8)]


def _open(path: Path, what: str) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        raise CdkdIOError(f"{path}: cannot open the {what} ({e})") from None


def _figure(
    scene: np.ndarray, classes: np.ndarray, schema: ClassSchema, layout: PreviewLayout, titles: tuple[str, str]
) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot state) drawn to ``layout``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    w, h = layout.size
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def axes(box: Box) -> Any:
        left, top, bw, bh = box
        ax = fig.add_axes((left / w, 1 - (top + bh) / h, bw / w, bh / h))
        ax.set_axis_off()
        return ax

    for box, image, title in ((layout.scene, scene, titles[0]), (layout.classes, classes, titles[1])):
        ax = axes(box)
        # one raster pixel = one PNG pixel: no smoothing, no resampling of the class colours
        ax.imshow(image, interpolation="nearest", aspect="auto", extent=(0, box[2], box[3], 0))
        max_chars = max(4, box[2] // CHAR)
        text = title if len(title) <= max_chars else title[: max_chars - 1] + "…"
        fig.text((box[0]) / w, 1 - (box[1] - 6) / h, text, fontsize=9, va="bottom", ha="left")
    ax = axes(layout.legend)
    ax.set_xlim(0, layout.legend[2])
    ax.set_ylim(layout.legend[3], 0)
    for c, (_left, top, size, _) in zip(schema.classes, layout.swatches):
        y = top - layout.legend[1]
        ax.add_patch(Rectangle((0, y), size, size, facecolor=np.asarray(c.color) / 255, edgecolor="0.3", linewidth=0.8))
        ax.text(size + 8, y + size / 2, c.name, fontsize=9, va="center", ha="left")
    return fig


def write_preview(
    scene_path: str | Path,
    class_raster_path: str | Path,
    out_png: str | Path,
    max_size: int = 1024,
    bands: Sequence[int] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a PNG of the scene (left) beside its class map (right) with a legend; returns ``out_png``.

    Args:
        scene_path: the scene that was segmented (any raster ``cdkd.data.files.open_raster`` opens: a GDAL
            raster, URL, band stack, or a STAC item, shown as its red, green and blue assets).
        class_raster_path: its class raster from ``cdkd segment`` (the legend comes from its metadata).
        out_png: the PNG to write (atomically).
        max_size: longest side of each panel in px; rasters are scaled down to it, never up.
        bands: 1-based scene bands to show as RGB (three) or grey (one); default: the scene's red, green and
            blue bands, else 1,2,3.
        overwrite: replace an existing ``out_png``; else that is an ``OutputExistsError``.
    """
    from cdkd.data.classraster import CLASSES_TAG, read_class_schema
    from cdkd.data.files import open_raster
    from cdkd.data.gdal import raster_path

    scene_path, class_raster_path, out_png = raster_path(scene_path), Path(class_raster_path), Path(out_png)
    scene_name = str(scene_path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]  # a URL's too
    if out_png.suffix.lower() != ".png":
        raise CdkdValueError(f"{out_png}: a preview is a PNG; give a name ending in .png")
    if out_png.exists() and not overwrite:
        raise OutputExistsError(f"{out_png}: already exists; pass --overwrite to replace it")
    with _open(class_raster_path, "class raster") as cls_src, open_raster(scene_path) as scene_src:
        schema = read_class_schema(cls_src)
        if schema is None:
            raise CdkdValueError(
                f"{class_raster_path}: carries no class legend (no {CLASSES_TAG} tag); is it a cdkd segment output?"
            )
        if (scene_src.width, scene_src.height) != (cls_src.width, cls_src.height):
            raise CdkdValueError(
                f"{class_raster_path}: is {cls_src.width}x{cls_src.height} px but the scene "
                f"{scene_name} is {scene_src.width}x{scene_src.height}; preview a class "
                "raster with the scene it was made from"
            )
        shape = panel_shape(cls_src.width, cls_src.height, max_size)
        scene = read_scene_rgba(scene_src, shape, bands)
        classes = read_class_rgba(cls_src, shape, schema)
        shown = _display_bands(scene_src, bands)
    layout = preview_layout(*shape, schema.names)
    titles = (f"{scene_name} (bands {','.join(map(str, shown))})", class_raster_path.name)
    fig = _figure(scene, classes, schema, layout, titles)
    legend = [{"id": c.id, "name": c.name, "color": list(c.color)} for c in schema.classes]
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI, metadata={LEGEND_KEY: json.dumps(legend), "Title": titles[0]})
    return out_png
