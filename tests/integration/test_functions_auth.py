"""Functions on a local cluster with auth: the scheduler and worker `LocalCluster`
starts act with the admin token, so calls run; a submitter without a token is
refused, never silently queued."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from loom.core.errors import PermissionDenied
from loom.functions import App
from loom.runtime.localcluster import LocalCluster

from .fn_app import app, noop

HERE = Path(__file__).parent


@pytest.mark.timeout(120)
def test_a_cluster_with_auth_runs_functions_and_refuses_anonymous_submitters(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(data_dir=tmp_path, auth=True)
    try:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        assert cluster.admin_token is not None
        cluster.start_scheduler("scheduler")
        cwd = os.getcwd()
        os.chdir(HERE)  # the worker imports fn_app from here
        try:
            cluster.start_worker("worker", "fn_app:app")
        finally:
            os.chdir(cwd)

        async def scenario() -> None:
            app.cluster, app.token = cluster.manager_address, cluster.admin_token
            anonymous = App("fntest", cluster=cluster.manager_address, partitions=2)
            anonymous.function(timeout_s=10, name="noop")(noop.fn)
            try:
                call = await noop.submit(7)
                assert await call.result(timeout_s=60) == 7
                with pytest.raises(PermissionDenied):
                    await anonymous.functions["noop"].submit(8)
            finally:
                await app.close()
                await anonymous.close()
                app.token = None

        asyncio.run(scenario())
    finally:
        cluster.stop()
