"""Mixed-resolution products: one scene given as several single-band files of different GSD, read as one raster.

Sentinel-2 ships each band as its own file on its own grid (10 m: B02-B04, B08; 20 m: B05-B07, B8A, B11, B12;
60 m: B01, B09). A *band stack* names such files; cdkd builds a GDAL VRT for it in memory (an XML string,
never written to disk) whose bands are the files resampled on the fly onto one grid, and opens that with
rasterio. Nothing is pre-stacked: a window read of the stack reads and resamples just that window of every file.
Every reader in cdkd goes through ``cdkd.data.files`` (distillation tiles, statistics, fine-tuning pairs, the
scene engine), so a band stack works wherever a GeoTIFF does.

Two forms:

- a **manifest**, ``NAME.bands.yaml`` (or ``.bands.yml`` / ``.bands.json``; relative paths are relative to it)::

      folder: S2A_MSIL2A_20170613T101031_87_48   # every single-band raster in it ...
      # files: [a_B02.tif, a_B03.tif, a_B04.tif]  # ... or these files, in this order
      grid: B02            # optional: the band whose grid the others are resampled onto (name, 1-based index
                           # or file name); default: the finest (smallest pixels), first on ties
      resampling: bilinear # optional: nearest | bilinear | cubic | cubicspline | lanczos | average | mode
      wavelengths: sentinel2_l2a   # optional: a preset or centres in nm (see cdkd.data.sensors.parse_wavelengths)

  Manifests are found by the data discovery (``cdkd distill --data`` folders) and accepted as scenes by
  ``cdkd segment``.
- a **folder** of single-band rasters, given directly as a path to the library (``open_raster(folder)``).

Band order, when not given by ``files``: by centre wavelength when every file's metadata gives one (band tags,
ENVI header) or its name's last ``_`` token is a band a sensor preset knows (``..._B8A.tif``), else by file name.
The stack's bands carry their names and wavelengths (band descriptions, ``wavelength_nm`` / ``fwhm_nm`` tags and
GDAL's ``IMAGERY`` domain), so ``cdkd.data.files.read_band_set`` sees them like any tagged GeoTIFF's.

Rules: every file has one band, all share the CRS and the pixel type, and the grids are north-up; the result
equals a stack resampled with the same method by rasterio (bit for bit on the real Sentinel-2 patches, bilinear).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence
from xml.etree import ElementTree as ET

from cdkd.data.bandmeta import band_set_of
from cdkd.data.bands import Band, BandSet
from cdkd.data.gdal import open_file
from cdkd.data.sensors import band_set_from_names, parse_wavelengths
from cdkd.errors import CdkdIOError, CdkdValueError, DataError

MANIFEST_SUFFIXES = (".bands.yaml", ".bands.yml", ".bands.json")
RESAMPLING = ("nearest", "bilinear", "cubic", "cubicspline", "lanczos", "average", "mode")
_BAND_FILE_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt")


def is_manifest(path: str | Path) -> bool:
    return str(path).lower().endswith(MANIFEST_SUFFIXES)


def is_band_stack(path: str | Path) -> bool:
    """True for a band-stack manifest or a local folder (both read through ``open_band_stack``)."""
    text = str(path)
    if is_manifest(text):
        return True
    return not text.startswith("/vsi") and "://" not in text and Path(text).is_dir()


@dataclass(frozen=True)
class _BandFile:
    path: str
    name: str
    band: Band | None
    width: int
    height: int
    transform: Any  # affine.Affine
    crs: Any
    dtype: str
    nodata: float | None


def _band_name(path: str) -> str:
    stem = Path(path).name.split(".")[0]
    return stem.rsplit("_", 1)[-1] if "_" in stem else stem


def _read_band_file(path: str) -> _BandFile:
    with open_file(path) as src:
        if src.count != 1:
            raise DataError(f"{path}: has {src.count} bands; a band stack is made of single-band files")
        spectral = band_set_of(src, path)
        name = (src.descriptions[0] or "") or _band_name(path)
        band = spectral.bands[0] if spectral is not None else None
        if band is not None and not band.name:
            band = Band(band.center_nm, band.width_nm, name)
        return _BandFile(path, name, band, src.width, src.height, src.transform, src.crs, src.dtypes[0], src.nodata)


@dataclass(frozen=True)
class BandStack:
    """Single-band ``files`` (absolute paths, in band order) resampled onto the grid of ``files[grid]``."""

    files: tuple[str, ...]
    source: str  # the manifest or folder, for messages
    grid: int = -1  # 0-based index of the grid band; -1 = the finest
    resampling: str = "bilinear"
    wavelengths: str | None = None
    ordered: bool = True  # keep the files' order; False: order by wavelength when known (a folder's files)
    spectral: BandSet | None = None  # the files' bands as the caller knows them (a STAC item's), in file order

    def __post_init__(self) -> None:
        if self.resampling not in RESAMPLING:
            raise CdkdValueError(f"{self.source}: resampling {self.resampling!r} is not one of {', '.join(RESAMPLING)}")
        if not self.files:
            raise DataError(f"{self.source}: no band file")

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs: Any) -> BandStack:
        folder = Path(folder)
        found = sorted(
            str(p.resolve())
            for p in folder.iterdir()
            if p.suffix.lower() in _BAND_FILE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not found:
            raise DataError(
                f"{folder}: no band file in this folder (looked for {', '.join('*' + s for s in _BAND_FILE_SUFFIXES)})"
            )
        return cls(tuple(found), str(folder), **dict(kwargs, ordered=False))

    @classmethod
    def from_manifest(cls, path: str | Path) -> BandStack:
        path = Path(path)
        try:
            import yaml

            spec = yaml.safe_load(path.read_text())  # JSON is YAML
        except FileNotFoundError:
            raise CdkdIOError(f"{path}: no such file") from None
        except Exception as e:  # yaml errors of many kinds: one line naming the file
            raise CdkdValueError(f"{path}: not a readable band manifest ({str(e).splitlines()[0]})") from None
        if not isinstance(spec, dict) or ("folder" in spec) == ("files" in spec):
            raise CdkdValueError(f"{path}: a band manifest needs exactly one of 'folder' or 'files'")
        unknown = sorted(set(spec) - {"folder", "files", "grid", "resampling", "wavelengths"})
        if unknown:
            raise CdkdValueError(f"{path}: unknown key(s) {', '.join(unknown)} in a band manifest")
        base = path.resolve().parent
        opts: dict[str, Any] = {
            "resampling": str(spec.get("resampling", "bilinear")),
            "wavelengths": None if spec.get("wavelengths") is None else str(spec["wavelengths"]),
        }
        if "folder" in spec:
            files = cls.from_folder(base / str(spec["folder"])).files
        else:
            files = tuple(
                str((base / str(f)).resolve()) if not str(f).startswith("/vsi") else str(f) for f in spec["files"] or ()
            )
        stack = cls(files, str(path), ordered="files" in spec, **opts)
        grid = spec.get("grid")
        return stack if grid is None else replace(stack, grid=stack.index_of(grid))

    def index_of(self, key: Any) -> int:
        """0-based index of the file a ``grid`` value names: a 1-based index, a file name or a band name."""
        if isinstance(key, int) and not isinstance(key, bool):
            if not 1 <= key <= len(self.files):
                raise CdkdValueError(f"{self.source}: grid band {key} outside 1..{len(self.files)}")
            return key - 1
        for i, f in enumerate(self.files):
            if str(key) in (Path(f).name, Path(f).stem, _band_name(f)):
                return i
        raise CdkdValueError(f"{self.source}: grid {key!r} names none of the band files")

    # --------------------------------------------------------------------------------------------------- build
    def bands(self) -> tuple[list[_BandFile], BandSet | None]:
        """The band files in stack order and their band set (None when nothing names their wavelengths)."""
        items = [_read_band_file(f) for f in self.files]
        if self.spectral is not None:
            return items, self.spectral
        if self.wavelengths:
            spectral: BandSet | None = parse_wavelengths(self.wavelengths, len(items), [b.name for b in items])
            return items, spectral
        if all(b.band is not None for b in items):
            spectral = BandSet(tuple(b.band for b in items))  # type: ignore[misc]
        else:
            spectral = band_set_from_names([b.name for b in items])
        if spectral is None or self.ordered:
            return items, spectral
        order = sorted(range(len(items)), key=lambda i: (spectral.bands[i].center_nm, i))
        return [items[i] for i in order], BandSet(tuple(spectral.bands[i] for i in order), spectral.sensor)

    def vrt_xml(self) -> str:
        """The GDAL VRT (XML) of the stack: every band resampled onto the grid band's grid."""
        from rasterio.dtypes import _gdal_typename

        items, spectral = self.bands()
        grid_file = self.files[self.grid] if self.grid >= 0 else None
        ref = next((b for b in items if b.path == grid_file), None) or min(
            items, key=lambda b: abs(b.transform.a * b.transform.e)
        )
        for b in items:
            if b.crs != ref.crs:
                raise DataError(
                    f"{self.source}: {Path(b.path).name} is in {b.crs} but {Path(ref.path).name} in "
                    f"{ref.crs}; a band stack needs one CRS (reproject the files first)"
                )
            if b.dtype != ref.dtype:
                raise DataError(
                    f"{self.source}: {Path(b.path).name} holds {b.dtype} but {Path(ref.path).name} "
                    f"{ref.dtype}; a band stack needs one pixel type"
                )
            if b.transform.b or b.transform.d:
                raise DataError(
                    f"{self.source}: {Path(b.path).name} has a rotated grid; band stacks need north-up files"
                )
        g = ref.transform
        root = ET.Element("VRTDataset", rasterXSize=str(ref.width), rasterYSize=str(ref.height))
        if ref.crs is not None:
            ET.SubElement(root, "SRS").text = ref.crs.to_wkt()
        ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in g.to_gdal())
        for k, b in enumerate(items):
            band = ET.SubElement(root, "VRTRasterBand", dataType=_gdal_typename(b.dtype), band=str(k + 1))
            info = spectral.bands[k] if spectral is not None else None
            ET.SubElement(band, "Description").text = info.name if info is not None and info.name else b.name
            if b.nodata is not None:
                ET.SubElement(band, "NoDataValue").text = repr(float(b.nodata))
            if info is not None:
                _metadata(band, info)
            src = ET.SubElement(band, "ComplexSource", resampling=self.resampling)
            ET.SubElement(src, "SourceFilename", relativeToVRT="0").text = b.path
            ET.SubElement(src, "SourceBand").text = "1"
            ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(b.width), ySize=str(b.height))
            t = b.transform
            dst = {
                "xOff": (t.c - g.c) / g.a,
                "yOff": (t.f - g.f) / g.e,
                "xSize": b.width * t.a / g.a,
                "ySize": b.height * t.e / g.e,
            }
            ET.SubElement(src, "DstRect", {k2: _num(v) for k2, v in dst.items()})
            if b.nodata is not None:
                ET.SubElement(src, "NODATA").text = repr(float(b.nodata))
        return ET.tostring(root, encoding="unicode")


