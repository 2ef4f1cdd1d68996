"""`loom bench functions` as a user runs it, briefly: the JSON it prints has exactly
the documented shape, for loom alone and with Celery beside it. Figures are measured,
never asserted beyond "every call completed"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FIGURES = {"submitted_per_s", "completed_per_s", "p50_ms", "p99_ms", "lost"}


def bench_functions(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom.cli.main",
            "bench",
            "functions",
            "--calls",
            "300",
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    report = json.loads(line)
    assert set(report) == {"calls", "loom", "peer", "ratio"}
    assert report["calls"] == 300
    return report  # type: ignore[no-any-return]


def assert_figures(figures: object) -> None:
    assert isinstance(figures, dict)
    assert set(figures) == FIGURES
    assert figures["lost"] == 0
    assert figures["completed_per_s"] > 0 and figures["submitted_per_s"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]


@pytest.mark.timeout(180)
def test_bench_functions_alone_and_against_celery() -> None:
    alone = bench_functions()
    assert_figures(alone["loom"])
    assert alone["peer"] is None and alone["ratio"] is None
    both = bench_functions("--peer", "celery", "--concurrency", "8")
    assert_figures(both["loom"])
    assert_figures(both["peer"])
    assert isinstance(both["ratio"], float) and both["ratio"] > 0
