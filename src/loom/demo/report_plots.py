"""The demo report's plots: matplotlib figures rendered to inline SVG strings (ADR 0011).

Rules of this module:
- Only matplotlib's object API (`Figure`), never `pyplot`: pyplot keeps a global
  registry of figures (alive until closed) and a current-figure state.
- rcParams are set inside `rc_context`, so rendering a report leaves them as they were.
  They are still process-global while a plot is drawn: render one report at a time
  (from asyncio: in one worker thread, `asyncio.to_thread`).
- The SVG is deterministic (fixed hash salt, no date), so the same report gives the
  same bytes; each plot gets its own salt, so clip-path ids never clash across the SVGs
  of one page.
- Every plotted series and event marker carries an SVG id (`gid`) and text stays text
  (`svg.fonttype: none`), so a browser's DOM shows what was drawn (the e2e test reads it).
- A missing value (None, NaN, inf) is a gap in its line, never a zero.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, StrMethodFormatter

from loom.demo.model import DemoReport, Event, Sample

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

FIGURE_SIZE_IN = (10.0, 3.0)
# Fixed margins (fractions of the figure), the same for every plot, so the time axes line
# up down the page and an event's marker sits at the same x on each plot. The top margin
# holds up to three rows of event labels, the bottom one the axis label and the legend.
MARGINS = {"left": 0.075, "right": 0.915, "bottom": 0.26, "top": 0.95}
EVENT_ROWS_MAX = 3
EVENT_FONT_PT = 7.5
EVENT_ROW_PT = 10.0  # each row of event labels above the plot
EVENT_GAP_PT = 3.0  # between the plot's top edge and the first row
EVENT_COLOR = "#6b7280"
# Distinct, colour-blind-friendly (Okabe-Ito); controllers cycle through the tail.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
# A latency spread wider than this (max / min) is drawn on a log axis, so a failover's
# multi-second spike does not flatten the steady-state milliseconds into the floor.
LOG_SCALE_RATIO_MIN = 30.0

METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)

RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 9.0,
    "axes.spines.top": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#9ca3af",
    "legend.frameon": False,
    "legend.fontsize": 8.0,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Series:
    """One line: its SVG id, legend label and the values (None = missing) per sample."""

    gid: str
    label: str
    values: Sequence[float | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plot:
    """One rendered figure: `key` names it in the page (`plot-KEY`), `svg` is inline markup."""

    key: str
    title: str
    svg: str


def render_plots(report: DemoReport) -> list[Plot]:
    """The report's four plots, in page order."""
    # A saved report is read back as data: a sample or event off the time axis is skipped.
    samples = sorted((s for s in report.samples if math.isfinite(s.t_s)), key=lambda s: s.t_s)
    events = [e for e in report.events if math.isfinite(e.t_s)]
    times = [s.t_s for s in samples]
    x_max = max(
        t for t in [report.duration_s, *times, *(e.t_s for e in events), 1.0] if math.isfinite(t)
    )
    builders: list[tuple[str, str, Callable[[Figure, list[Sample], list[float]], None]]] = [
        ("throughput", "Throughput", _draw_throughput),
        ("latency", "Latency of kv requests", _draw_latency),
        ("queue", "Function queue and AIMD controller rates", _draw_queue),
        ("throttled", "Throttled kv requests", _draw_throttled),
    ]
    plots = []
    for key, title, draw in builders:
        with mpl.rc_context(RC):
            mpl.rcParams["svg.hashsalt"] = f"loom-demo-{key}"  # restored on leaving
            figure = Figure(figsize=FIGURE_SIZE_IN)
            figure.subplots_adjust(**MARGINS)
            draw(figure, samples, times)
            for axes in figure.axes:
                axes.set_xlim(0.0, x_max)
            rows = _mark_events(figure.axes[0], events, key, x_max=x_max)
            # Only the top margin follows the labels: the left and right ones stay fixed.
            label_band_in = (EVENT_GAP_PT + rows * EVENT_ROW_PT + 4.0) / 72.0
            figure.subplots_adjust(top=MARGINS["top"] - label_band_in / FIGURE_SIZE_IN[1])
            plots.append(Plot(key=key, title=title, svg=_to_svg(figure)))
    return plots


