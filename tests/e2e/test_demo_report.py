"""The demo's HTML report as a person sees it: opened in headless Chromium (Debian's).

Two views of one rendered page: the DOM Chromium built from it (`--dump-dom`), read for
the plotted series (points per line), the event markers and labels, the checks table;
and a screenshot, read for the pixels of each series' colour — proof that the lines
were painted, not only present in the markup. A missing `chromium` FAILS the test
(never skips): `make test` installs it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from loom.demo.model import DemoReport
from loom.demo.report import write_html
from loom.demo.report_plots import COLORS

from .demo_report_sample import chromium, sample_report

PLOTS = ("throughput", "latency", "queue", "throttled")
SERIES = {
    "throughput": ("throughput-signups", "throughput-calls", "throughput-kv-ops"),
    "latency": ("latency-app-p50", "latency-app-p99", "latency-other-p99"),
    "queue": ("queue-depth", "queue-controller-0", "queue-controller-1"),
    "throttled": ("throttled",),
}
# Lines that move every second keep nearly every point; matplotlib's path simplification
# may merge a flat stretch (the queue empty, the controllers' straight climbs).
POINTS_MIN = {"queue-depth": 20, "queue-controller-0": 8, "queue-controller-1": 8, "throttled": 20}
WIGGLY_POINTS_MIN = 200  # of the sample report's 300 seconds
WINDOW = "--window-size=1080,2900"  # wide as a laptop window, tall enough for the page


@dataclass
class Dom:
    """What the test reads from Chromium's DOM: plotted paths, texts, the checks table."""

    paths: dict[str, str] = field(default_factory=dict)  # series or marker gid → path `d`
    texts: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # by plot
    figures: list[str] = field(default_factory=list)
    check_rows: list[list[str]] = field(default_factory=list)
    banner_class: str = ""
    banner_text: str = ""


class DomReader(HTMLParser):
    """Reads the few things above out of the serialized DOM (flat: no tree needed)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.dom = Dom()
        self._figure = ""
        self._group = ""  # id of the last <g id=…>, whose first <path> is its line
        self._in = ""  # "text" | "td" | "banner" while collecting character data
        self._row: list[str] | None = None
        self._in_checks = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "figure":
            self._figure = a.get("id", "").removeprefix("plot-")
            self.dom.figures.append(self._figure)
        elif tag == "g" and "id" in a:
            self._group = a["id"]
        elif tag == "path" and self._group and "d" in a:
            self.dom.paths.setdefault(self._group, a["d"])
        elif tag == "text":
            self._in = "text"
            self.dom.texts[self._figure].append("")
        elif tag == "table" and a.get("id") == "checks":
            self._in_checks = True
        elif tag == "tr" and self._in_checks:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._in = "td"
            self._row.append("")
        elif a.get("id") == "banner":
            self._in = "banner"
            self.dom.banner_class = a.get("class", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = ""
        elif tag == "table":
            self._in_checks = False
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.dom.check_rows.append(self._row)
            self._row = None
        elif tag in {"text", "td", "div"}:
            self._in = ""

    def handle_data(self, data: str) -> None:
        if self._in == "text":
            self.dom.texts[self._figure][-1] += data
        elif self._in == "td" and self._row is not None:
            self._row[-1] += data
        elif self._in == "banner":
            self.dom.banner_text += data


@dataclass(frozen=True)
class Rendered:
    report: DemoReport
    dom: Dom
    screenshot: Path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    assert shutil.which("chromium"), (
        "Debian's chromium is missing: run `make test` (or `make chromium`)"
    )
    where = tmp_path_factory.mktemp("demo-report")
    report = sample_report()
    page = where / "report.html"
    write_html(report, page)
    screenshot = where / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        dumped = chromium(WINDOW, "--dump-dom", page.as_uri(), profile=Path(profile))
        chromium(WINDOW, f"--screenshot={screenshot}", page.as_uri(), profile=Path(profile))
    reader = DomReader()
    reader.feed(dumped.stdout)
    return Rendered(report=report, dom=reader.dom, screenshot=screenshot)


def points(d: str) -> int:
    """Vertices of an SVG path drawn by matplotlib (each is one M or L command)."""
    return len(re.findall(r"[ML]\s", d))


def test_chromium_shows_four_plots_in_page_order(rendered: Rendered) -> None:
    assert rendered.dom.figures == list(PLOTS)


@pytest.mark.parametrize("plot", PLOTS)
def test_every_series_of_a_plot_is_drawn_with_its_data_points(
    rendered: Rendered, plot: str
) -> None:
    for gid in SERIES[plot]:
        assert gid in rendered.dom.paths, f"{gid} not drawn in {plot}"
        drawn = points(rendered.dom.paths[gid])
        assert drawn >= POINTS_MIN.get(gid, WIGGLY_POINTS_MIN), f"{gid}: {drawn} points"


@pytest.mark.parametrize("plot", PLOTS)
def test_every_event_is_marked_and_labelled_on_every_plot(rendered: Rendered, plot: str) -> None:
    for index, event in enumerate(rendered.report.events):
        marker = rendered.dom.paths.get(f"{plot}-event-{index}", "")
        assert points(marker) == 2, f"{plot}: event {event.label!r} has no vertical line"
        assert event.label in rendered.dom.texts[plot]


def test_a_gap_in_latency_breaks_the_line_instead_of_dropping_to_zero(
    rendered: Rendered,
) -> None:
    # The sample has no latency sample for 3 s after the kill: the line restarts (a new M).
    assert rendered.dom.paths["latency-app-p99"].count("M") == 2


def test_the_checks_table_and_the_pass_banner_are_rendered(rendered: Rendered) -> None:
    rows = rendered.dom.check_rows
    assert [row[1] for row in rows] == [check.name for check in rendered.report.checks]
    assert all(row[0] == "✓ pass" for row in rows)
    assert "passed" in rendered.dom.banner_class.split()
    assert rendered.dom.banner_text == "all 6 checks passed"


def test_the_screenshot_shows_every_series_colour_painted(rendered: Rendered) -> None:
    with Image.open(rendered.screenshot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colors is not None
    painted = {c: sum(count for count, rgb in colors if near(rgb, c)) for c in COLORS[:5]}
    # The sample's series use the first four colours. No series uses the fifth: it is the
    # control that the tolerance is tight enough not to count blends of the others.
    assert all(painted[c] > 150 for c in COLORS[:4]), painted
    assert painted[COLORS[4]] == 0, painted


def near(rgb: object, hex_color: str, tolerance: int = 16) -> bool:
    assert isinstance(rgb, tuple)
    target = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return all(abs(int(c) - t) <= tolerance for c, t in zip(rgb, target, strict=True))
