"""`loom demo threads` as `make demo` runs it, shortened: every check passes, the exit
status says so, the JSON has the documented shape and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOTALS = {"signups", "kv_ops", "calls", "failed_requests", "lost_writes", "duration_s"}


@pytest.mark.timeout(400)
def test_a_short_launch_passes_every_check(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    done = subprocess.run(
        [
            sys.executable, "-m", "loom.cli.main", "demo", "threads",
            "--users", "150", "--duration", "15", "--json", "--report", str(report),
        ],
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )  # fmt: skip
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    result = json.loads(last)
    assert done.returncode == 0, f"{result}\n{done.stderr[-4000:]}"
    assert set(result) == {"checks", *TOTALS}
    assert len(result["checks"]) >= 7 and all(result["checks"].values())
    assert result["signups"] == 150 and result["lost_writes"] == 0
    assert result["calls"] >= 150
    html = report.read_text()
    assert "every follow edge copied exactly once" in html and "<svg" in html