def _draw_throughput(figure: Figure, samples: list[Sample], times: list[float]) -> None:
    left = _axes(figure, "per second")
    # kv ops are tens of times the sign-ups; on one axis the sign-up curve would be flat.
    right = _right_axes(left, "kv ops per second")
    _lines(
        left,
        times,
        [
            Series(
                gid="throughput-signups",
                label="sign-ups/s",
                values=[s.signups_per_s for s in samples],
            ),
            Series(
                gid="throughput-calls",
                label="calls completed/s",
                values=[s.calls_completed_per_s for s in samples],
            ),
        ],
        color_offset=0,
    )
    _lines(
        right,
        times,
        [
            Series(
                gid="throughput-kv-ops",
                label="kv ops/s (right axis)",
                values=[s.kv_ops_per_s for s in samples],
            ),
        ],
        color_offset=2,
    )
    _legend(left, right)
    _note_if_empty(left, samples)


def _draw_latency(figure: Figure, samples: list[Sample], times: list[float]) -> None:
    axes = _axes(figure, "milliseconds")
    series = [
        Series(gid="latency-app-p50", label="app p50", values=[s.p50_ms for s in samples]),
        Series(gid="latency-app-p99", label="app p99", values=[s.p99_ms for s in samples]),
        Series(
            gid="latency-other-p99",
            label="other tenant p99",
            values=[s.other_p99_ms for s in samples],
        ),
    ]
    _lines(axes, times, series, color_offset=0)
    present = [v for line in series for v in map(_finite, line.values) if v is not None and v > 0]
    if present and max(present) / min(present) > LOG_SCALE_RATIO_MIN:
        axes.set_yscale("log")
        # 1, 2, 5, 10, 20, 50 … read as milliseconds, unlike 10^1, 10^2.
        axes.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_ylabel("milliseconds (log scale)")
    _legend(axes)
    _note_if_empty(axes, samples)


def _draw_queue(figure: Figure, samples: list[Sample], times: list[float]) -> None:
    left = _axes(figure, "calls queued or running")
    # Depth is a count, rates are calls/s: separate axes, or one would dwarf the other.
    right = _right_axes(left, "dispatch rate (calls/s)")
    _lines(
        left,
        times,
        [
            Series(
                gid="queue-depth",
                label="queue depth",
                values=[float(s.queue_depth) for s in samples],
            ),
        ],
        color_offset=0,
    )
    downstreams = sorted({name for s in samples for name in s.controller_rates})
    _lines(
        right,
        times,
        [
            Series(
                gid=f"queue-controller-{index}",
                label=f"AIMD rate {name} (right axis)",
                values=[s.controller_rates.get(name) for s in samples],
            )
            for index, name in enumerate(downstreams)
        ],
        color_offset=1,
        style="--",
    )
    _legend(left, right)
    _note_if_empty(left, samples)


def _draw_throttled(figure: Figure, samples: list[Sample], times: list[float]) -> None:
    axes = _axes(figure, "requests per second")
    values = [_finite(s.throttled_per_s) for s in samples]
    _lines(
        axes, times, [Series(gid="throttled", label="throttled/s", values=values)], color_offset=3
    )
    filled = [math.nan if v is None else v for v in values]
    axes.fill_between(times, filled, color=COLORS[3], alpha=0.15, linewidth=0)
    axes.set_ylim(bottom=0.0)
    _legend(axes)
    _note_if_empty(axes, samples)


def _axes(figure: Figure, ylabel: str) -> Axes:
    axes = figure.add_subplot()
    axes.set_xlabel("seconds since the launch started")
    axes.set_ylabel(ylabel)
    axes.yaxis.set_major_formatter(StrMethodFormatter("{x:,g}"))  # 20,000 not 20000
    return axes


