"""STAC Items as scenes: the assets that hold a model's bands, stacked into one raster by the band stack.

A scene may be given as a STAC Item or ItemCollection (GeoJSON ``Feature`` / ``FeatureCollection``), a local
``*.json`` file or a URL (``https://.../item.json``, or a STAC API's ``.../collections/C/items/ID``). One item
of a collection is named ``COLLECTION.json#ITEM_ID``; ``expand_scenes`` turns a collection into one such scene
per item, so outputs take the item's id.

Which assets make the scene (``choose_assets``), in the model's channel order:

- ``assets`` (``--assets a,b,c``): these asset keys, in this order;
- else, for a model that knows its bands (``NormStats.spectral``), for each model band the single-band asset whose
  band (``eo:bands``, or STAC 1.1's ``bands`` with ``eo:center_wavelength`` / ``eo:common_name``) measures it: a
  centre wavelength within ``cdkd.data.bands.tolerance_nm``, or, for an asset that gives only a common name, the
  model band's centre inside that name's range (``nir``: 750-1000 nm); an asset named like a sensor preset band
  (``B04``) takes the preset's wavelength. Nearest first, each asset used once; GeoTIFFs before other formats
  (Earth Search lists every Sentinel-2 band as a COG and as a JPEG 2000);
- else, for a 3-channel model without band metadata (cdkd's RGB models), the item's red, green and blue assets.

The chosen files are stacked by ``cdkd.data.bandstack.BandStack`` (an in-memory VRT resampled onto the finest
grid, mixed resolutions included), with the STAC band metadata as band tags. Remote assets are read by GDAL through
``/vsicurl/`` (HTTP range requests: only the windows a tile needs); ``s3://`` and ``gs://`` hrefs map to
``/vsis3/`` and ``/vsigs/``. Relative hrefs resolve against the item's own location. Where the asset files carry no
CRS, the item's ``proj:code`` / ``proj:epsg`` (and ``proj:transform`` for files without a geotransform) place the
stack.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

from cdkd.data.bands import Band, BandSet, tolerance_nm
from cdkd.data.sensors import TEACHER_RGB, band_set_from_names
from cdkd.errors import CdkdError, CdkdIOError, CdkdValueError, DataError

STAC_SUFFIXES = (".json", ".geojson")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_GEOTIFF = ("image/tiff", "image/geotiff", "image/vnd.stac.geotiff")
_IDENTITY = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # GDAL's geotransform of a file that has none


# --------------------------------------------------------------------------------------------------------------
# what names a STAC scene


def split_ref(ref: str | Path) -> tuple[str, str | None]:
    """``(href, item id)`` of ``COLLECTION.json#ITEM_ID``; the id is None when no ``#`` names one."""
    text = str(ref)
    if "#" in text:
        href, item = text.rsplit("#", 1)
        if item and "/" not in item:
            return href, item
    return text, None


def is_stac(ref: str | Path) -> bool:
    """True for what names a STAC Item or ItemCollection: a ``*.json`` / ``*.geojson`` file or URL (``#ITEM_ID``
    may follow), or a STAC API item URL (``.../items/ID``). Band-stack manifests (``*.bands.json``) are not."""
    href, _ = split_ref(ref)
    path = href.split("?", 1)[0].rstrip("/").lower()
    if path.endswith(".bands.json"):
        return False
    if path.endswith(STAC_SUFFIXES):
        return True
    return bool(_URL.match(href)) and "/items/" in path and "." not in path.rsplit("/", 1)[-1]


def stac_stem(ref: str | Path) -> str:
    """The name outputs take: the item id of ``x.json#ID``, else the file's or URL's last part without suffix."""
    href, item = split_ref(ref)
    if item is not None:
        return item
    name = href.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in STAC_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def stac_refs(ref: str | Path) -> list[str]:
    """One scene per item: ``REF#ITEM_ID`` for each item of the Item or ItemCollection at ``ref`` (a ref that
    already names its item is returned as it is)."""
    href, item = split_ref(ref)
    if item is not None:
        return [str(ref)]
    return [f"{href}#{it.id}" for it in read_items(href)[1]]


