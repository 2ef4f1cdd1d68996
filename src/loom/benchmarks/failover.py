"""`loom bench failover`: kill the primary of a 3-node cluster of real processes while
clients write, `trials` times, and measure how long until writes succeed again; count
acknowledged writes that are gone at the end (there must be none).

Each trial: writers run continuously; SIGKILL the node holding the primary of the
benchmark's p-shard; the recovery time is from the kill to the first acknowledgement
after it (only a new primary can acknowledge by then). The killed node is restarted
on its data and the next trial waits until the shard is fully healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loom import kv
from loom.core.errors import LoomError
from loom.runtime.localcluster import LocalCluster

NODES = ("n1", "n2", "n3")
KEYSPACE = "failover"
WRITERS = 8
RECOVERY_DEADLINE_S = 30.0
SETTLE_S = 1.0
CHECK_BATCH = 256


class _Writers:
    """Clients writing distinct keys back to back; remembers every acknowledged key."""

    def __init__(self, client: kv.Client) -> None:
        self.ks = client.keyspace(KEYSPACE)
        self.acked: list[bytes] = []
        self.last_ack_at = 0.0  # when the latest acknowledgement arrived
        self.errors = 0
        self._stop = asyncio.Event()

    async def run(self, writer: int) -> None:
        for seq in range(10**9):
            if self._stop.is_set():
                return
            key = b"w%d:%d" % (writer, seq)
            try:
                await self.ks.put(key, b"x" * 64)
            except LoomError:
                self.errors += 1
                continue
            self.acked.append(key)
            self.last_ack_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _time_to_recover(writers: _Writers) -> float:
    """From now (just after the kill) until the next acknowledgement arrives."""
    killed_at = time.monotonic()
    await _until(lambda: writers.last_ack_at > killed_at, "writes to resume")
    return writers.last_ack_at - killed_at


async def _primary(client: kv.Client) -> str:
    table = await client.routing()
    (route,) = [s for s in table.shards if s.keyspace == KEYSPACE]
    return route.primary


async def _healthy(client: kv.Client) -> bool:
    table = await client.routing()
    (route,) = [s for s in table.shards if s.keyspace == KEYSPACE]
    alive = {n.info.node for n in table.nodes if n.alive}
    return route.ready and set(route.acceptors) <= alive


async def run_failover(
    *, trials: int, lease_ms: float, progress: Callable[[str], None] = lambda _: None
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="loom-failover-") as tmp:
        cluster = LocalCluster(data_dir=Path(tmp), lease_ms=lease_ms)
        try:
            cluster.start_manager()
            for name in NODES:
                cluster.start_node(name)
            return await _trials(cluster, trials, progress)
        finally:
            cluster.stop()


async def _trials(
    cluster: LocalCluster, trials: int, progress: Callable[[str], None]
) -> dict[str, object]:
    async with kv.connect(cluster.manager_address, timeout_s=RECOVERY_DEADLINE_S) as client:
        await client.create_keyspace(KEYSPACE, shards=1, replication=3)
        writers = _Writers(client)
        tasks = [asyncio.create_task(writers.run(w)) for w in range(WRITERS)]
        times = []
        try:
            for trial in range(1, trials + 1):
                await asyncio.sleep(SETTLE_S)
                victim = await _primary(client)
                cluster.kill(victim)
                recovered = await _time_to_recover(writers)
                times.append(round(recovered, 3))
                progress(
                    f"trial {trial}/{trials}: killed {victim}, writes back in {recovered:.3f} s"
                )
                cluster.restart(victim)
                deadline = time.monotonic() + RECOVERY_DEADLINE_S
                while not await _healthy(client):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not heal after a restart")
                    await asyncio.sleep(0.1)
        finally:
            writers.stop()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        lost = await _count_lost(writers.ks, writers.acked)
    return {
        "trials_s": times,
        "median_s": round(statistics.median(times), 3),
        "max_s": max(times),
        "lost_writes": lost,
        "acknowledged_writes": len(writers.acked),
        "lease_ms": cluster.lease_ms,
    }


async def _count_lost(ks: kv.Keyspace, keys: list[bytes]) -> int:
    """Acknowledged keys that a STRONG read does not find."""
    lost = 0
    for start in range(0, len(keys), CHECK_BATCH):
        found = await asyncio.gather(*(ks.get(k) for k in keys[start : start + CHECK_BATCH]))
        lost += sum(1 for item in found if item is None)
    return lost
