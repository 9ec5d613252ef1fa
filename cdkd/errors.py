"""Errors raised by cdkd.

A small hierarchy in the style of rasterio's ``errors.py``: one root so callers (the CLI above all) can catch
everything cdkd raises on bad input, and mixins so that an I/O problem is still an ``OSError`` and a bad value
still a ``ValueError`` for code that does not know about cdkd. Messages name the file, the bad value and the fix.
"""

from __future__ import annotations


class CdkdError(Exception):
    """Root of every error cdkd raises on purpose."""


class CdkdIOError(CdkdError, OSError):
    """A file is missing, unreadable, corrupt or of the wrong kind."""


class CdkdValueError(CdkdError, ValueError):
    """A parameter or configuration value is invalid."""


class ConfigError(CdkdValueError):
    """A configuration file or override does not match the configuration schema."""


class CheckpointError(CdkdIOError):
    """A model checkpoint or artifact is missing, corrupt or incompatible."""


class DataError(CdkdIOError):
    """Training or evaluation data cannot be used (no images, wrong band count, ...)."""


class OutputExistsError(CdkdIOError):
    """An output already exists and would be overwritten."""


SAM_CHECKPOINT_HELP = (
    "official SAM checkpoints are sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth and sam_vit_h_4b8939.pth from "
    "https://github.com/facebookresearch/segment-anything#model-checkpoints (download them on a machine with "
    "internet access and pass the file with --teacher-checkpoint PATH)"
)