def _right_axes(left: Axes, ylabel: str) -> Axes:
    """A second y axis on the right, sharing the time axis (no grid: the left one has it)."""
    right = left.twinx()
    right.grid(visible=False)
    right.set_ylabel(ylabel)
    right.yaxis.set_major_formatter(StrMethodFormatter("{x:,g}"))  # 20,000 not 20000
    return right


def _lines(
    axes: Axes, times: list[float], series: Sequence[Series], *, color_offset: int, style: str = "-"
) -> None:
    for index, line in enumerate(series):
        values = [math.nan if v is None else v for v in map(_finite, line.values)]
        (drawn,) = axes.plot(
            times,
            values,
            style,
            label=line.label,
            linewidth=1.4,
            color=COLORS[(color_offset + index) % len(COLORS)],
        )
        drawn.set_gid(line.gid)


def _legend(*axes: Axes) -> None:
    """One legend for all the axes of a figure, under the plot, where it hides no data."""
    handles: list[Line2D] = []
    labels: list[str] = []
    for each in axes:
        more_handles, more_labels = each.get_legend_handles_labels()
        handles += [h for h in more_handles if isinstance(h, Line2D)]
        labels += more_labels
    if handles:
        figure = axes[0].get_figure()
        assert figure is not None
        figure.legend(
            handles,
            labels,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=min(len(handles), 4),
        )


def _mark_events(axes: Axes, events: Sequence[Event], key: str, *, x_max: float) -> int:
    """A dashed vertical line per event, labelled above the plot (never over the data).

    Labels that would overlap go up a row, up to `EVENT_ROWS_MAX` rows; returns the
    number of rows used."""
    transform = axes.get_xaxis_transform()  # x in data (seconds), y in axes fraction
    axes_width_pt = FIGURE_SIZE_IN[0] * 72.0 * (MARGINS["right"] - MARGINS["left"])
    row_ends = [-math.inf] * EVENT_ROWS_MAX  # axes fraction where each row's last label ends
    rows = 0
    for index, event in enumerate(sorted(events, key=lambda e: e.t_s)):
        gid = f"{key}-event-{index}"
        axes.axvline(event.t_s, color=EVENT_COLOR, linestyle=(0, (4, 3)), linewidth=1.0, gid=gid)
        x = event.t_s / x_max
        # A rough width (average glyph ≈ 0.55 em) is enough to keep labels apart.
        width = len(event.label) * EVENT_FONT_PT * 0.55 / axes_width_pt
        align = "left" if x < 0.15 else ("right" if x > 0.85 else "center")
        start = {"left": x, "center": x - width / 2, "right": x - width}[align]
        row = next((r for r, end in enumerate(row_ends) if end < start), EVENT_ROWS_MAX - 1)
        row_ends[row] = max(row_ends[row], start + width + 0.01)
        rows = max(rows, row + 1)
        axes.annotate(
            event.label,
            xy=(event.t_s, 1.0),
            xycoords=transform,
            xytext=(0.0, EVENT_GAP_PT + row * EVENT_ROW_PT),
            textcoords="offset points",
            ha=align,
            va="bottom",
            fontsize=EVENT_FONT_PT,
            color="#374151",
            gid=f"{gid}-label",
        )
    return rows


def _note_if_empty(axes: Axes, samples: list[Sample]) -> None:
    if not samples:
        axes.text(
            0.5,
            0.5,
            "no samples recorded",
            transform=axes.transAxes,
            ha="center",
            va="center",
            color="#6b7280",
            gid="no-samples",
        )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _to_svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    # Inline in HTML: drop the XML prolog and DOCTYPE, keep the <svg> element itself, and
    # drop the RDF <metadata> block (it names the creator, nobody reads it in a page).
    svg = text[text.index("<svg") :]
    return METADATA.sub("", svg, count=1)
