"""``curves.png``: a training run's curves, a grid of small panels drawn from its ``metrics.jsonl``.

One panel per kind of column that the run logs (``PANELS``; a column no panel names goes to "other"): the
weighted loss, the loss terms (mask-cdkd's kd, t_mae, s_mae; rs4d's l1; hyperkd's kd, pix, spec; Mask R-CNN's
``loss_*``), mask-cdkd's r with its stage changes marked, rs4d's corruption ratios, fine-tuning's pixel accuracy,
the learning rate and the throughput. Events (a stage change, rs4d's reference loss) are vertical lines in every
panel. Losses and the learning rate get a log axis where their values span enough to need one; noisy columns a
running mean over the raw values, which a long run draws as a min-max band per bin so that drawing costs the same
at 10k rows as at 1k.

matplotlib's object API on the Agg canvas: no pyplot, so no global backend is switched in the caller's process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cdkd.train.history import History
from cdkd.utils.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class Panel:
    name: str  # also the TensorBoard tag group
    title: str
    keys: tuple[str, ...] = ()  # the columns it draws, in this order
    prefix: str | None = None  # and every column starting with it
    noisy: bool = True  # draw a running mean over the raw values
    log: bool = False  # a log axis where the values span LOG_SPAN or more
    unit: bool = False  # values in [0, 1]

    def holds(self, key: str) -> bool:
        return key in self.keys or (self.prefix is not None and key.startswith(self.prefix))


PANELS = (
    Panel("loss", "loss (weighted sum)", ("loss",), log=True),
    Panel("terms", "loss terms", ("kd", "t_mae", "s_mae", "l1", "pix", "spec"), prefix="loss_", log=True),
    Panel("schedule", "r = T-MAE / S-MAE (stage changes marked)", ("ratio",), noisy=False),
    Panel("corruption", "corruption ratios", ("noise_ratio", "mask_ratio", "guided_ratio"), noisy=False, unit=True),
    Panel("accuracy", "pixel accuracy (training batches)", ("pixel_acc",), unit=True),
    Panel("lr", "learning rate", ("lr",), noisy=False, log=True),
    Panel("throughput", "throughput (images/s)", ("images_per_s",)),
)
OTHER = Panel("other", "other")
NOT_DRAWN = ("step", "time")

COLUMNS = 3  # panels per row
PANEL_PX = (420, 260)  # width, height of one panel
TITLE_PX = 50
DPI = 100
LOG_SPAN = 20.0  # max / min of the positive values from which an axis is logarithmic
MAX_POINTS = 2000  # more rows than this are drawn as BINS bins (min-max band and mean)
BINS = 1000


def panel_of(key: str) -> Panel:
    return next((p for p in PANELS if p.holds(key)), OTHER)


def layout(history: History) -> list[tuple[Panel, list[str]]]:
    """The panels ``history`` fills, each with its columns."""
    columns = [k for k in history.columns() if k not in NOT_DRAWN]
    out = []
    for panel in (*PANELS, OTHER):
        keys = [k for k in panel.keys if k in columns] + [
            k for k in columns if panel_of(k) is panel and k not in panel.keys
        ]
        if keys:
            out.append((panel, keys))
    return out


def figure_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture of ``panels`` panels (at least one: an empty run says so)."""
    cols = min(COLUMNS, max(panels, 1))
    rows = max(1, math.ceil(panels / COLUMNS))
    return cols * PANEL_PX[0], rows * PANEL_PX[1] + TITLE_PX


def draw_curves(history: History, out: str | Path, title: str) -> Path:
    """Draw ``history`` into ``out`` (PNG, or PDF/SVG by its suffix), written atomically; returns ``out``."""
    from matplotlib.figure import Figure

    out = Path(out)
    panels = layout(history)
    width, height = figure_size(len(panels))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    # Fixed margins in pixels rather than constrained layout, which would measure every tick label again and
    # take most of the drawing time.
    fig.subplots_adjust(
        left=60 / width, right=1 - 15 / width, top=1 - TITLE_PX / height, bottom=45 / height, wspace=0.28, hspace=0.42
    )
    fig.suptitle(title, fontsize=10, y=1 - 12 / height, va="top")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
    cols = min(COLUMNS, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / COLUMNS))
    marks = history.marks()
    for i, (panel, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_panel(ax, history, panel, keys)
        _draw_marks(ax, marks, label=i < cols)
        if panel.name == "schedule":
            _draw_stage_ratios(ax, history)
        if i >= len(panels) - cols:
            ax.set_xlabel("step", fontsize=8)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=(out.suffix.lstrip(".") or "png").lower(), dpi=DPI)
    return out


