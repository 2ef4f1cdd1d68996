"""The Celery peer of `loom bench functions`: a real redis-server and Celery worker on
127.0.0.1 complete every no-op call, the figures are sane, and every process the peer
started is gone afterwards, after an error too."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from loom.benchmarks.celery_peer import POOL_DEFAULT, CeleryMissing, CeleryPeer, run_celery

CALLS = 200


def require_celery() -> None:
    # Never skip: a missing peer is a broken setup, and it must be seen.
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not installed: `make test` installs Debian's redis-server "
            "(apt-get install redis-server)"
        )
    for module in ("celery", "redis"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[dev]'")


def is_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_celery_completes_every_call_and_the_figures_are_sane(tmp_path: Path) -> None:
    require_celery()
    lines: list[str] = []
    figures = run_celery(
        CALLS, concurrency=4, submitters=4, timeout_s=60.0, workdir=tmp_path, progress=lines.append
    )
    assert figures.calls == CALLS
    assert figures.lost == 0
    assert figures.completed == CALLS
    assert figures.submitted_per_s > 0
    assert figures.completed_per_s > 0
    assert figures.p50_ms is not None
    assert figures.p99_ms is not None
    assert 0 < figures.p50_ms <= figures.p99_ms
    # The run states the broker's persistence and the worker's pool.
    assert any("appendonly" in line and f"pool {POOL_DEFAULT}" in line for line in lines)


def test_every_process_the_peer_started_is_stopped_even_after_an_error(tmp_path: Path) -> None:
    require_celery()
    pids: tuple[int, ...] = ()
    with (
        pytest.raises(RuntimeError, match="the measurer failed"),
        CeleryPeer(tmp_path, pool="prefork", concurrency=2) as peer,
    ):
        pids = peer.pids
        assert len(pids) == 2
        assert all(is_group_alive(pid) for pid in pids)
        raise RuntimeError("the measurer failed")
    # Each child led its own process group; with prefork the pool processes are in the
    # worker's group too, so none of them outlived it.
    assert not any(is_group_alive(pid) for pid in pids)


def test_calls_a_paused_worker_never_runs_are_lost_when_the_timeout_ends_the_run(
    tmp_path: Path,
) -> None:
    require_celery()
    with CeleryPeer(tmp_path, concurrency=2) as peer:
        _, worker_pid = peer.pids
        os.killpg(worker_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            figures = peer.measure(50, submitters=2, timeout_s=2.0, progress=lambda _: None)
            elapsed_s = time.monotonic() - started
        finally:
            os.killpg(worker_pid, signal.SIGCONT)
    assert figures.lost == 50
    assert figures.completed_per_s == 0.0
    assert figures.p50_ms is None
    assert figures.submitted_per_s > 0
    assert 2.0 <= elapsed_s < 30.0  # waited for the timeout, then stopped waiting


def test_a_missing_redis_server_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CeleryMissing, match="redis-server"):
        run_celery(1, workdir=tmp_path)
