"""Committed operations per second of ONE p-shard driven through the real core.

    .venv/bin/python -m bench.core_bench [--seconds 12] [--store memory|rocks|both]
    .venv/bin/python -m bench.core_bench --growth [--seconds 12]

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
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.cluster import NODES, Cluster, Store
from loom.core.hashing import ushard_of
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq
from loom.host.requests import Consistency, ReadReply, ReadRequest, WriteReply, WriteRequest
from loom.kvstate.commands import Applied, Put, encode_command
from loom.paxos.params import ReplicaParams
from loom.storage.memory import MemoryStore
from loom.storage.rocks import RocksStore

CLIENT = ClientId("bench")
USHARDS = 4096
VALUE = b"v" * 100
REQUESTS_PER_FLUSH = (1, 16, 128)
STORE_KINDS = ("memory", "rocks")
# Closed-loop rounds per phase, whatever the time budget: the count bound of every loop.
ROUNDS_PER_PHASE_MAX = 1_000_000
# Keys stored before the read phases, written PREFILL_PER_FLUSH per round.
KEYS_FOR_READS = 4096
PREFILL_PER_FLUSH = 128

Kind = Literal["write", "read"]


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
    # CPU time of this process over wall time: below ~0.9 with a MemoryStore means
    # other processes took the CPU (the figure is then low); with RocksDB, fsync waits.
    cpu_share: float
    # Good replies per second of this process's CPU time: steadier than ops_per_s when
    # the machine is shared; with RocksDB it leaves out the fsync waits.
    ops_per_cpu_s: float
    seconds: float


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
    kind: Kind,
    requests_per_flush: int,
    seconds: float,
) -> CoreFigure:
    """Closed loop for `seconds`: submit B requests, pump until idle, count good replies.

    A good reply: `Applied` for a write, a found item for a read; anything else is an
    error. Building the requests (the client's share) is inside the timed loop.
    """
    make: Callable[[], WriteRequest | ReadRequest] = (
        workload.write if kind == "write" else workload.read
    )
    is_good: Callable[[object], bool] = (
        (lambda r: isinstance(r, WriteReply) and isinstance(r.result, Applied))
        if kind == "write"
        else (lambda r: isinstance(r, ReadReply) and r.item is not None)
    )
    counters = cluster.counters
    flushes_before, syncs_before = counters.flushes, counters.syncs
    ok = errors = rounds = 0
    round_ms: list[float] = []
    started = time.perf_counter()
    cpu_started = time.process_time()
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
    cpu_s = time.process_time() - cpu_started
    return CoreFigure(
        store=store,
        workload="put QUORUM" if kind == "write" else "get STRONG",
        requests_per_flush=requests_per_flush,
        ops_per_s=ok / elapsed,
        ops=ok,
        errors=errors,
        round_p50_ms=statistics.median(round_ms) if round_ms else 0.0,
        round_p99_ms=_percentile(round_ms, 0.99),
        fsyncs_per_round=(counters.syncs - syncs_before) / max(rounds, 1),
        flushes_per_round=(counters.flushes - flushes_before) / max(rounds, 1),
        cpu_share=cpu_s / elapsed,
        ops_per_cpu_s=ok / cpu_s if cpu_s > 0 else 0.0,
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
    """Every (store, workload, B) phase, spending about `seconds` in all.

    Each write phase starts on a fresh cluster: a MemoryStore's inserts slow down as it
    grows (see `growth`), so sharing one cluster would penalise whichever B ran last.
    """
    phases = len(stores) * len(REQUESTS_PER_FLUSH) * 2
    phase_seconds = seconds / phases
    figures: list[CoreFigure] = []
    for store in stores:
        for batch in REQUESTS_PER_FLUSH:
            with running_cluster(store, directory) as cluster:
                figures.append(
                    run_phase(
                        cluster,
                        Workload(),
                        store=store,
                        kind="write",
                        requests_per_flush=batch,
                        seconds=phase_seconds,
                    )
                )
        with running_cluster(store, directory) as cluster:
            workload = Workload()
            write_keys(cluster, workload, KEYS_FOR_READS)
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


def write_keys(cluster: Cluster, workload: Workload, keys: int) -> None:
    """Store `keys` keys, 128 per round, for the read phases to read."""
    for _ in range(keys // PREFILL_PER_FLUSH + 1):
        if len(workload.keys_written) >= keys:
            return
        for _ in range(PREFILL_PER_FLUSH):
            cluster.submit(workload.write())
        cluster.pump()
        cluster.take_replies()


@dataclass(frozen=True, slots=True, kw_only=True)
class GrowthSlice:
    keys_per_store: int
    ops_per_s: float


def growth(seconds: float, slices: int = 8, requests_per_flush: int = 128) -> list[GrowthSlice]:
    """Put throughput over MemoryStores as they fill: one cluster, `slices` phases in a row."""
    figures = []
    with running_cluster("memory") as cluster:
        workload = Workload()
        for _ in range(slices):
            figure = run_phase(
                cluster,
                workload,
                store="memory",
                kind="write",
                requests_per_flush=requests_per_flush,
                seconds=seconds / slices,
            )
            store = cluster.stores[NODES[0]]
            assert isinstance(store, MemoryStore)
            figures.append(GrowthSlice(keys_per_store=len(store), ops_per_s=figure.ops_per_s))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=12.0, help="total time budget")
    parser.add_argument("--store", choices=(*STORE_KINDS, "both"), default="both")
    parser.add_argument(
        "--growth", action="store_true", help="only: put/s over MemoryStores as they fill"
    )
    arguments = parser.parse_args()
    if arguments.growth:
        for piece in growth(arguments.seconds):
            print(f"{piece.keys_per_store:>9,} keys/store  {piece.ops_per_s:>10,.0f} puts/s")
        return
    stores = STORE_KINDS if arguments.store == "both" else (arguments.store,)
    for figure in run(arguments.seconds, stores):
        print(
            f"{figure.store:<7} {figure.workload:<20} B={figure.requests_per_flush:<4}"
            f" {figure.ops_per_s:>10,.0f} ops/s  p50 {figure.round_p50_ms:.2f} ms"
            f"  p99 {figure.round_p99_ms:.2f} ms  cpu {figure.cpu_share:.0%}"
            f"  {figure.ops_per_cpu_s:,.0f} ops/cpu-s"
            f"  errors {figure.errors}"
        )


if __name__ == "__main__":
    main()
