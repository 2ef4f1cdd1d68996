"""`loom bench functions`: submitted and completed no-op calls per second and their
end-to-end latency on a local cluster of real processes (sm, 3 kv nodes, a scheduler
and a worker), and the same work through a peer (Celery with a Redis broker) in the
same run. Definitions of the figures: `calls_figures`.

loom's submissions are durable when acknowledged (QUORUM writes of the queue in loom
kv, fsynced on a majority); the peer's are not (Redis with its default persistence:
a snapshot now and then, no fsync per task).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from loom.benchmarks.calls_figures import CallsFigures
from loom.benchmarks.celery_peer import run_celery
from loom.benchmarks.fn_bench_app import app, noop
from loom.functions.queue import CallState, DurableQueue
from loom.runtime.localcluster import LocalCluster

BENCH_APP = "loom.benchmarks.fn_bench_app:app"
CALLS_MAX = 1_000_000
CHUNK = 100
POLL_S = 0.5


async def run_loom(
    calls: int,
    *,
    concurrency: int,
    submitters: int,
    timeout_s: float,
    workdir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> CallsFigures:
    cluster = LocalCluster(data_dir=workdir)
    try:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        cluster.start_scheduler("scheduler")
        cluster.start_worker("worker", BENCH_APP, concurrency=concurrency)
        app.cluster = cluster.manager_address
        try:
            await (await noop.submit(-1)).result(timeout_s=60)  # the pipeline is up
            progress(f"loom: submitting {calls} calls from {submitters} submitters")
            return await _measure(calls, submitters, timeout_s, progress)
        finally:
            await app.close()
    finally:
        cluster.stop()


async def _measure(
    calls: int, submitters: int, timeout_s: float, progress: Callable[[str], None]
) -> CallsFigures:
    submitted_at: list[float] = [0.0] * calls
    ids: list[str] = [""] * calls

    async def submitter(first: int, last: int) -> None:
        for start in range(first, last, CHUNK):
            end = min(last, start + CHUNK)
            began = time.time()
            done = await noop.submit_many([[i] for i in range(start, end)])
            for offset, call in enumerate(done):
                submitted_at[start + offset] = began
                ids[start + offset] = call.call_id

    began = time.time()
    share = -(-calls // submitters)
    await asyncio.gather(*(submitter(s, min(calls, s + share)) for s in range(0, calls, share)))
    submit_s = time.time() - began
    progress(f"loom: submitted in {submit_s:.1f} s; waiting for completions")
    queue = await app.queue()
    deadline = time.monotonic() + timeout_s
    # Polls the store: the calls finish in other processes, there is no event to await.
    while time.monotonic() < deadline and await queue.pending():  # noqa: ASYNC110
        await asyncio.sleep(POLL_S)
    finished = await _finish_times(queue)
    completed = [finished.get(call_id) for call_id in ids]
    return CallsFigures.from_times(
        submitted_at_s=submitted_at, completed_at_s=completed, submit_s=submit_s
    )


async def _finish_times(queue: DurableQueue) -> dict[str, float]:
    times: dict[str, float] = {}
    for partition in range(queue.partitions):
        async for record in queue.records(partition):
            if record.state is CallState.SUCCEEDED and record.result is not None:
                times[record.call_id] = float(msgspec.msgpack.decode(record.result))
    return times


def run(
    calls: int,
    *,
    concurrency: int = 64,
    submitters: int = 4,
    peer: str | None = None,
    timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, object]:
    """Both systems, one after the other, in this run; the object `--json` prints."""
    if not 1 <= calls <= CALLS_MAX:
        raise ValueError(f"calls must be 1..{CALLS_MAX}")
    with tempfile.TemporaryDirectory(prefix="loom-bench-fn-") as tmp:
        workdir = Path(tmp)
        ours = asyncio.run(
            run_loom(
                calls,
                concurrency=concurrency,
                submitters=submitters,
                timeout_s=timeout_s,
                workdir=workdir / "loom",
                progress=progress,
            )
        )
        progress(f"loom: {ours.completed_per_s:.0f} calls/s completed")
        theirs = None
        if peer == "celery":
            progress("celery: same calls through Celery with a Redis broker")
            theirs = run_celery(
                calls,
                concurrency=concurrency,
                submitters=submitters,
                timeout_s=timeout_s,
                workdir=workdir / "celery",
                progress=progress,
            )
    ratio = None
    if theirs is not None and theirs.completed_per_s > 0:
        ratio = round(ours.completed_per_s / theirs.completed_per_s, 2)
    return {
        "calls": calls,
        "loom": ours.to_json(),
        "peer": theirs.to_json() if theirs is not None else None,
        "ratio": ratio,
    }
