"""The demo's HTML report and summary table from edge-case reports (no browser here:
tests/e2e/test_demo_report.py opens a realistic one in Chromium)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import msgspec
import pytest
from rich.console import Console

from loom.demo.model import Check, DemoReport, Event, Sample
from loom.demo.report import ReportError, render_html, summary_table, write_html


def report(
    *,
    samples: list[Sample] | None = None,
    events: list[Event] | None = None,
    checks: list[Check] | None = None,
    totals: dict[str, float] | None = None,
    settings: dict[str, object] | None = None,
) -> DemoReport:
    return DemoReport(
        title="loom demo threads",
        started_at="2026-11-22T09:00:00Z",
        duration_s=60.0,
        settings=settings or {},
        samples=samples or [],
        events=events or [],
        checks=checks or [],
        totals=totals or {},
    )


def sample(t_s: float, **changes: object) -> Sample:
    values: dict[str, object] = {
        "t_s": t_s,
        "signups_per_s": 10.0,
        "kv_ops_per_s": 300.0,
        "calls_completed_per_s": 9.0,
        "queue_depth": 4,
        "throttled_per_s": 0.0,
        "p50_ms": 2.0,
        "p99_ms": 20.0,
        "other_p99_ms": 9.0,
        "controller_rates": {"kv:graph": 100.0},
    }
    return Sample(**{**values, **changes})  # type: ignore[arg-type]


def series_points(page: str, gid: str) -> int:
    match = re.search(rf'<g id="{gid}">\s*<path d="([^"]*)"', page)
    return 0 if match is None else len(re.findall(r"[ML]\s", match.group(1)))


def test_a_report_with_no_samples_renders_four_empty_plots_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(report(events=[Event(t_s=30.0, label="SIGKILL n2")]), path)
    page = path.read_text(encoding="utf-8")
    assert page.count("<figure class='plot'") == 4
    assert page.count("no samples recorded") == 4
    assert page.count(">SIGKILL n2<") == 4  # markers still drawn, on the run's time axis


def test_a_report_with_nothing_in_it_renders_and_says_what_is_missing() -> None:
    page = render_html(report())
    for missing in ("no settings recorded", "no checks were run", "no totals recorded"):
        assert missing in page
    assert 'class="banner unchecked"' in page  # not green: nothing was verified


def test_missing_and_non_finite_values_are_gaps_not_zeros() -> None:
    samples = [sample(float(t)) for t in range(1, 21)]
    samples[9] = sample(10.0, p99_ms=None, kv_ops_per_s=math.nan, throttled_per_s=math.inf)
    page = render_html(report(samples=samples))
    assert series_points(page, "latency-app-p99") == 19
    assert series_points(page, "throughput-kv-ops") == 19
    assert series_points(page, "throttled") == 19


def test_times_off_the_axis_are_skipped_and_events_past_the_end_still_show() -> None:
    made = report(
        samples=[sample(1.0), sample(math.nan), sample(2.0)],
        events=[Event(t_s=math.inf, label="never"), Event(t_s=90.0, label="late restart")],
    )
    page = render_html(made)
    assert series_points(page, "throughput-signups") == 2
    assert ">never<" not in page
    assert page.count(">late restart<") == 4


def test_a_latency_series_that_is_all_missing_renders() -> None:
    samples = [sample(float(t), p50_ms=None, p99_ms=None, other_p99_ms=None) for t in range(5)]
    page = render_html(report(samples=samples))
    assert series_points(page, "latency-app-p50") == 0
    assert series_points(page, "throughput-signups") == 5


def test_a_controller_appearing_midway_gets_its_own_line_from_then_on() -> None:
    samples = [sample(float(t), controller_rates={}) for t in range(5)]
    samples += [sample(float(t), controller_rates={"kv:late": 50.0}) for t in range(5, 10)]
    page = render_html(report(samples=samples))
    assert "AIMD rate kv:late" in page
    assert series_points(page, "queue-controller-0") == 5


def test_the_page_is_self_contained() -> None:
    page = render_html(report(samples=[sample(1.0), sample(2.0)]))
    assert "<script" not in page
    assert "<link" not in page
    assert not re.search(r"""(?:src|href)=["'](?!#)""", page)  # only in-page references
    assert "url(http" not in page


def test_report_text_is_escaped() -> None:
    hostile = "<script>alert(1)</script>"
    page = render_html(
        report(
            events=[Event(t_s=1.0, label=hostile)],
            checks=[Check(name=hostile, passed=True, detail=hostile)],
            settings={hostile: hostile},
            totals={hostile: 1.0},
        )
    )
    assert "<script" not in page


def test_the_same_report_renders_to_the_same_bytes() -> None:
    made = report(samples=[sample(float(t)) for t in range(30)])
    assert render_html(made) == render_html(made)


def test_a_failed_check_turns_the_banner_red_and_is_counted() -> None:
    page = render_html(
        report(
            checks=[
                Check(name="no acknowledged write lost", passed=True, detail="0 lost"),
                Check(name="every notification delivered", passed=False, detail="3 missing"),
            ]
        )
    )
    assert 'class="banner failed"' in page
    assert "1 of 2 checks failed" in page
    assert "<tr class='fail'><td class='verdict'>✗ FAIL</td>" in page


def test_a_report_read_back_from_json_renders_the_same_page() -> None:
    made = report(
        samples=[sample(float(t)) for t in range(10)],
        events=[Event(t_s=5.0, label="restart n2")],
        totals={"signups": 100.0},
        settings={"users": 1000, "regions": ["a", "b", "c"]},
    )
    again = msgspec.json.decode(msgspec.json.encode(made), type=DemoReport)
    assert render_html(again) == render_html(made)


def test_writing_into_a_missing_directory_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="is not a directory"):
        write_html(report(), tmp_path / "absent" / "report.html")


def test_writing_replaces_the_file_and_leaves_no_temporary_behind(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text("old", encoding="utf-8")
    write_html(report(), path)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_the_summary_table_lists_checks_then_totals() -> None:
    table = summary_table(
        report(
            checks=[
                Check(name="no call dead-lettered", passed=True, detail="0 dead-lettered"),
                Check(name="every notification delivered", passed=False, detail="3 missing"),
            ],
            totals={"signups": 41230.0, "kv_ops_per_s": 1234.5},
        )
    )
    console = Console(record=True, width=120, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "FAILED" in text
    assert "✓ pass" in text and "✗ FAIL" in text
    assert text.index("no call dead-lettered") < text.index("41,230")
    assert "1,234.5" in text


def test_a_report_without_checks_is_not_called_passed_in_the_terminal() -> None:
    console = Console(record=True, width=120, color_system=None)
    console.print(summary_table(report(totals={"signups": 3.0})))
    text = console.export_text()
    assert "NO CHECKS" in text
    assert "PASSED" not in text
