"""Parity of two runtimes on the same tiles: does the exported model predict what the PyTorch model predicts?

The measure that matters for a land-cover map is the class of each pixel, so the check is the fraction of
pixels whose argmax agrees; max |delta logit| is reported beside it to show how close the numbers are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdkd.errors import CdkdError, CdkdValueError
from cdkd.inference.runtimes import Runtime

MIN_AGREEMENT = 0.999  # fraction of pixels; float32 ONNX vs PyTorch normally agree on every pixel


class ParityError(CdkdError):
    """An exported model does not predict what the PyTorch model predicts."""


@dataclass(frozen=True)
class ParityResult:
    """Agreement of a candidate runtime with a reference runtime on ``tiles`` tiles.

    ``agreement``: fraction of pixels with the same argmax class. ``max_abs_diff``/``mean_abs_diff``: over all
    logits. ``source``: where the tiles came from (a folder, or "synthetic"); ``files``: the images read.
    """

    reference: str
    candidate: str
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    tiles: int
    source: str
    synthetic: bool
    files: tuple[str, ...]
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def summary(self) -> str:
        """One line, e.g. ``argmax agreement 100.000% on 8 real tiles, max |delta logit| 2.1e-06``."""
        kind = "synthetic" if self.synthetic else "real"
        return (
            f"{self.candidate} vs {self.reference}: argmax agreement {100 * self.agreement:.3f}% on "
            f"{self.tiles} {kind} tiles, max |delta logit| {self.max_abs_diff:.2g}"
        )


def compare(
    reference: Runtime,
    candidate: Runtime,
    tiles: np.ndarray,
    *,
    chunk: int = 1,
    source: str = "synthetic",
    files: tuple[str, ...] = (),
    min_agreement: float = MIN_AGREEMENT,
) -> ParityResult:
    """Run (N, C, T, T) normalised ``tiles`` through both runtimes, ``chunk`` tiles at a time (memory: a 1024 px
    ViT tile needs GBs on the CPU), and measure how far ``candidate`` is from ``reference``. Never raises on a
    mismatch: ``ParityResult.passed`` says whether it is within ``min_agreement``."""
    if not 0.0 <= min_agreement <= 1.0:
        raise CdkdValueError(f"min_agreement must be a fraction in [0, 1], got {min_agreement}")
    same = total = 0
    max_diff = sum_diff = 0.0
    count = 0
    for start in range(0, len(tiles), max(1, chunk)):
        batch = tiles[start : start + max(1, chunk)]
        ref, out = reference(batch), candidate(batch)
        diff = np.nan_to_num(np.abs(ref.astype(np.float64) - out), nan=np.inf)  # a NaN logit is the worst error
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        count += diff.size
        same += int((ref.argmax(1) == out.argmax(1)).sum())
        total += ref.shape[0] * ref.shape[2] * ref.shape[3]
    return ParityResult(
        reference=reference.name,
        candidate=candidate.name,
        agreement=same / total,
        max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / count,
        tiles=len(tiles),
        source=source,
        synthetic=source == "synthetic",
        files=tuple(files),
        min_agreement=min_agreement,
    )