def _num(v: float) -> str:
    return str(int(round(v))) if math.isclose(v, round(v), abs_tol=1e-9) else repr(float(v))


def _metadata(band: ET.Element, info: Band) -> None:
    md = ET.SubElement(band, "Metadata")
    items = {"wavelength_nm": f"{info.center_nm:g}", "band_name": info.name}
    if info.width_nm is not None:
        items["fwhm_nm"] = f"{info.width_nm:g}"
    for key, value in items.items():
        if value:
            ET.SubElement(md, "MDI", key=key).text = value
    imagery = ET.SubElement(band, "Metadata", domain="IMAGERY")
    ET.SubElement(imagery, "MDI", key="CENTRAL_WAVELENGTH_UM").text = f"{info.center_nm / 1000:.6g}"
    if info.width_nm is not None:
        ET.SubElement(imagery, "MDI", key="FWHM_UM").text = f"{info.width_nm / 1000:.6g}"


def load_band_stack(path: str | Path) -> BandStack:
    """The ``BandStack`` a manifest or folder describes."""
    return BandStack.from_manifest(path) if is_manifest(path) else BandStack.from_folder(path)


@functools.lru_cache(maxsize=256)
def _cached_xml(path: str, stamp: tuple[int, ...]) -> str:
    return load_band_stack(path).vrt_xml()


