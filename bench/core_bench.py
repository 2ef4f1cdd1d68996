"""Committed operations per second of ONE p-shard driven through the real core.

    .venv/bin/python -m bench.core_bench [--seconds 12] [--store memory|rocks|both]

Three replicas (bench.cluster) over MemoryStores or RocksStores (one directory per
replica; `sync()` is a real fsync there). A closed loop: submit B requests to the
primary, pump until every host is idle, count the replies. B = 1, 16, 128 writes per
flush shows group commit. Measured per B:
- QUORUM `Put`s of 100-byte values to fresh keys: a reply is counted when its
  `WriteReply` is `Applied` (the entry committed on a majority and applied);
- STRONG reads of keys written before: served under the primary's lease.
A measurement, never a test: nothing asserts a time. Every loop stops by count and time.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loom.core.hashing import ushard_of
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq
from loom.host.requests import Consistency, ReadReply, ReadRequest, WriteReply, WriteRequest
from loom.kv.commands import Applied, Put, encode_command
from loom.paxos.params import ReplicaParams
from loom.storage.memory import MemoryStore
from loom.storage.rocks import RocksStore

from bench.cluster import NODES, Cluster, Store

CLIENT = ClientId("bench")
USHARDS = 4096
VALUE = b"v" * 100
REQUESTS_PER_FLUSH = (1, 16, 128)
STORE_KINDS = ("memory", "rocks")
# Closed-loop rounds per phase, whatever the time budget: the count bound of every loop.
ROUNDS_PER_PHASE_MAX = 1_000_000
# A read phase reads keys the write phases stored; written first when there are none.
KEYS_FOR_READS_MIN = 1024
PROFILE_TOP = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreFigure:
    store: str
    workload: str
    requests_per_flush: int
    ops_per_s: float
    ops: int
    errors: int
    # Wall time of one closed-loop round (submit B, pump until idle).
    round_p50_ms: float
    round_p99_ms: float
    fsyncs_per_round: float
    flushes_per_round: float
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HotSpot:
    function: str
    calls: str
    own_s: float
    own_share: float
    cumulative_s: float


class Workload:
    """Fresh keys and request ids for writes; the keys written so far for reads."""

    def __init__(self) -> None:
        self._requests = itertools.count(1)
        self.keys_written: list[bytes] = []
        self._read_cursor = 0

    def write(self) -> WriteRequest:
        number = next(self._requests)
        key = b"key-%010d" % number
        self.keys_written.append(key)
        command = Put(
            request=RequestId(CLIENT, RequestSeq(number)),
            ushard=ushard_of(key, USHARDS),
            key=key,
            value=VALUE,
        )
        return WriteRequest(token=number, command=encode_command(command))

    def read(self) -> ReadRequest:
        assert self.keys_written, "reads need written keys"
        # A fixed stride through the keys written: deterministic, not cache-friendly.
        self._read_cursor = (self._read_cursor + 7919) % len(self.keys_written)
        key = self.keys_written[self._read_cursor]
        return ReadRequest(
            token=next(self._requests),
            ushard=ushard_of(key, USHARDS),
            key=key,
            consistency=Consistency.STRONG,
        )


def _percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_phase(
    cluster: Cluster,
    workload: Workload,
    *,
    store: str,
    kind: str,
    requests_per_flush: int,
    seconds: float,
) -> CoreFigure:
    """Closed loop for `seconds`: submit B requests, pump until idle, count good replies."""
    make: Callable[[], WriteRequest | ReadRequest] = (
        workload.write if kind == "write" else workload.read
    )
    is_good: Callable[[object], bool] = (
        (lambda r: isinstance(r, WriteReply) and isinstance(r.result, Applied))
        if kind == "write"
        else (lambda r: isinstance(r, ReadReply))
    )
    counters = cluster.counters
    flushes_before, syncs_before = counters.flushes, counters.syncs
    ok = errors = rounds = 0
    round_ms: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    for _ in range(ROUNDS_PER_PHASE_MAX):
        round_started = time.perf_counter()
        if round_started >= deadline:
            break
        for _ in range(requests_per_flush):
            cluster.submit(make())
        cluster.maybe_tick()
        cluster.pump()
        for reply in cluster.take_replies():
            if is_good(reply):
                ok += 1
            else:
                errors += 1
        rounds += 1
        round_ms.append((time.perf_counter() - round_started) * 1000.0)
    elapsed = time.perf_counter() - started
    return CoreFigure(
        store=store,
        workload="put QUORUM" if kind == "write" else "get STRONG (lease)",
        requests_per_flush=requests_per_flush,
        ops_per_s=ok / elapsed,
        ops=ok,
        errors=errors,
        round_p50_ms=statistics.median(round_ms) if round_ms else 0.0,
        round_p99_ms=_percentile(round_ms, 0.99),
        fsyncs_per_round=(counters.syncs - syncs_before) / max(rounds, 1),
        flushes_per_round=(counters.flushes - flushes_before) / max(rounds, 1),
        seconds=elapsed,
    )


@contextmanager
def running_cluster(store: str, directory: str | None = None) -> Iterator[Cluster]:
    """An activated cluster over fresh stores of `store` kind; closed on exit."""
    with tempfile.TemporaryDirectory(prefix="loom-core-bench-", dir=directory) as tmp:
        stores: dict[NodeId, Store] = {}
        for node in NODES:
            if store == "memory":
                stores[node] = MemoryStore()
            else:
                stores[node] = RocksStore(str(Path(tmp) / node))
        cluster = Cluster(stores=stores, params=ReplicaParams())
        try:
            cluster.activate()
            yield cluster
        finally:
            cluster.close()


def run(
    seconds: float, stores: tuple[str, ...] = STORE_KINDS, directory: str | None = None
) -> list[CoreFigure]:
    """Every (store, workload, B) phase, spending about `seconds` in all."""
    phases = len(stores) * len(REQUESTS_PER_FLUSH) * 2
    phase_seconds = seconds / phases
    figures: list[CoreFigure] = []
    for store in stores:
        with running_cluster(store, directory) as cluster:
            workload = Workload()
            for batch in REQUESTS_PER_FLUSH:
                figures.append(
                    run_phase(
                        cluster,
                        workload,
                        store=store,
                        kind="write",
                        requests_per_flush=batch,
                        seconds=phase_seconds,
                    )
                )
            _ensure_keys(cluster, workload)
            for batch in REQUESTS_PER_FLUSH:
                figures.append(
                    run_phase(
                        cluster,
                        workload,
                        store=store,
                        kind="read",
                        requests_per_flush=batch,
                        seconds=phase_seconds,
                    )
                )
    return figures


def _ensure_keys(cluster: Cluster, workload: Workload) -> None:
    for _ in range(KEYS_FOR_READS_MIN):
        if len(workload.keys_written) >= KEYS_FOR_READS_MIN:
            return
        cluster.submit(workload.write())
        cluster.pump()
        cluster.take_replies()


def profile(seconds: float, requests_per_flush: int = 16) -> list[HotSpot]:
    """Where the time goes: QUORUM puts over MemoryStores under cProfile, top by own time."""
    with running_cluster("memory") as cluster:
        workload = Workload()
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run_phase(
                cluster,
                workload,
                store="memory",
                kind="write",
                requests_per_flush=requests_per_flush,
                seconds=seconds,
            )
        finally:
            profiler.disable()
    return hot_spots(profiler, PROFILE_TOP)


def hot_spots(profiler: cProfile.Profile, top: int) -> list[HotSpot]:
    profile_stats = pstats.Stats(profiler).get_stats_profile()
    total = profile_stats.total_tt or 1.0
    ranked = sorted(
        profile_stats.func_profiles.items(), key=lambda item: item[1].tottime, reverse=True
    )
    spots = []
    for name, func in ranked[:top]:
        where = f"{_short_path(func.file_name)}:{func.line_number}"
        spots.append(
            HotSpot(
                function=f"{name} ({where})",
                calls=func.ncalls,
                own_s=func.tottime,
                own_share=func.tottime / total,
                cumulative_s=func.cumtime,
            )
        )
    return spots


def _short_path(file_name: str) -> str:
    for marker in ("/src/", "/site-packages/", "/lib/python"):
        if marker in file_name:
            return file_name.split(marker, 1)[1]
    return file_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=12.0, help="total time budget")
    parser.add_argument("--store", choices=(*STORE_KINDS, "both"), default="both")
    arguments = parser.parse_args()
    stores = STORE_KINDS if arguments.store == "both" else (arguments.store,)
    for figure in run(arguments.seconds, stores):
        print(
            f"{figure.store:<7} {figure.workload:<20} B={figure.requests_per_flush:<4}"
            f" {figure.ops_per_s:>10,.0f} ops/s  p50 {figure.round_p50_ms:.2f} ms"
            f"  p99 {figure.round_p99_ms:.2f} ms  errors {figure.errors}"
        )


if __name__ == "__main__":
    main()
