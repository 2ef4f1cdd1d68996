"""`loom bench kv` as a user runs it: a fresh local cluster (and, with `--peer etcd`, a
fresh 3-member etcd) measured briefly; the JSON it prints has exactly the documented
shape. Figures are measured, never asserted beyond "it did some work without errors"."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

QUICK = ("--workload", "A", "--clients", "4", "--duration", "2", "--records", "200")
STATS_KEYS = {"ops_per_s", "p50_ms", "p99_ms", "errors"}
REPORT_KEYS = {"workload", "clients", "duration_s", "loom", "peer", "ratio"}


def bench_kv(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "loom.cli.main", "bench", "kv", *QUICK, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the JSON object: {done.stdout!r}"
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return report


def assert_stats(stats: object) -> None:
    assert isinstance(stats, dict)
    assert set(stats) == STATS_KEYS
    assert isinstance(stats["ops_per_s"], float)
    assert stats["ops_per_s"] > 0
    for field in ("p50_ms", "p99_ms"):
        assert isinstance(stats[field], float)
        assert stats[field] > 0
    assert stats["p50_ms"] <= stats["p99_ms"]
    assert type(stats["errors"]) is int
    assert stats["errors"] == 0


def assert_header(report: dict[str, object]) -> None:
    assert set(report) == REPORT_KEYS
    assert report["workload"] == "A"
    assert type(report["clients"]) is int
    assert report["clients"] == 4
    assert isinstance(report["duration_s"], float)
    assert report["duration_s"] == 2.0


@pytest.mark.timeout(60)
def test_bench_kv_prints_one_json_object_for_loom_alone() -> None:
    report = bench_kv()
    assert_header(report)
    assert_stats(report["loom"])
    assert report["peer"] is None
    assert report["ratio"] is None


@pytest.mark.timeout(90)
def test_bench_kv_with_the_etcd_peer_reports_both_and_their_ratio() -> None:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: `make test` installs Debian's etcd-server")
    if importlib.util.find_spec("aetcd") is None:
        pytest.fail("the etcd client is not installed: pip install -e '.[bench]'")
    report = bench_kv("--peer", "etcd")
    assert_header(report)
    assert_stats(report["loom"])
    assert_stats(report["peer"])
    assert isinstance(report["ratio"], float)
    assert report["ratio"] > 0
