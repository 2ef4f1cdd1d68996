"""`loom bench kv`: YCSB-style workloads against a fresh local loom cluster and,
optionally, the same workload with the same seed against a local 3-member etcd.

Rules of this module:
- Each system gets a fresh cluster of real processes in a temporary directory, and
  they run one after the other, never together (the machine has few cores): loom is
  started, loaded, measured and stopped before etcd starts.
- Every process is a child we started and is stopped by PID when its phase ends, on
  an error or a cancellation too (Ctrl-C; the CLI turns SIGTERM into one as well).
- The loom driver is the public client library: one `kv.Client` per driver, hence its
  own connections, like one application process each. `get` is a STRONG read and
  `put` a QUORUM write, the client's defaults.
- Progress goes to the `progress` callback (the CLI prints it on stderr); the result is
  `ycsb.report(...)`, nothing else.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from loom import kv
from loom.benchmarks import ycsb
from loom.benchmarks.etcd_peer import EtcdCluster, EtcdDrivers
from loom.runtime.localcluster import LocalCluster

NODES = ("n1", "n2", "n3")
KEYSPACE = "ycsb"
REPLICATION = 3
SHARDS_DEFAULT = 3  # one p-shard led by each of the three nodes
SHARDS_MAX = 64
SEED_DEFAULT = 1
# Bounds every request of one driver, retries included (like the harness's op timeout).
CLIENT_TIMEOUT_S = ycsb.OP_TIMEOUT_S_DEFAULT
SETUP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 8

# "loom-tls": the same loom cluster with TLS on every connection (ADR 0015).
PEERS = ("etcd", "loom-tls")
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """One `loom bench kv` run, checked once (values come from a user)."""

    workload: ycsb.Workload
    clients: int
    duration_s: float
    records: int
    value_bytes: int
    shards: int = SHARDS_DEFAULT
    warmup_s: float = ycsb.WARMUP_S_DEFAULT
    seed: int = SEED_DEFAULT

    def check(self) -> None:
        ycsb.check_settings(
            clients=self.clients,
            duration_s=self.duration_s,
            records=self.records,
            value_bytes=self.value_bytes,
            warmup_s=self.warmup_s,
        )
        if not 1 <= self.shards <= SHARDS_MAX:
            raise ValueError(f"shards must be in 1..{SHARDS_MAX}, not {self.shards}")


class LoomDriver:
    """One `kv.Client` (its own routing table and connections) on the benchmark's
    keyspace: STRONG gets, QUORUM puts."""

    def __init__(self, client: kv.Client, keyspace: str) -> None:
        self._client = client
        self._keyspace = client.keyspace(keyspace)

    @classmethod
    async def connect(cls, address: str, keyspace: str, tls: kv.TlsConfig | None = None) -> Self:
        client = await kv.connect(address, timeout_s=CLIENT_TIMEOUT_S, tls=tls)
        return cls(client, keyspace)

    async def get(self, key: bytes) -> bytes | None:
        item = await self._keyspace.get(key, consistency=kv.STRONG)
        return None if item is None else item.value

    async def put(self, key: bytes, value: bytes) -> None:
        await self._keyspace.put(key, value, durability=kv.QUORUM)

    async def close(self) -> None:
        await self._client.close()


class LoomDrivers:
    """A `DriverFactory`: each call connects a new `LoomDriver` through the manager."""

    def __init__(
        self, address: str, keyspace: str = KEYSPACE, tls: kv.TlsConfig | None = None
    ) -> None:
        self.address = address
        self.keyspace = keyspace
        self.tls = tls

    async def __call__(self) -> ycsb.Driver:
        return await LoomDriver.connect(self.address, self.keyspace, self.tls)


async def run_kv_bench(
    workload: ycsb.Workload,
    *,
    clients: int,
    duration_s: float,
    records: int,
    value_bytes: int,
    peer: str | None,
    shards: int = SHARDS_DEFAULT,
    progress: Progress = lambda _: None,
    warmup_s: float = ycsb.WARMUP_S_DEFAULT,
    seed: int = SEED_DEFAULT,
) -> dict[str, object]:
    """Loom, then (with `peer`) etcd, each fresh, loaded and measured; the report of
    `loom bench kv --json`. Raises ValueError on settings outside the limits."""
    settings = Settings(
        workload=workload,
        clients=clients,
        duration_s=duration_s,
        records=records,
        value_bytes=value_bytes,
        shards=shards,
        warmup_s=warmup_s,
        seed=seed,
    )
    settings.check()
    if peer is not None and peer not in PEERS:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}, not {peer!r}")
    with tempfile.TemporaryDirectory(prefix="loom-bench-kv-") as tmp:
        loom_stats = await measure_loom(settings, Path(tmp) / "loom", progress)
        peer_stats = None
        if peer == "etcd":
            peer_stats = await measure_etcd(settings, Path(tmp) / "etcd", progress)
        elif peer == "loom-tls":
            peer_stats = await measure_loom(settings, Path(tmp) / "loom-tls", progress, tls=True)
    return ycsb.report(workload, clients, duration_s, loom_stats, peer_stats)


async def measure_loom(
    settings: Settings, data_dir: Path, progress: Progress, *, tls: bool = False
) -> ycsb.Stats:
    """A manager and three nodes, a keyspace of `settings.shards` p-shards, the records
    loaded, the workload run; the processes stopped by PID whatever happens. `tls`: every
    connection with TLS (clients verify the cluster with its CA)."""
    cluster = LocalCluster(data_dir=data_dir, tls=tls)
    name = "loom-tls" if tls else "loom"
    try:
        started = time.monotonic()
        await _start(cluster)
        client_tls = cluster.client_tls()
        async with kv.connect(
            cluster.manager_address, timeout_s=SETUP_TIMEOUT_S, tls=client_tls
        ) as admin:
            await admin.create_keyspace(KEYSPACE, shards=settings.shards, replication=REPLICATION)
            progress(
                f"{name}: manager + {len(NODES)} nodes, keyspace of {settings.shards} "
                f"p-shards ready in {time.monotonic() - started:.1f} s; {_primaries(admin)}"
            )
        drivers = LoomDrivers(cluster.manager_address, tls=client_tls)
        stats = await _load_and_run(name, drivers, settings, progress)
        if cluster.exited():
            progress(f"{name}: processes exited during the run: {cluster.exited()}")
        return stats
    except Exception:
        # The logs go with the temporary directory: show their ends before they do.
        for name in ("sm", *NODES):
            progress(f"loom: --- end of {name}'s log:\n{_log_tail(data_dir, name)}")
        raise
    finally:
        # Synchronous on purpose: it must finish even while the task is being cancelled.
        cluster.stop()


async def _start(cluster: LocalCluster) -> None:
    """Starts the processes in a thread (spawning waits for each to listen); a
    cancellation waits for that thread, so every child it started is known to `stop`."""

    def start() -> None:
        cluster.start_manager()
        for name in NODES:
            cluster.start_node(name)

    starting = asyncio.ensure_future(asyncio.to_thread(start))
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        await asyncio.wait([starting])
        raise


def _log_tail(data_dir: Path, name: str) -> str:
    try:
        lines = (data_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _primaries(client: kv.Client) -> str:
    shards = [s for s in client.router.table.shards if s.keyspace == KEYSPACE]
    return "primaries " + ", ".join(f"p{s.shard}={s.primary}" for s in shards)


async def measure_etcd(settings: Settings, data_dir: Path, progress: Progress) -> ycsb.Stats:
    """A fresh 3-member etcd (its defaults: WAL fsync per commit), every driver on the
    raft leader (as loom's go to the primaries); stopped by PID at the end."""
    started = time.monotonic()
    async with EtcdCluster(data_dir) as cluster:
        drivers = await EtcdDrivers.for_cluster(cluster, "leader")
        progress(f"etcd: 3 members healthy in {time.monotonic() - started:.1f} s")
        return await _load_and_run("etcd", drivers, settings, progress)


async def _load_and_run(
    name: str, drivers: ycsb.DriverFactory, settings: Settings, progress: Progress
) -> ycsb.Stats:
    started = time.monotonic()
    shown = [-1]

    def loaded(done: int) -> None:
        if done != shown[0]:  # the harness reports the final count twice
            shown[0] = done
            progress(f"{name}: loaded {done}/{settings.records}")

    await ycsb.load(
        drivers, settings.records, settings.value_bytes, seed=settings.seed, progress=loaded
    )
    progress(
        f"{name}: load took {time.monotonic() - started:.1f} s; workload "
        f"{settings.workload.name}, {settings.clients} clients, "
        f"{settings.warmup_s:g} s warm-up + {settings.duration_s:g} s"
    )
    wall_started, cpu_started = time.monotonic(), time.process_time()
    stats = await ycsb.run(
        drivers,
        settings.workload,
        clients=settings.clients,
        duration_s=settings.duration_s,
        records=settings.records,
        value_bytes=settings.value_bytes,
        seed=settings.seed,
        warmup_s=settings.warmup_s,
    )
    # Near 1.0 the benchmark process itself (client side) is the limit, not the server.
    harness_cpu = (time.process_time() - cpu_started) / (time.monotonic() - wall_started)
    progress(
        f"{name}: {stats.ops_per_s:,.0f} ops/s ({stats.reads} reads, {stats.updates} "
        f"updates), p50 {stats.p50_ms} ms, p99 {stats.p99_ms} ms, {stats.errors} errors; "
        f"client process cpu {harness_cpu:.2f}"
    )
    for sample in stats.error_samples:
        progress(f"{name}: error: {sample}")
    return stats
