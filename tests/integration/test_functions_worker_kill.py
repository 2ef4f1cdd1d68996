"""At-least-once with real processes: a worker killed with SIGKILL in the middle of a
call leaves it to its lease; once the lease ends, another worker runs it again."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.functions import CallState
from loom.runtime.localcluster import LocalCluster

from .fn_app import app, slow_first

HERE = Path(__file__).parent


def start_worker(address: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(  # our own interpreter and arguments
            [sys.executable, "-m", "loom.cli.main", "worker", "fn_app:app", "-c", address],
            cwd=HERE,
            stdout=out,
            stderr=out,
        )


@pytest.mark.timeout(120)
def test_a_call_of_a_killed_worker_runs_again_after_its_lease(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        app.cluster = cluster.manager_address
        cluster.start_scheduler("scheduler")
        first = start_worker(cluster.manager_address, tmp_path / "w1.log")
        second: subprocess.Popen[bytes] | None = None
        try:
            call = await slow_first.submit("hello")
            deadline = time.monotonic() + 30
            while (await call.status()).state is not CallState.RUNNING:
                assert time.monotonic() < deadline, "the first worker never took the call"
                await asyncio.sleep(0.1)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            killed_at = time.monotonic()
            second = start_worker(cluster.manager_address, tmp_path / "w2.log")
            assert await call.result(timeout_s=60) == "hello on attempt 2"
            record = await call.status()
            assert record.attempt == 2
            # Not before the first attempt's lease (timeout 2 s + 5 s slack) had ended.
            assert time.monotonic() - killed_at > 3
        finally:
            for worker in (first, second):
                if worker is not None and worker.poll() is None:
                    worker.terminate()
                    worker.wait(timeout=10)
            await app.close()

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
