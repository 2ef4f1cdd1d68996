"""A concurrent history against real processes, through a SIGKILL and a SIGSTOP of
primaries, checked for linearizability by the simulator's own checker."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import LoomError
from loom.runtime.localcluster import LocalCluster
from loom.sim.checkers.linearizability import check_history
from loom.sim.history import Operation, OpKind, Outcome

KEYS = [b"r0", b"r1", b"r2", b"r3"]
CLIENTS = 6
RUN_S = 9.0


class History:
    def __init__(self) -> None:
        self.ops: list[Operation] = []
        self.ids = itertools.count(1)
        self.values = itertools.count(1)

    @staticmethod
    def now_ms() -> float:
        return time.monotonic() * 1000


async def client_loop(address: str, name: str, history: History, stop: asyncio.Event) -> None:
    rng = random.Random(name)
    async with kv.connect(address, timeout_s=8) as client:
        ks = client.keyspace("lin")
        while not stop.is_set():
            key = rng.choice(KEYS)
            roll = rng.random()
            invoked = history.now_ms()
            op_id = next(history.ids)
            if roll < 0.5:
                try:
                    item = await ks.get(key)
                except LoomError:
                    continue  # a read without an answer says nothing
                output = item.value if item is not None else None
                history.ops.append(
                    Operation(op_id=op_id, client=name, key=key, kind="read", invoked_ms=invoked,
                              completed_ms=history.now_ms(), outcome="ok", output=output)
                )  # fmt: skip
                continue
            kind: OpKind = "delete" if roll > 0.9 else "write"
            value = None if kind == "delete" else b"v%d" % next(history.values)
            completed: float | None
            outcome: Outcome
            try:
                if value is None:
                    await ks.delete(key)
                else:
                    await ks.put(key, value)
            except LoomError:
                completed, outcome = None, "unknown"  # it may still have happened
            else:
                completed, outcome = history.now_ms(), "ok"
            history.ops.append(
                Operation(op_id=op_id, client=name, key=key, kind=kind, invoked_ms=invoked,
                          completed_ms=completed, outcome=outcome, value=value)
            )  # fmt: skip


@pytest.mark.timeout(180)
def test_a_history_through_kills_and_pauses_is_linearizable(tmp_path: Path) -> None:
    history = History()

    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        address = cluster.manager_address
        async with kv.connect(address, timeout_s=30) as admin:
            await admin.create_keyspace("lin", shards=1, replication=3)
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(client_loop(address, f"c{i}", history, stop))
                for i in range(CLIENTS)
            ]
            await asyncio.sleep(RUN_S / 4)
            first = (await admin.routing()).shards[0].primary
            cluster.kill(first)
            await asyncio.sleep(RUN_S / 4)
            cluster.restart(first)
            second = (await admin.routing()).shards[0].primary
            cluster.pause(second)
            await asyncio.sleep(RUN_S / 4)
            cluster.resume(second)
            await asyncio.sleep(RUN_S / 4)
            stop.set()
            await asyncio.gather(*tasks)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
    completed = [op for op in history.ops if op.outcome == "ok"]
    assert len(completed) > 200, f"too little happened: {len(completed)} operations"
    report = check_history(history.ops, budget_per_key=2_000_000)
    assert report.is_linearizable, report.summary()
    assert not report.keys_unchecked, report.summary()
