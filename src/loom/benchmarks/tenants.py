"""`loom bench tenants`: does a noisy tenant hurt a quiet one? (DESIGN §7, ADR 0008)

A cluster of real processes with auth on (a manager and 3 nodes on 127.0.0.1), two
tenants, one keyspace each. The quiet tenant runs a paced mix of reads and writes,
alone (its solo latency) and while the noisy tenant's writers hammer a keyspace with
a writes/s quota far below what they offer, in alternating rounds (solo, beside,
solo, beside, …): on a shared machine the background load drifts, and alternating
puts the drift on both sides. Printed: the quiet tenant's p50/p99 in both phases
(every round's samples pooled) and their ratio, each round's ratio, and what the
noisy tenant got (accepted writes/s against its quota, Throttled answers). It
measures; it does not decide pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec

from loom import kv
from loom.core.errors import LoomError, Throttled
from loom.runtime.localcluster import LocalCluster
from loom.runtime.rpc import run

NODES = ("n1", "n2", "n3")
QUIET_TASKS = 4
NOISY_TIMEOUT_S = 1.0
WARMUP_S = 1.0
DURATION_S_MAX = 600.0
ROUNDS_MAX = 20
RATE_MAX = 100_000.0
NOISY_WRITERS_MAX = 1024


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class _NoisyResult(msgspec.Struct):
    """What the noisy tenant's process got in one round (its one JSON line)."""

    accepted_writes_per_s: float
    throttled: int
    other_errors: dict[str, int]


class _Phase:
    """The quiet tenant's samples over one or more runs of a phase."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.elapsed_s = 0.0

    def add(self, other: _Phase) -> None:
        self.latencies_ms += other.latencies_ms
        self.errors += other.errors
        self.elapsed_s += other.elapsed_s

    def summary(self) -> dict[str, float]:
        return _summary(self.latencies_ms, self.errors, self.elapsed_s)


def _summary(latencies_ms: list[float], errors: int, elapsed_s: float) -> dict[str, float]:
    if not latencies_ms:
        return {"ops": 0, "errors": errors, "p50_ms": 0.0, "p99_ms": 0.0, "ops_per_s": 0.0}
    return {
        "ops": len(latencies_ms),
        "errors": errors,
        "p50_ms": round(statistics.median(latencies_ms), 2),
        "p99_ms": round(_percentile(latencies_ms, 0.99), 2),
        "ops_per_s": round(len(latencies_ms) / elapsed_s, 1),
    }


async def _quiet(ks: kv.Keyspace, rate: float, duration_s: float) -> _Phase:
    """QUIET_TASKS paced tasks, together `rate` ops/s, half reads and half writes."""
    phase = _Phase()
    start = time.monotonic()
    interval = QUIET_TASKS / rate

    async def task(index: int) -> None:
        next_at = start + index * interval / QUIET_TASKS
        for seq in range(10**9):
            now = time.monotonic()
            if now - start >= duration_s:
                return
            await asyncio.sleep(max(0.0, next_at - now))
            next_at += interval
            key = b"q%d:%d" % (index, seq % 100)
            began = time.perf_counter()
            try:
                if seq % 2:
                    await ks.get(key)
                else:
                    await ks.put(key, b"x" * 100)
            except LoomError:
                phase.errors += 1
                continue
            phase.latencies_ms.append((time.perf_counter() - began) * 1000)

    async with asyncio.TaskGroup() as group:
        for index in range(QUIET_TASKS):
            group.create_task(task(index))
    phase.elapsed_s = time.monotonic() - start
    return phase


class _Noisy:
    """Writers back to back, far over their keyspace's quota; outcomes counted."""

    def __init__(self, ks: kv.Keyspace, until: float) -> None:
        self.ks = ks
        self.until = until
        self.ok = 0
        self.throttled = 0
        self.other: dict[str, int] = {}  # error type → count (e.g. OutcomeUnknown)

    async def run(self, writer: int) -> None:
        for seq in range(10**9):
            if time.monotonic() >= self.until:
                return
            try:
                await self.ks.put(b"n%d:%d" % (writer, seq), b"x" * 100)
            except Throttled:
                self.throttled += 1
                continue
            except LoomError as error:
                name = type(error).__name__
                self.other[name] = self.other.get(name, 0) + 1
                continue
            self.ok += 1


