"""The functions platform over TLS (ADR 0015): a `loom scheduler` and a `loom worker`
process on a cluster with TLS; the worker reaches the store and the scheduler over TLS
with the CA only (no client certificate), and a submitted call runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from loom.runtime.localcluster import LocalCluster

from .fn_app import app, noop

HERE = Path(__file__).parent


def start_worker(cluster: LocalCluster, log: Path) -> subprocess.Popen[bytes]:
    """`loom --tls-ca CA worker fn_app:app`: TLS with the CA only (the root option)."""
    ca = str(cluster.certificates.ca)
    args = ["--tls-ca", ca, "worker", "fn_app:app", "-c", cluster.manager_address]
    with log.open("ab") as out:
        return subprocess.Popen(  # our own interpreter and arguments
            [sys.executable, "-m", "loom.cli.main", *args], cwd=HERE, stdout=out, stderr=out
        )


@pytest.mark.timeout(90)
def test_a_call_runs_on_a_scheduler_and_worker_over_tls(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path, tls=True)

    async def scenario() -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        cluster.start_scheduler("scheduler")
        app.cluster, app.tls = cluster.manager_address, cluster.client_tls()
        worker = start_worker(cluster, tmp_path / "worker.log")
        try:
            call = await noop.submit(42)
            assert await call.result(timeout_s=60) == 42
        finally:
            worker.terminate()
            worker.wait(timeout=10)
            await app.close()
            app.tls = None

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()
