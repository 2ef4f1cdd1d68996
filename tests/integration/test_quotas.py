"""Per-keyspace quotas with real processes (a `loom sm` and three `loom node`s on
127.0.0.1): a fast writer on a keyspace with a tight writes/s quota is throttled — some
of its requests raise `Throttled`, the rate it gets stays near the quota — while a
writer on another keyspace of the same cluster is not; a keyspace over its stored-bytes
quota refuses growth with `QuotaExceeded` but still takes deletes; the quota is set and
shown by the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import LoomError, OutcomeUnknown, QuotaExceeded, Throttled
from loom.runtime.localcluster import LocalCluster

QUOTA_WRITES_PER_S = 20.0
RUN_S = 4.0
WRITERS = 16
PATIENT_PUTS = 40


def loom(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom.cli.main", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


class Counts:
    def __init__(self) -> None:
        self.ok = 0
        self.throttled: list[Throttled] = []
        # A write admitted just before its (short) deadline may miss it: applied or not.
        self.unknown = 0
        self.other: list[str] = []


async def write_fast(ks: kv.Keyspace, name: str, counts: Counts, until: float) -> None:
    """Back-to-back puts of distinct keys until `until`; every outcome counted."""
    for seq in range(10**9):
        if time.monotonic() >= until:
            return
        key = f"{name}:{seq}".encode()
        try:
            await ks.put(key, b"v")
        except Throttled as error:
            counts.throttled.append(error)
            continue
        except OutcomeUnknown:
            counts.unknown += 1
            continue
        except LoomError as error:
            counts.other.append(f"{type(error).__name__}: {error}")
            continue
        counts.ok += 1


async def throttling(address: str) -> None:
    # A short deadline: a throttled request is retried only while a retry fits in it,
    # so a writer this far over its quota sees Throttled.
    async with kv.connect(address, timeout_s=1.0) as fast, kv.connect(address) as admin:
        await admin.create_keyspace("slow", shards=2, replication=3)
        await admin.create_keyspace("free", shards=1, replication=3)
        info = await admin.set_quota("slow", writes_per_s=QUOTA_WRITES_PER_S)
        assert info.quota.writes_per_s == QUOTA_WRITES_PER_S
        slow, free = Counts(), Counts()
        start = time.monotonic()
        until = start + RUN_S
        async with asyncio.TaskGroup() as group:
            for i in range(WRITERS):
                group.create_task(write_fast(fast.keyspace("slow"), f"s{i}", slow, until))
            for i in range(8):
                group.create_task(write_fast(admin.keyspace("free"), f"f{i}", free, until))
        elapsed = time.monotonic() - start
        patient_s = await patient_writer(admin.keyspace("slow"))

    assert slow.other == [], slow.other[:3]
    assert slow.throttled, "a writer far over its quota was never throttled"
    assert all((e.retry_after_ms or 0) > 0 for e in slow.throttled)
    # Each of the two primaries' nodes enforces its half; its bucket starts with half a
    # second of its rate (the burst), so at most quota × (elapsed + 0.5) get through.
    accepted_max = QUOTA_WRITES_PER_S * (elapsed + 0.5) * 1.1
    assert slow.ok + slow.unknown <= accepted_max, (slow.ok, slow.unknown, accepted_max)
    assert slow.ok >= QUOTA_WRITES_PER_S * elapsed * 0.5, (slow.ok, elapsed)
    # The other keyspace of the same cluster is not throttled and is not held to the
    # quota (the bound is loose: the machine running the test may be busy).
    assert free.throttled == [] and free.other == [], (free.throttled[:1], free.other[:3])
    assert free.unknown == 0
    assert free.ok > 2 * QUOTA_WRITES_PER_S * elapsed, (free.ok, elapsed)
    # A writer with time to spare never sees Throttled: its client waits out the hints.
    burst = QUOTA_WRITES_PER_S * 0.5
    assert patient_s >= (PATIENT_PUTS - burst) / QUOTA_WRITES_PER_S * 0.8, patient_s


async def read_fast(ks: kv.Keyspace, counts: Counts, until: float) -> None:
    while time.monotonic() < until:
        try:
            await ks.get(b"k", consistency=kv.EVENTUAL)  # any replica: each has a bucket
        except Throttled as error:
            counts.throttled.append(error)
            continue
        except LoomError as error:
            counts.other.append(f"{type(error).__name__}: {error}")
            continue
        counts.ok += 1


async def read_throttling(address: str) -> None:
    """Reads have their own bucket: a reads/s quota throttles reads, not writes."""
    reads_per_s = 30.0
    async with kv.connect(address, timeout_s=0.5) as client:
        await client.create_keyspace("reads", shards=1, replication=3)
        await client.set_quota("reads", reads_per_s=reads_per_s)
        ks = client.keyspace("reads")
        for i in range(40):  # writes are not limited by a reads/s quota
            await ks.put(b"w%d" % i, b"v")
        counts = Counts()
        start = time.monotonic()
        until = start + 2.0
        async with asyncio.TaskGroup() as group:
            for _ in range(8):
                group.create_task(read_fast(ks, counts, until))
        elapsed = time.monotonic() - start
    assert counts.other == [], counts.other[:3]
    assert counts.throttled, "readers far over their quota were never throttled"
    # EVENTUAL reads may go to any of the 3 replicas, each enforcing the whole share
    # (ADR 0008): at most 3 × the quota, plus each bucket's burst.
    assert counts.ok <= 3 * reads_per_s * (elapsed + 0.5) * 1.1, (counts.ok, elapsed)


async def patient_writer(ks: kv.Keyspace) -> float:
    """PATIENT_PUTS puts one after another with the default 10 s deadline; how long."""
    await asyncio.sleep(1.0)  # the buckets refill after the fast writers
    start = time.monotonic()
    for i in range(PATIENT_PUTS):
        await ks.put(b"patient:%d" % i, b"v")  # Throttled here would fail the test
    return time.monotonic() - start


async def stored_bytes(address: str) -> None:
    bytes_max = 64 * 1024
    value = b"x" * 2048
    async with kv.connect(address) as client:
        await client.create_keyspace("small", shards=1, replication=3)
        await client.set_quota("small", bytes_max=bytes_max)
        ks = client.keyspace("small")
        written = 0
        deadline = time.monotonic() + 60
        with pytest.raises(QuotaExceeded):
            while time.monotonic() < deadline:
                await ks.put(f"k{written}".encode(), value)
                written += 1
        assert written * len(value) >= bytes_max  # not refused before the quota
        # The size is measured off the request path, so it lags: a bounded overshoot.
        assert written * len(value) < 4 * bytes_max, written
        assert await ks.delete(b"k0")  # deletes still pass: the way back under
        for i in range(1, written):
            await ks.delete(f"k{i}".encode())


@pytest.mark.timeout(240)
def test_quotas_throttle_one_keyspace_and_leave_another_alone(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        address = cluster.manager_address
        asyncio.run(throttling(address))
        asyncio.run(stored_bytes(address))
        asyncio.run(read_throttling(address))

        at = ("-c", address)
        limits = ("--reads-per-s", "1000", "--bytes-max", "5000000")
        shown = loom("keyspace", "set-quota", "free", *limits, *at)
        assert "reads/s 1000, writes/s unlimited, bytes 5000000" in shown.stdout
        described = json.loads(loom("keyspace", "describe", "free", "--json", *at).stdout)
        assert described["quota"] == {
            "reads_per_s": 1000.0,
            "writes_per_s": None,
            "bytes_max": 5_000_000,
        }
        assert "quota: reads/s 1000" in loom("keyspace", "describe", "free", *at).stdout
        # A cluster started without auth says so loudly.
        assert "AUTH IS OFF" in (tmp_path / "logs" / "sm.log").read_text()
        assert cluster.exited() == []
    finally:
        cluster.stop()
