"""Which bands of the data a distillation reads, chosen by what they measure rather than by position.

The teacher is SAM, an RGB model. Files that carry wavelengths (band tags, GDAL's IMAGERY domain, ENVI headers,
known band names, or ``--wavelengths``) say which of their bands are red, green and blue, so a recipe that feeds
the teacher the student's input (mask-cdkd, rs4d) reads those, in R, G, B order: bands 4, 3, 2 of Sentinel-2,
not B01-B03 (443, 490, 560 nm). A recipe whose student reads every band (hyperkd) reads every band of the files.
``--bands`` and ``--in-chans`` always win; the choice is said in one line.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from cdkd.config import DistillConfig
from cdkd.data.bands import BandSet
from cdkd.data.files import RasterInfo, resolve_band_set
from cdkd.data.sensors import TEACHER_RGB
from cdkd.errors import DataError

RGB_INPUTS = 3  # SAM's input channels


def choose_bands(
    cfg: DistillConfig, rasters: Sequence[RasterInfo], every_band: bool, log: Callable[[str], None]
) -> DistillConfig:
    """``cfg`` with ``data.bands`` and ``student.in_chans`` settled for ``rasters`` (see the module docstring);
    ``every_band``: the recipe's student reads all bands of the data."""
    given, in_chans = cfg.data.bands, cfg.student.in_chans
    if given is not None:
        return _settled(cfg, tuple(given), in_chans or len(given))
    counts = sorted({r.count for r in rasters})
    if every_band:
        if in_chans is None and len(counts) > 1:
            raise DataError(
                f"{cfg.data.root}: the files have {' or '.join(map(str, counts))} bands, and the student "
                "reads every band: put each sensor in its own folder, or choose --bands"
            )
        n = in_chans or counts[0]
        what = "every band" if n == counts[0] else f"of {counts[0]}, as --in-chans {n} asks"
        log(f"the student reads bands 1-{n} of the data ({what}; --bands or --in-chans to choose)")
        return _settled(cfg, tuple(range(1, n + 1)), n)
    n = in_chans or RGB_INPUTS
    default = tuple(range(1, n + 1))
    if n != RGB_INPUTS or counts[0] < RGB_INPUTS:
        return _settled(cfg, default, n)
    measured = resolve_band_set([r.path for r in rasters], tuple(range(1, counts[0] + 1)), cfg.data.wavelengths)
    picked = rgb_bands(measured) if measured is not None else None
    if picked is None:
        if measured is not None:
            log(
                f"the files' bands ({measured.describe(6)}) hold no red, green and blue band; the teacher reads "
                f"bands {','.join(map(str, default))} (--bands to choose)"
            )
        return _settled(cfg, default, n)
    assert measured is not None  # picked is only found in a measured band set
    if picked != default:
        chosen = ", ".join(measured.bands[i - 1].label() for i in picked)
        log(
            f"the teacher reads bands {','.join(map(str, picked))} ({chosen}) as red, green and blue, chosen by "
            "wavelength (--bands to choose others)"
        )
    return _settled(cfg, picked, n)


def readable(rasters: Sequence[RasterInfo], bands: tuple[int, ...], root: str) -> list[RasterInfo]:
    """The ``rasters`` that have every band of ``bands``: one warning counts the others; none is a DataError."""
    keep = [r for r in rasters if r.count >= max(bands)]
    if not keep:
        counts = sorted({r.count for r in rasters})
        hint = (
            f"--bands {','.join(['1'] * len(bands))} to repeat a single band"
            if counts == [1]
            else "--bands to choose among them"
        )
        raise DataError(
            f"{root}: the files have {' or '.join(map(str, counts))} band(s) but the student reads bands "
            f"{','.join(map(str, bands))}: pass {hint}, or --in-chans to read fewer"
        )
    if len(keep) < len(rasters):
        warnings.warn(
            f"skipped {len(rasters) - len(keep)} of {len(rasters)} files in {root} that have fewer than "
            f"{max(bands)} bands",
            UserWarning,
            stacklevel=2,
        )
    return keep


def rgb_bands(measured: BandSet) -> tuple[int, ...] | None:
    """1-based bands of ``measured`` closest to the centres of SAM's red, green and blue ranges, each inside its
    range; None when a colour has no band in its range."""
    centers = np.asarray(measured.centers)
    picks = []
    for channel, (lo, hi) in zip(TEACHER_RGB.bands, TEACHER_RGB.intervals()):
        inside = np.flatnonzero((centers >= lo) & (centers <= hi))
        if inside.size == 0:
            return None
        mid = channel.center_nm
        picks.append(int(inside[np.argmin(np.abs(centers[inside] - mid))]) + 1)
    return tuple(picks) if len(set(picks)) == len(picks) else None


def _settled(cfg: DistillConfig, bands: tuple[int, ...], in_chans: int) -> DistillConfig:
    return replace(cfg, data=replace(cfg.data, bands=bands), student=replace(cfg.student, in_chans=in_chans))
