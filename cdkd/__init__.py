"""cdkd: distil SAM into a small land-cover model (Mask-CDKD) and map satellite scenes with it.

Every capability is importable from the library; the ``cdkd`` command line is a thin layer over it.
"""

__version__ = "0.1.0"