# --------------------------------------------------------------------------------------------------------------
# reading items


def _absolute(href: str) -> str:
    return href if _URL.match(href) else str(Path(href).resolve())


def read_items(href: str) -> tuple[str, list[Any]]:
    """``(absolute href, [pystac.Item, ...])`` of the Item or ItemCollection at ``href`` (file or URL)."""
    try:
        import pystac
    except ImportError:
        raise CdkdValueError("STAC items need the pystac package: pip install pystac") from None
    where = _absolute(href)
    if not _URL.match(where) and not Path(where).is_file():
        raise CdkdIOError(f"{href}: no such file")
    try:
        data = pystac.StacIO.default().read_json(where)
    except Exception as e:  # pystac wraps HTTP failures in a bare Exception; JSON errors are ValueErrors
        reason = (str(e.__cause__ or e).strip() or type(e).__name__).splitlines()[0]
        raise CdkdIOError(f"{href}: cannot read the STAC item ({reason})") from None
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "Feature":
            return where, [pystac.Item.from_dict(data, href=where)]
        if kind == "FeatureCollection":
            return where, list(pystac.ItemCollection.from_dict(data).items)
    except (KeyError, TypeError, ValueError, pystac.STACError) as e:
        raise DataError(f"{href}: not a valid STAC item ({type(e).__name__}: {e})") from None
    raise DataError(
        f"{href}: not a STAC Item or ItemCollection (GeoJSON type {kind!r}; expected 'Feature' or 'FeatureCollection')"
    )


def read_item(ref: str | Path) -> tuple[str, Any]:
    """``(absolute href, pystac.Item)`` that ``ref`` names: the one item of an Item file, or ``#ITEM_ID`` of a
    collection."""
    href, wanted = split_ref(ref)
    where, items = read_items(href)
    if wanted is not None:
        found = [it for it in items if it.id == wanted]
        if not found:
            listed = ", ".join(it.id for it in items[:8]) + (" ..." if len(items) > 8 else "")
            raise DataError(f"{href}: no item {wanted!r} (items: {listed or 'none'})")
        return where, found[0]
    if len(items) != 1:
        raise DataError(
            f"{href}: holds {len(items)} items; name one as {href}#ITEM_ID, or segment them all with --out-dir"
        )
    return where, items[0]


# --------------------------------------------------------------------------------------------------------------
# assets and their bands


@dataclass(frozen=True)
class StacBand:
    """One band as STAC describes it; wavelengths in nm."""

    name: str = ""
    common_name: str = ""
    center_nm: float | None = None
    width_nm: float | None = None

    def centre(self) -> float | None:
        """The centre wavelength: given, else a sensor preset's for the band's name (``B04``)."""
        if self.center_nm is not None:
            return self.center_nm
        preset = band_set_from_names([self.name]) if self.name else None
        return preset.bands[0].center_nm if preset is not None else None

    def common_range(self) -> tuple[float, float] | None:
        from pystac.extensions.eo import Band as EOBand

        r = EOBand.band_range(self.common_name) if self.common_name else None
        return None if r is None else (1000.0 * r[0], 1000.0 * r[1])

    def distance(self, band: Band) -> float | None:
        """How far this band is from the model's ``band`` (nm), or None when it does not measure it."""
        centre = self.centre()
        if centre is not None:
            d = abs(centre - band.center_nm)
            return d if d <= tolerance_nm(band) else None
        r = self.common_range()
        if r is not None and r[0] <= band.center_nm <= r[1]:
            return abs((r[0] + r[1]) / 2 - band.center_nm)
        return None

    def as_band(self) -> Band | None:
        centre = self.centre()
        return None if centre is None else Band(centre, self.width_nm, self.name or self.common_name)


