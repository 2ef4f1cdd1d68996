"""`loom bench tenants --json` as a user runs it: a fresh cluster with auth, a quiet
tenant measured alone and beside a noisy one far over its quota. Latencies are
measured, never asserted; the noisy tenant must have been throttled, the quiet one
not refused anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PHASE_KEYS = {"ops", "errors", "p50_ms", "p99_ms", "ops_per_s"}


@pytest.mark.timeout(180)
def test_bench_tenants_prints_both_p99s_and_the_noisy_tenant_is_throttled() -> None:
    args = (
        "--duration",
        "2",
        "--rounds",
        "2",
        "--quiet-rate",
        "40",
        "--noisy-writers",
        "32",
        "--noisy-quota",
        "20",
    )
    done = subprocess.run(
        [sys.executable, "-m", "loom.cli.main", "bench", "tenants", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    report = json.loads(line)
    for phase in ("quiet_solo", "quiet_with_noisy"):
        assert set(report[phase]) == PHASE_KEYS
        assert report[phase]["ops"] > 0 and report[phase]["errors"] == 0
    assert report["p99_ratio"] > 0
    assert len(report["round_p99_ratios"]) == report["rounds"] == 2
    noisy = report["noisy"]
    assert noisy["throttled"] > 0
    assert noisy["accepted_writes_per_s"] > 0
    assert noisy["refused_per_s_at_nodes"] > 0  # the nodes counted the refusals
