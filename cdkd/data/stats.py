"""Dataset-level per-band normalisation statistics.

Satellite data comes as uint8, uint16 (often with only 10-12 significant bits) or float reflectance, so fixed
ImageNet constants would be wrong. The statistics are estimated once from random windows over the files,
stored with the model, and reused for every tile, so training and inference see the same normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cdkd.data.bands import BandSet
from cdkd.data.files import RasterInfo, check_bands, read_window
from cdkd.errors import CdkdValueError, DataError

STD_EPS = 1e-6  # floor for std: a constant band normalises to 0 instead of dividing by zero


@dataclass(frozen=True)
class NormStats:
    """Per-band mean and standard deviation in the file's pixel units, for ``bands`` (1-based).

    ``dtype`` is the pixel type the statistics were computed on (e.g. "uint8"), kept so that callers can refuse
    to apply statistics from uint16 training data to uint8 imagery. ``spectral`` (optional) says what each of
    these bands measures (``cdkd.data.bands.BandSet``: centre wavelength, width, name): stored with the
    statistics, it travels wherever they do (student.pt, segmenter.pt, checkpoints, ONNX metadata, engine
    sidecars), and scenes are checked against it.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    bands: tuple[int, ...]
    dtype: str
    spectral: BandSet | None = None

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        std = tuple(max(float(s), STD_EPS) for s in self.std)
        bands = check_bands(self.bands)
        if not (len(mean) == len(std) == len(bands)):
            raise CdkdValueError(
                f"normalisation statistics disagree: {len(mean)} means, {len(std)} stds, {len(bands)} bands"
            )
        if self.spectral is not None and len(self.spectral) != len(bands):
            raise CdkdValueError(
                f"normalisation statistics for {len(bands)} bands carry wavelengths for {len(self.spectral)}"
            )
        if not all(math.isfinite(v) for v in mean + std):
            raise CdkdValueError(f"normalisation statistics are not finite: mean={mean} std={std}")
        # frozen dataclass: normalise the fields once, here
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "dtype", str(self.dtype))

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and strings (safe for YAML and ``torch.save(weights_only=True)``); ``spectral`` only when
        known, so files written without it read the same."""
        d: dict[str, Any] = {
            "mean": list(self.mean),
            "std": list(self.std),
            "bands": list(self.bands),
            "dtype": self.dtype,
        }
        if self.spectral is not None:
            d["spectral"] = self.spectral.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormStats:
        """Inverse of ``to_dict``; a missing key is a ``CdkdValueError``."""
        missing = [k for k in ("mean", "std", "bands", "dtype") if k not in d]
        if missing:
            raise CdkdValueError(f"normalisation statistics lack {', '.join(missing)}: {dict(d)!r}")
        spectral = BandSet.from_dict(d["spectral"]) if d.get("spectral") else None
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            bands=tuple(d["bands"]),
            dtype=str(d["dtype"]),
            spectral=spectral,
        )

    def normalize(self, pixels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """(C, H, W) pixels of any dtype -> float32 ``(x - mean) / std`` per band, C = len(bands).

        With (H, W) bool ``valid``, invalid pixels become 0, the band mean: nodata values (0, -9999, NaN) would be
        far outliers to a network, and every stage (training, export checks, scenes) must treat them alike. They
        are assigned, not multiplied by the mask: a NaN under the mask would survive NaN * 0.
        """
        if pixels.ndim != 3 or pixels.shape[0] != len(self.bands):
            raise CdkdValueError(
                f"expected pixels of shape ({len(self.bands)}, H, W) for bands {list(self.bands)}, "
                f"got {tuple(pixels.shape)}"
            )
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        x = pixels.astype(np.float32)
        x -= mean  # in place: the same two roundings as (x - mean) / std, without two temporaries
        x /= std
        if valid is not None and not valid.all():
            x[:, ~valid] = 0.0
        return x


def _window_moments(pixels: np.ndarray, valid: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, per-band mean, per-band sum of squared deviations) over the valid pixels, in float64."""
    x = pixels[:, valid].astype(np.float64)  # (C, N)
    n = x.shape[1]
    if n == 0:
        return 0, np.zeros(x.shape[0]), np.zeros(x.shape[0])
    mean = x.mean(axis=1)
    m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
    return n, mean, m2


def _merge(
    a: tuple[int, np.ndarray, np.ndarray], b: tuple[int, np.ndarray, np.ndarray]
) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise update: exact, and free of the cancellation of sum-of-squares on uint16 data."""
    na, ma, m2a = a
    nb, mb, m2b = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


def compute_stats(
    rasters: Sequence[RasterInfo],
    bands: Sequence[int],
    n_samples: int = 64,
    window: int = 512,
    seed: int = 0,
    read: Callable[..., tuple[np.ndarray, np.ndarray]] = read_window,
) -> NormStats:
    """Per-band mean/std over the valid pixels of up to ``n_samples`` random windows.

    Args:
        rasters: files from ``find_rasters``.
        bands: 1-based band indexes.
        n_samples: number of windows; they cycle through a seeded permutation of the files, so every file is
            visited before any is visited twice.
        window: window side in pixels, clipped to each image.
        seed: makes the choice of files and windows reproducible.
        read: ``read_window``'s stand-in for rasters that are open already (a scene built from a STAC item).

    Returns:
        ``NormStats`` (population std, pixel units) with ``dtype`` of the first raster.

    Raises:
        DataError: no raster, or no valid pixel in any window. CdkdIOError: a window cannot be read.
        CdkdValueError: bad band index, ``n_samples`` or ``window`` < 1.
    """
    indexes = check_bands(bands)
    if not rasters:
        raise DataError("cannot compute normalisation statistics: no image file given")
    if n_samples < 1 or window < 1:
        raise CdkdValueError(f"n_samples and window must be at least 1, got {n_samples} and {window}")

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rasters))
    acc: tuple[int, np.ndarray, np.ndarray] = (0, np.zeros(len(indexes)), np.zeros(len(indexes)))
    for s in range(n_samples):
        info = rasters[int(order[s % len(rasters)])]
        h, w = min(window, info.height), min(window, info.width)
        row = int(rng.integers(0, info.height - h + 1))
        col = int(rng.integers(0, info.width - w + 1))
        pixels, valid = read(info.path, indexes, row, col, h, w)
        acc = _merge(acc, _window_moments(pixels, valid))

    n, mean, m2 = acc
    if n == 0:
        raise DataError(
            f"cannot compute normalisation statistics: no valid pixel in {n_samples} windows over "
            f"{len(rasters)} file(s) (first: {rasters[0].path}); every pixel is nodata or masked"
        )
    std = np.sqrt(m2 / n)
    return NormStats(
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), bands=indexes, dtype=rasters[0].dtype
    )


def with_band_metadata(stats: NormStats, rasters: Sequence[RasterInfo], wavelengths: str | None = None) -> NormStats:
    """``stats`` with ``spectral`` set to what its bands measure: ``wavelengths`` (a sensor preset or centres in
    nm, ``cdkd.data.bands.parse_wavelengths``) when given, else the band metadata every one of ``rasters`` carries
    (None when they carry none). Files that disagree are a DataError."""
    from cdkd.data.files import resolve_band_set

    return replace(stats, spectral=resolve_band_set([r.path for r in rasters], stats.bands, wavelengths))