@dataclass(frozen=True)
class StacAsset:
    key: str
    href: str  # absolute: a local path or a URL
    bands: tuple[StacBand, ...]
    media_type: str = ""

    @property
    def is_geotiff(self) -> bool:
        return self.media_type.split(";")[0].strip().lower() in _GEOTIFF


def _um(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return 1000.0 * v if v > 0 else None


def _band(entry: Any) -> StacBand:
    """A band of ``eo:bands`` (STAC 1.0: ``center_wavelength`` in um) or of ``bands`` (1.1: ``eo:`` prefixed)."""
    if not isinstance(entry, dict):
        return StacBand()

    def get(key: str) -> Any:
        return entry.get(key, entry.get(f"eo:{key}"))

    return StacBand(
        str(entry.get("name") or ""),
        str(get("common_name") or ""),
        _um(get("center_wavelength")),
        _um(get("full_width_half_max")),
    )


def _asset_bands(fields: dict[str, Any], item_bands: list[Any]) -> tuple[StacBand, ...]:
    entries = fields.get("eo:bands", fields.get("bands"))
    if not isinstance(entries, list):
        return ()
    # STAC 0.9 assets listed indexes into the item's eo:bands
    return tuple(_band(item_bands[e] if isinstance(e, int) and 0 <= e < len(item_bands) else e) for e in entries)


def item_assets(item: Any, base: str) -> list[StacAsset]:
    """Every asset of ``item`` with its absolute href (relative ones resolved against ``base``) and bands."""
    from pystac.utils import make_absolute_href

    item_bands = item.properties.get("eo:bands") or []
    out = []
    for key, asset in item.assets.items():
        href = asset.href if _URL.match(asset.href) else make_absolute_href(asset.href, base)
        out.append(StacAsset(key, href, _asset_bands(asset.extra_fields, item_bands), asset.media_type or ""))
    return out


def _common_name(band: Band) -> str:
    """The widest EO common name whose range holds the band's centre (``pan`` left out): ``nir`` for 842 nm."""
    from pystac.extensions.eo import Band as EOBand

    names = (
        "coastal",
        "blue",
        "green",
        "red",
        "yellow",
        "rededge",
        "nir",
        "nir08",
        "nir09",
        "cirrus",
        "swir16",
        "swir22",
        "lwir",
        "lwir11",
        "lwir12",
    )
    fits = [
        (hi - lo, n)
        for n in names
        if (r := EOBand.band_range(n)) and (lo := 1000 * r[0]) <= band.center_nm <= (hi := 1000 * r[1])
    ]
    return max(fits)[1] if fits else ""


def _band_label(band: Band) -> str:
    """``B08 (nir, 842 nm)``, or ``443 nm (coastal)`` for a band without a name: how an error names a model band."""
    common, nm = _common_name(band), f"{band.center_nm:g} nm"
    if band.name:
        return f"{band.name} ({common + ', ' if common else ''}{nm})"
    return f"{nm} ({common})" if common else nm


def choose_assets(
    label: str, assets: Sequence[StacAsset], model: BandSet | None, in_chans: int | None, keys: Sequence[str] | None
) -> list[StacAsset]:
    """The assets that make the scene, in the model's channel order (see the module docstring).

    Raises DataError naming the item (``label``) and what is missing: an asset key, or the model bands that no
    asset holds.
    """
    listed = ", ".join(a.key for a in assets) or "none"
    if keys is not None:
        by_key = {a.key: a for a in assets}
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise DataError(f"{label}: no asset {', '.join(repr(k) for k in missing)}; assets: {listed}")
        return [by_key[k] for k in keys]
    if model is None:
        if in_chans not in (None, 3):
            raise DataError(
                f"{label}: the model does not say which bands its {in_chans} channels are; choose "
                f"{in_chans} assets with --assets a,b,... (assets: {listed})"
            )
        model = BandSet(
            tuple(Band(b.center_nm, b.width_nm, c) for b, c in zip(TEACHER_RGB.bands, ("red", "green", "blue")))
        )
    # single-band assets are the candidates: a band stack is made of single-band files
    candidates = [(i, a) for i, a in enumerate(assets) if len(a.bands) == 1]
    pairs = sorted(
        (d, not a.is_geotiff, i, m)
        for m, band in enumerate(model.bands)
        for i, a in candidates
        if (d := a.bands[0].distance(band)) is not None
    )
    chosen: list[StacAsset | None] = [None] * len(model)
    used: set[int] = set()
    for _, _, i, m in pairs:
        if chosen[m] is None and i not in used:
            chosen[m], used = assets[i], used | {i}
    missing = [_band_label(b) for b, a in zip(model.bands, chosen) if a is None]
    if missing:
        s = "s" if len(missing) > 1 else ""
        raise DataError(
            f"{label}: no asset for band{s} {', '.join(missing)}; assets: {listed} (choose them with --assets a,b,...)"
        )
    return chosen  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# the scene


def gdal_path(href: str) -> str:
    """What GDAL opens for an asset href: ``/vsicurl/`` for http(s) (range requests), ``/vsis3/``, ``/vsigs/``."""
    low = href.lower()
    if low.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    for scheme, vsi in (("s3://", "/vsis3/"), ("gs://", "/vsigs/"), ("file://", "")):
        if low.startswith(scheme):
            return vsi + href[len(scheme) :]
    return href


def _proj(item: Any, asset_key: str) -> tuple[str | None, tuple[float, ...] | None]:
    """The CRS (``EPSG:n`` or WKT) and affine ``proj:transform`` the projection extension gives an asset (asset
    fields first, then the item's)."""
    fields = [item.assets[asset_key].extra_fields, item.properties]
    crs = transform = None
    for f in fields:
        if crs is None:
            code = f.get("proj:code") or (f"EPSG:{f['proj:epsg']}" if f.get("proj:epsg") else None)
            crs = code or f.get("proj:wkt2")
        if transform is None and isinstance(f.get("proj:transform"), list) and len(f["proj:transform"]) >= 6:
            transform = tuple(float(v) for v in f["proj:transform"][:6])
    return crs, transform


@dataclass(frozen=True)
class StacScene:
    """One item's chosen assets, ready to open as one raster (``open``)."""

    ref: str  # as given: FILE_OR_URL[#ITEM_ID]
    href: str  # the item's JSON, absolute
    item_id: str
    assets: tuple[StacAsset, ...]  # in band order
    crs: str | None = None  # the projection extension's, for assets that carry none
    transform: tuple[float, ...] | None = None  # a, b, c, d, e, f (proj:transform) of the first asset

    @property
    def label(self) -> str:
        return f"item {self.item_id}"

    def identity(self) -> dict[str, Any]:
        """What a resumed run must find unchanged: the item's location and id, and every asset's href."""
        out: dict[str, Any] = {
            "scene": f"{self.href}#{self.item_id}",
            "item": self.item_id,
            "assets": {a.key: a.href for a in self.assets},
        }
        if not _URL.match(self.href):
            st = Path(self.href).stat()
            out.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return out

    def describe(self) -> str:
        return f"{self.label}: reads asset(s) {', '.join(a.key for a in self.assets)}"

    def band_set(self) -> BandSet | None:
        """The stacked bands as STAC describes them, or None when an asset gives no wavelength."""
        bands = [a.bands[0].as_band() if len(a.bands) == 1 else None for a in self.assets]
        return BandSet(tuple(bands)) if all(b is not None for b in bands) else None  # type: ignore[arg-type]

    def vrt_xml(self) -> str:
        """The band stack of the assets (``BandStack``: an in-memory VRT on the finest asset's grid)."""
        from cdkd.data.bandstack import BandStack

        stack = BandStack(tuple(gdal_path(a.href) for a in self.assets), self.label, spectral=self.band_set())
        try:
            with self._env():
                xml = stack.vrt_xml()
        except CdkdError as e:  # named by the item and the asset key, not by GDAL's path
            message = str(e)
            for a in self.assets:
                message = message.replace(gdal_path(a.href), f"asset {a.key} ({a.href})")
            raise type(e)(f"{self.label}: {message}") from None
        return self._placed(xml)

    def _placed(self, xml: str) -> str:
        """``xml`` with the projection extension's CRS (and transform) where the asset files carry none."""
        root = ET.fromstring(xml)
        if root.find("SRS") is not None:
            return xml
        if self.crs is None:
            raise DataError(
                f"{self.label}: its assets carry no CRS and the item gives no proj:code or proj:epsg; "
                "the output could not be placed on a map"
            )
        from rasterio.crs import CRS
        from rasterio.errors import CRSError

        srs = ET.Element("SRS")
        try:
            srs.text = CRS.from_user_input(self.crs).to_wkt()
        except CRSError as err:
            raise DataError(
                f"{self.label}: its projection extension's CRS {self.crs!r} is not one GDAL knows ({err})"
            ) from None
        root.insert(0, srs)
        geo = root.find("GeoTransform")
        if geo is not None and tuple(float(v) for v in cast(str, geo.text).split(",")) == _IDENTITY:
            sizes = {(r.get("xSize"), r.get("ySize")) for r in root.iter("SrcRect")}
            if self.transform is None or len(sizes) > 1:
                raise DataError(
                    f"{self.label}: its assets carry no georeferencing, and "
                    + (
                        "the item gives no proj:transform"
                        if self.transform is None
                        else "they differ in size, so they cannot be placed on one grid"
                    )
                )
            a, b, c, d, e, f = self.transform
            geo.text = ", ".join(repr(v) for v in (c, a, b, f, d, e))
        return ET.tostring(root, encoding="unicode")

    def _env(self) -> Any:
        """GDAL's settings for opening the assets: GDAL would list the folder of every remote file to look for
        sidecars (.aux.xml, .ovr: one more request per asset, a bucket listing on S3); a STAC item names its files."""
        import rasterio

        remote = any(_URL.match(a.href) for a in self.assets)
        return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR") if remote else contextlib.nullcontext()

    def open(self) -> Any:
        """The stacked assets as one rasterio dataset."""
        import rasterio
        from rasterio.errors import RasterioError

        from cdkd.data.gdal import gdal_reason

        xml = self.vrt_xml()
        try:
            with self._env():
                return rasterio.open(xml)
        except (RasterioError, OSError) as e:
            raise CdkdIOError(
                f"{self.label} ({self.ref}): its assets cannot be read as one raster ({gdal_reason(e)})"
            ) from None


def stac_scene(
    ref: str | Path, spectral: BandSet | None = None, in_chans: int | None = None, assets: Sequence[str] | None = None
) -> StacScene:
    """The scene a STAC ``ref`` stands for with a model whose bands are ``spectral`` (``NormStats.spectral``;
    None: unknown) and that takes ``in_chans`` channels, or made of the asset keys ``assets``."""
    href, item = read_item(ref)
    label = f"item {item.id}"
    chosen = choose_assets(label, item_assets(item, item.get_self_href() or href), spectral, in_chans, assets)
    crs, transform = _proj(item, chosen[0].key)
    return StacScene(str(ref), href, item.id, tuple(chosen), crs, transform)


def open_stac(
    ref: str | Path, spectral: BandSet | None = None, in_chans: int | None = None, assets: Sequence[str] | None = None
) -> Any:
    """``stac_scene(...).open()``: with no model, an item opens as its red, green and blue assets."""
    return stac_scene(ref, spectral, in_chans, assets).open()
