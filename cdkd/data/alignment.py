"""Spectral-range channel alignment (HyperKD): each teacher channel formed from the student's bands in its range.

HyperKD (Matin et al., DSAA 2025, arXiv 2508.09453) feeds a teacher trained on a few bands from a sensor with many
by taking, for every teacher band, the student sensor's bands that fall inside its spectral range. Here the
weight of student band i in teacher channel t is the length of the overlap of the two spectral intervals,
normalised over i: the teacher channel is the mean of the student's spectrum over the channel's range, with the
spectrum read as piecewise constant over each band (``BandSet.intervals``). A broad band that straddles the
range contributes by the part inside it. Weights are non-negative and sum to 1 per teacher channel; a teacher
channel with no band in range is an error naming the nearest band.

``patch_embed_from_teacher`` carries the same mapping into the student's first layer: a student whose patch
embedding is W_s[:, c] = sum_t A[t, c] W_t[:, t] embeds a C-band tile exactly as the teacher embeds the aligned
RGB tile (projected onto the teacher filters' principal directions when the widths differ).
"""

from __future__ import annotations

import numpy as np

from cdkd.data.bands import BandSet
from cdkd.errors import CdkdValueError

__all__ = ["alignment_weights", "format_alignment", "patch_embed_from_teacher"]


def alignment_weights(student: BandSet, teacher: BandSet) -> np.ndarray:
    """(T, C) float64 weights: row t forms teacher channel t from the C student bands (rows sum to 1).

    Raises CdkdValueError when a teacher channel's range holds no student band.
    """
    s = student.intervals()
    t = teacher.intervals()
    overlap = np.clip(np.minimum(t[:, None, 1], s[None, :, 1]) - np.maximum(t[:, None, 0], s[None, :, 0]), 0, None)
    sums = overlap.sum(axis=1, keepdims=True)
    empty = np.flatnonzero(sums[:, 0] <= 0)
    if empty.size:
        k = int(empty[0])
        lo, hi = t[k]
        centre = (lo + hi) / 2
        nearest = student.bands[int(np.argmin(np.abs(np.asarray(student.centers) - centre)))]
        raise CdkdValueError(
            f"teacher channel {teacher.bands[k].name or k + 1} ({lo:g}-{hi:g} nm) has no student "
            f"band in its range (nearest: {nearest.label()}); the student's bands are "
            f"{student.describe(8)}. Give wavelengths that cover it or other teacher ranges "
            "(hyperkd.teacher_ranges)"
        )
    return overlap / sums


def format_alignment(weights: np.ndarray, student: BandSet, teacher: BandSet, min_weight: float = 0.005) -> str:
    """One line per teacher channel: ``R (630-690 nm) <- 1.000 B04 (665 nm)``, weights >= ``min_weight`` shown,
    largest first (a 224-band row shows its count and range instead of every band)."""
    lines = []
    t_int = teacher.intervals()
    for k, row in enumerate(weights):
        used = [i for i in np.argsort(-row, kind="stable") if row[i] >= min_weight]
        head = f"{teacher.bands[k].name or k + 1} ({t_int[k, 0]:g}-{t_int[k, 1]:g} nm) <- "
        if len(used) > 6:
            c = np.asarray(student.centers)[used]
            body = (
                f"{len(used)} bands {c.min():.0f}-{c.max():.0f} nm, weights {row[used].min():.3f}-{row[used].max():.3f}"
            )
        else:
            body = " + ".join(f"{row[i]:.3f} {student.bands[i].label()}" for i in used)
        lines.append(head + body)
    return "\n".join(lines)


def patch_embed_from_teacher(
    teacher_w: np.ndarray, weights: np.ndarray, out_dim: int, base: np.ndarray | None = None
) -> np.ndarray:
    """Student patch-embedding filters (out_dim, C, p, p) from the teacher's (D_t, T, p, p) through ``weights``
    (T, C).

    The mapped filters M[:, c] = sum_t weights[t, c] teacher_w[:, t] embed a C-band patch as the teacher embeds
    its aligned T-band patch. When out_dim != D_t the student keeps the top principal directions of M (its SVD's
    leading rows of S V^T), so its embedding is the teacher's projected onto the directions that carry most of
    it. Rows beyond rank(M), and the filters of bands no teacher channel uses, come from ``base`` (the student's
    own initialisation) when given, else zeros: a band the teacher never saw must still be able to learn.
    """
    d_t, n_t, p, q = teacher_w.shape
    if weights.shape[0] != n_t:
        raise CdkdValueError(f"alignment has {weights.shape[0]} teacher channels, the teacher's patch embedding {n_t}")
    c = weights.shape[1]
    mapped = np.einsum("dtpq,tc->dcpq", teacher_w.astype(np.float64), weights)  # (D_t, C, p, p)
    if out_dim == d_t:
        rows = mapped.reshape(d_t, -1)
    else:
        u, s, vt = np.linalg.svd(mapped.reshape(d_t, -1), full_matrices=False)
        rows = (s[:, None] * vt)[:out_dim]
    out = np.zeros((out_dim, c * p * q)) if base is None else base.astype(np.float64).reshape(out_dim, -1).copy()
    k = rows.shape[0]
    unused = weights.sum(axis=0) <= 0  # bands outside every teacher range keep the student's own filters
    keep = np.repeat(~unused, p * q)  # (C * p * q,) in the flattened (c, p, q) order
    out[:k, keep] = rows[:, keep]
    return out.reshape(out_dim, c, p, q)
