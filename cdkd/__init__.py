"""cdkd: distil SAM into a small land-cover model (Mask-CDKD) and map satellite scenes with it.

Every capability is importable from the library; the ``cdkd`` command line is a thin layer over it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cdkd")  # one source: pyproject.toml's version, as installed
except PackageNotFoundError:  # a source tree on sys.path that pip never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    """``cdkd.predict`` on first use: ``import cdkd`` stays light (no torch, no dask) for raster and vector work."""
    if name == "predict":
        from cdkd.scene.predict import predict

        return predict
    raise AttributeError(f"module 'cdkd' has no attribute {name!r}")