def _draw_panel(ax: Axes, history: History, panel: Panel, keys: list[str]) -> None:
    ax.set_title(panel.title if panel is not OTHER or len(keys) > 2 else ", ".join(keys), fontsize=9)
    ax.grid(True, alpha=0.3, linewidth=0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]  # MaxNLocator's; steps: no 1.5 on a run of a few steps
    series = [history.series(key) for key in keys]
    pos = np.concatenate([values[values > 0] for _, values in series])
    log = panel.log and len(pos) > 0 and pos.max() >= LOG_SPAN * pos.min()
    if log:
        ax.set_yscale("log", nonpositive="mask")
    ax.tick_params(which="both", labelsize=7)  # a log axis spanning less than a decade labels minor ticks too
    ax.yaxis.get_offset_text().set_fontsize(7)  # the "1e-5" above a linear learning-rate axis
    for j, (key, (steps, values)) in enumerate(zip(keys, series)):
        _draw_series(ax, steps, values, f"C{j % 10}", key, panel.noisy, log)
    if panel.unit:
        ax.set_ylim(-0.02, 1.02)
    elif panel.name == "throughput":
        ax.set_ylim(bottom=0)
    if len(keys) > 1:
        ax.legend(fontsize=7, loc="best", frameon=False)


def _draw_series(
    ax: Axes, steps: np.ndarray, values: np.ndarray, color: str, label: str, noisy: bool, log: bool
) -> None:
    if len(steps) == 0:
        return
    if len(steps) > MAX_POINTS:
        x, lo, hi, mean = _bins(steps, values, BINS)
        if noisy:  # the band shows the spread the mean hides
            if log:
                lo = np.where(lo > 0, lo, np.nan)
            ax.fill_between(x, lo, hi, color=color, alpha=0.25, linewidth=0)
        ax.plot(x, mean, color=color, linewidth=1.0, label=label)
        return
    marker = "o" if len(steps) < 3 else None  # one or two rows: a point shows where a line cannot
    if not noisy or len(steps) < 50:
        ax.plot(steps, values, color=color, linewidth=1.0, marker=marker, markersize=3, label=label)
        return
    ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.3)
    ax.plot(steps, _running_mean(values, max(5, len(values) // 50)), color=color, linewidth=1.2, label=label)


def _bins(steps: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Mean step, min, max and mean value of ``n`` consecutive bins of (nearly) equal length."""
    edges = np.linspace(0, len(steps), n + 1).astype(int)[:-1]
    counts = np.diff(np.append(edges, len(steps)))
    return (
        np.add.reduceat(steps, edges) / counts,
        np.minimum.reduceat(values, edges),
        np.maximum.reduceat(values, edges),
        np.add.reduceat(values, edges) / counts,
    )


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` rows (fewer at the start), so the curve never looks ahead."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def _draw_marks(ax: Axes, marks: list[tuple[int, str]], label: bool) -> None:
    for step, text in marks:
        ax.axvline(step, color="0.35", linestyle="--", linewidth=0.8)
        if label:
            ax.annotate(
                text,
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                fontsize=7,
                color="0.25",
                va="top",
                rotation=90,
            )


def _draw_stage_ratios(ax: Axes, history: History) -> None:
    """mask-cdkd: r at each stage change (the value that crossed the threshold)."""
    points = [(e["step"], e["ratio"]) for e in history.events if e["event"] == "stage" and "ratio" in e]
    if points:
        x, y = zip(*points)
        ax.plot(x, y, linestyle="none", marker="o", markersize=4, color="0.2")