def _stamp(path: str) -> tuple[int, ...]:
    """What invalidates a cached VRT: the manifest's or folder's modification time and size."""
    st = Path(path).stat()
    return (st.st_mtime_ns, st.st_size)


def band_stack_xml(path: str | Path) -> str:
    """The VRT XML of the band stack at ``path`` (cached per process while the manifest/folder is unchanged:
    training opens the same stack for every tile)."""
    p = str(path)
    if not Path(p).exists():
        raise CdkdIOError(f"{p}: no such file or folder")
    return _cached_xml(p, _stamp(p))


def open_band_stack(path: str | Path) -> Any:
    """The band stack at ``path`` opened as one rasterio dataset (a VRT held in memory)."""
    import rasterio
    from rasterio.errors import RasterioError

    xml = band_stack_xml(path)
    try:
        return rasterio.open(xml)
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: the band files cannot be read as one raster ({e})") from None


def manifest_members(path: str | Path) -> list[Path]:
    """The files a manifest stacks (so that data discovery does not also take them for images of their own)."""
    try:
        return [Path(f) for f in load_band_stack(path).files]
    except (CdkdIOError, CdkdValueError):
        return []


def write_manifest(
    out: str | Path,
    *,
    folder: str | Path | None = None,
    files: Sequence[str | Path] | None = None,
    grid: str | int | None = None,
    resampling: str = "bilinear",
    wavelengths: str | None = None,
) -> Path:
    """Write a band-stack manifest (atomically); paths are stored as given (absolute stays absolute)."""
    import yaml

    from cdkd.utils.atomic import atomic_write_text

    out = Path(out)
    if not is_manifest(out):
        raise CdkdValueError(f"{out}: a band manifest's name ends in {' or '.join(MANIFEST_SUFFIXES)}")
    if (folder is None) == (files is None):
        raise CdkdValueError("write_manifest needs exactly one of folder or files")
    spec: dict[str, Any] = {"folder": str(folder)} if folder is not None else {"files": [str(f) for f in files or ()]}
    if grid is not None:
        spec["grid"] = grid
    spec["resampling"] = resampling
    if wavelengths is not None:
        spec["wavelengths"] = wavelengths
    atomic_write_text(out, yaml.safe_dump(spec, sort_keys=False))
    return out