async def _bench(
    cluster: LocalCluster,
    *,
    quiet_rate: float,
    noisy_writers: int,
    noisy_quota: float,
    duration_s: float,
    rounds: int,
    progress: Callable[[str], None],
) -> dict[str, object]:
    address = cluster.manager_address
    assert cluster.admin_token is not None
    async with kv.connect(address, token=cluster.admin_token) as admin:
        for tenant in ("quiet", "noisy"):
            await admin.create_tenant(tenant)
        quiet_token = (await admin.create_token("quiet")).secret
        noisy_token = (await admin.create_token("noisy")).secret
        await admin.create_keyspace("quiet-ks", shards=3, replication=3, tenant="quiet")
        await admin.create_keyspace("noisy-ks", shards=3, replication=3, tenant="noisy")
        await admin.set_quota("noisy-ks", writes_per_s=noisy_quota)
    solo, shared = _Phase(), _Phase()
    round_ratios: list[float] = []
    noisy_rounds: list[_NoisyResult] = []
    async with kv.connect(address, token=quiet_token) as quiet:
        quiet_ks = quiet.keyspace("quiet-ks")
        await _quiet(quiet_ks, quiet_rate, WARMUP_S)
        for number in range(1, rounds + 1):
            progress(f"round {number}/{rounds}: quiet tenant alone, {duration_s:g} s …")
            alone = await _quiet(quiet_ks, quiet_rate, duration_s)
            progress(f"  p50 {alone.summary()['p50_ms']} ms, p99 {alone.summary()['p99_ms']} ms")
            progress(
                f"round {number}/{rounds}: beside {noisy_writers} noisy writers over a "
                f"{noisy_quota:g} writes/s quota …"
            )
            beside, noisy = await _beside_noisy(
                quiet_ks,
                address=address,
                noisy_token=noisy_token,
                noisy_writers=noisy_writers,
                quiet_rate=quiet_rate,
                duration_s=duration_s,
            )
            progress(f"  p50 {beside.summary()['p50_ms']} ms, p99 {beside.summary()['p99_ms']} ms")
            solo.add(alone)
            shared.add(beside)
            noisy_rounds.append(noisy)
            round_ratios.append(_ratio(beside.summary(), alone.summary()))
        refused_per_s = await _refused_per_s(address, cluster.admin_token)
    solo_summary, shared_summary = solo.summary(), shared.summary()
    return {
        "quiet_solo": solo_summary,
        "quiet_with_noisy": shared_summary,
        "p99_ratio": _ratio(shared_summary, solo_summary),
        "round_p99_ratios": round_ratios,
        "noisy": {
            "writers": noisy_writers,
            "quota_writes_per_s": noisy_quota,
            "accepted_writes_per_s": round(
                statistics.mean(n.accepted_writes_per_s for n in noisy_rounds), 1
            ),
            "throttled": sum(n.throttled for n in noisy_rounds),
            "other_errors": dict(sum((Counter(n.other_errors) for n in noisy_rounds), Counter())),
            # What the nodes refused per second at the end (their smoothed count, as
            # `loom status` shows it): the retry traffic a tenant over quota causes.
            "refused_per_s_at_nodes": refused_per_s,
        },
        "quiet_rate_ops_per_s": quiet_rate,
        "duration_s": duration_s,
        "rounds": rounds,
    }


async def _beside_noisy(
    quiet_ks: kv.Keyspace,
    *,
    address: str,
    noisy_token: str,
    noisy_writers: int,
    quiet_rate: float,
    duration_s: float,
) -> tuple[_Phase, _NoisyResult]:
    """One shared phase. The noisy tenant runs in its own process, as it would: sharing
    this event loop would add its client-side work to the quiet tenant's latency."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loom.benchmarks.tenants",
        address, noisy_token, str(noisy_writers), str(WARMUP_S + duration_s),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(WARMUP_S)
    beside = await _quiet(quiet_ks, quiet_rate, duration_s)
    out, _ = await process.communicate()
    return beside, msgspec.json.decode(out, type=_NoisyResult)


def _ratio(shared: dict[str, float], solo: dict[str, float]) -> float:
    return round(shared["p99_ms"] / solo["p99_ms"], 2) if solo["p99_ms"] else 0.0


async def _refused_per_s(address: str, admin_token: str) -> float:
    async with kv.connect(address, token=admin_token) as admin:
        status = await admin.status()
    return round(sum(n.throttled_per_s for n in status.nodes), 1)


async def run_tenants_bench(
    *,
    quiet_rate: float,
    noisy_writers: int,
    noisy_quota: float,
    duration_s: float,
    rounds: int,
    progress: Callable[[str], None],
) -> dict[str, object]:
    """Starts the cluster in a temporary directory, measures, stops it."""
    with tempfile.TemporaryDirectory(prefix="loom-bench-tenants-") as tmp:
        cluster = LocalCluster(data_dir=Path(tmp), auth=True)
        try:
            await asyncio.to_thread(cluster.start_manager)
            for name in NODES:
                await asyncio.to_thread(cluster.start_node, name)
            return await _bench(
                cluster,
                quiet_rate=quiet_rate,
                noisy_writers=noisy_writers,
                noisy_quota=noisy_quota,
                duration_s=duration_s,
                rounds=rounds,
                progress=progress,
            )
        finally:
            await asyncio.to_thread(cluster.stop)


async def _noisy_main(address: str, token: str, writers: int, seconds: float) -> None:
    """The noisy tenant's process: prints what it got as one JSON line."""
    async with kv.connect(address, token=token, timeout_s=NOISY_TIMEOUT_S) as client:
        started = time.monotonic()
        noisy = _Noisy(client.keyspace("noisy-ks"), started + seconds)
        async with asyncio.TaskGroup() as group:
            for writer in range(writers):
                group.create_task(noisy.run(writer))
        elapsed = time.monotonic() - started
    result = {
        "accepted_writes_per_s": round(noisy.ok / elapsed, 1),
        "throttled": noisy.throttled,
        "other_errors": noisy.other,
    }
    print(json.dumps(result))  # the parent process reads it


if __name__ == "__main__":
    run(_noisy_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
