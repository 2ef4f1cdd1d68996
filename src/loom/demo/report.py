"""The demo's report: a self-contained HTML page and the terminal summary table.

Rules of this module:
- The page needs nothing at view time: CSS and the plots (SVG) are inline, there is no
  script and no external URL, so it opens offline, from a mail attachment or a CI artifact.
- Every string from the report is HTML-escaped: a saved report is read back as data.
- The file is written whole or not at all (temporary file, then rename), so a browser
  refreshing it never shows half a page.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from loom.core.errors import LoomError
from loom.demo.model import DemoReport

if TYPE_CHECKING:
    from loom.demo.report_plots import Plot


class ReportError(LoomError):
    """The HTML report could not be written; the message names the path and the cause."""


def write_html(report: DemoReport, path: Path) -> None:
    """Write `report` as one self-contained HTML file at `path` (replacing it).

    Blocking, CPU-bound for a second or two (matplotlib): from asyncio, call it through
    `asyncio.to_thread`, one report at a time."""
    page = render_html(report)
    directory = path.parent
    if not directory.is_dir():
        raise ReportError(f"cannot write the report to {path}: {directory} is not a directory")
    try:
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
    except OSError as error:
        raise ReportError(f"cannot write the report to {path}: {error.strerror}") from error
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(page)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise ReportError(f"cannot write the report to {path}: {error.strerror}") from error


def render_html(report: DemoReport) -> str:
    """The whole page as a string (what `write_html` writes)."""
    # matplotlib takes a second or more to import: only a command that renders pays it,
    # not every `loom` command that imports this module for `summary_table`.
    from loom.demo.report_plots import render_plots  # noqa: PLC0415

    failed = sum(1 for check in report.checks if not check.passed)
    # `DemoReport.passed` is true of a run with no checks; the page must not show it green.
    if not report.checks:
        status, banner = "unchecked", "no checks were run"
    elif report.passed:
        status, banner = "passed", f"all {len(report.checks)} checks passed"
    else:
        status, banner = "failed", f"{failed} of {len(report.checks)} checks failed"
    return PAGE.format(
        title=_e(report.title),
        status=status,
        banner=_e(banner),
        started_at=_e(report.started_at),
        duration=_e(format_duration(report.duration_s)),
        samples=len(report.samples),
        events=len(report.events),
        settings=_settings(report),
        totals=_totals(report),
        checks=_checks(report),
        plots="\n".join(_plot(plot) for plot in render_plots(report)),
        style=STYLE,
    )


def summary_table(report: DemoReport) -> Table:
    """The terminal summary: one row per check, then the totals."""
    if not report.checks:
        verdict = "[bold yellow]NO CHECKS[/]"
    else:
        verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    table = Table(
        title=f"{report.title} — {verdict}",
        caption=f"{format_duration(report.duration_s)}, started {report.started_at}",
        title_justify="left",
    )
    table.add_column("", no_wrap=True)
    table.add_column("check")
    table.add_column("detail")
    for check in report.checks:
        mark = "[green]✓ pass[/]" if check.passed else "[bold red]✗ FAIL[/]"
        table.add_row(mark, check.name, check.detail)
    if not report.checks:
        table.add_row("[yellow]–[/]", "no checks were run", "")
    table.add_section()
    for name, value in report.totals.items():
        table.add_row("", _label(name), format_number(value))
    return table


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def format_number(value: float) -> str:
    """Counts as `41,230`, rates with one decimal; NaN and inf are shown, not hidden."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.1f}"


def _settings(report: DemoReport) -> str:
    # In the order the demo recorded them: it puts the ones that matter first.
    items = list(report.settings.items())
    if not items:
        return "<p class='muted'>no settings recorded</p>"
    rows = "".join(f"<div><dt>{_e(_label(k))}</dt><dd>{_e(_text(v))}</dd></div>" for k, v in items)
    return f"<dl class='settings'>{rows}</dl>"


def _totals(report: DemoReport) -> str:
    items = list(report.totals.items())
    if not items:
        return "<p class='muted'>no totals recorded</p>"
    cards = "".join(
        f"<div class='total'><span class='value'>{_e(format_number(v))}</span>"
        f"<span class='name'>{_e(_label(k))}</span></div>"
        for k, v in items
    )
    return f"<div class='totals'>{cards}</div>"


def _checks(report: DemoReport) -> str:
    if not report.checks:
        return "<p class='muted'>no checks were run</p>"
    rows = "".join(
        f"<tr class='{'pass' if c.passed else 'fail'}'>"
        f"<td class='verdict'>{'✓ pass' if c.passed else '✗ FAIL'}</td>"
        f"<td>{_e(c.name)}</td><td>{_e(c.detail)}</td></tr>"
        for c in report.checks
    )
    return (
        "<table id='checks'><thead><tr><th>result</th><th>check</th><th>detail</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _plot(plot: Plot) -> str:
    return (
        f"<figure class='plot' id='plot-{plot.key}'>"
        f"<figcaption>{_e(plot.title)}</figcaption>{plot.svg}</figure>"
    )


def _label(key: str) -> str:
    return key.replace("_", " ")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return format_number(value)
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #111827; background: #f9fafb; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { font-size: 18px; margin: 28px 0 10px; }
.meta, .muted { color: #6b7280; }
.banner { border-radius: 8px; padding: 12px 16px; margin: 16px 0; font-weight: 600;
          font-size: 17px; }
.banner.passed { background: #dcfce7; color: #166534; border: 1px solid #86efac; }
.banner.failed { background: #fee2e2; color: #991b1b; border: 1px solid #fca5a5; }
.banner.unchecked { background: #fef9c3; color: #854d0e; border: 1px solid #fde047; }
.settings { display: flex; flex-wrap: wrap; gap: 6px 22px; margin: 0; font-size: 14px; }
.settings div { display: flex; gap: 6px; }
.settings dt { color: #6b7280; } .settings dd { margin: 0; font-weight: 600; }
.totals { display: flex; flex-wrap: wrap; gap: 10px; }
.total { background: white; border: 1px solid #e5e7eb; border-radius: 8px;
         padding: 10px 14px; min-width: 120px; }
.total .value { display: block; font-size: 20px; font-weight: 600;
                font-variant-numeric: tabular-nums; }
.total .name { color: #6b7280; font-size: 13px; }
table { border-collapse: collapse; width: 100%; background: white; font-size: 14px; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid #e5e7eb; }
th { background: #f3f4f6; }
tr.pass .verdict { color: #15803d; font-weight: 600; white-space: nowrap; }
tr.fail .verdict { color: #b91c1c; font-weight: 700; white-space: nowrap; }
tr.fail { background: #fef2f2; }
figure.plot { background: white; border: 1px solid #e5e7eb; border-radius: 8px;
              margin: 0 0 14px; padding: 8px 8px 0; }
figure.plot figcaption { font-weight: 600; padding: 2px 6px; }
figure.plot svg { width: 100%; height: auto; display: block; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
<h1>{title}</h1>
<div class="meta">started {started_at} · {duration} · {samples} samples · {events} events</div>
<div class="banner {status}" id="banner">{banner}</div>
<h2>Settings</h2>
{settings}
<h2>Checks</h2>
{checks}
<h2>Totals</h2>
{totals}
<h2>Over time</h2>
<p class="muted">Dashed lines mark what was done to the system during the run.</p>
{plots}
</main>
</body>
</html>
"""
