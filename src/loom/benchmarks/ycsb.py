"""YCSB-style closed-loop key-value benchmark, independent of the store under test.

Rules of this module:
- A store is reached only through a `Driver`; one driver per client, each its own
  connection (like one application process each), made by an async `DriverFactory`.
- Randomness is a seeded `random.Random` per client (never the global one), so the
  key and operation sequence of every client replays from `seed`.
- Keys follow YCSB's scrambled zipfian (theta 0.99, FNV-1a-64 scrambled over the
  record count); values are random bytes of a fixed size.
- Closed loop: each client issues its next operation as soon as the last one ends,
  until the deadline (monotonic clock). An operation counts if it *completes* inside
  the measured window, which follows a warm-up; its latency is recorded in a
  fixed-size log-linear histogram (bounded memory whatever the duration).
- A driver exception is an error, counted and sampled, never fatal to the loop; every
  operation is bounded by a timeout. Cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

RECORDS_DEFAULT = 10_000
RECORDS_MAX = 10_000_000
VALUE_BYTES_DEFAULT = 100
VALUE_BYTES_MAX = 64 * 1024
CLIENTS_MAX = 1024
DURATION_S_MAX = 3600.0
WARMUP_S_DEFAULT = 2.0
LOAD_CONCURRENCY_DEFAULT = 64
OP_TIMEOUT_S_DEFAULT = 10.0
ERROR_SAMPLES_MAX = 8
LOAD_PROGRESS_EVERY = 1000
KEY_PREFIX = b"user"

NS_PER_US = 1_000
US_PER_MS = 1_000.0
NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    name: str
    read_fraction: float
    update_fraction: float

    def __post_init__(self) -> None:
        assert 0.0 <= self.read_fraction <= 1.0
        assert math.isclose(self.read_fraction + self.update_fraction, 1.0)


WORKLOADS: dict[str, Workload] = {
    "A": Workload(name="A", read_fraction=0.5, update_fraction=0.5),
    "B": Workload(name="B", read_fraction=0.95, update_fraction=0.05),
    "C": Workload(name="C", read_fraction=1.0, update_fraction=0.0),
    "W": Workload(name="W", read_fraction=0.0, update_fraction=1.0),
}


class Op(Enum):
    READ = "read"
    UPDATE = "update"


def choose_op(workload: Workload, rng: random.Random) -> Op:
    return Op.READ if rng.random() < workload.read_fraction else Op.UPDATE


def key_of(index: int) -> bytes:
    return KEY_PREFIX + b"%010d" % index


def check_settings(
    *, clients: int, duration_s: float, records: int, value_bytes: int, warmup_s: float = 0.0
) -> None:
    """Rejects settings outside the limits (they come from a user: ValueError, not assert)."""
    if not 1 <= clients <= CLIENTS_MAX:
        raise ValueError(f"clients must be in 1..{CLIENTS_MAX}, not {clients}")
    if not 0 < duration_s <= DURATION_S_MAX:
        raise ValueError(f"duration_s must be in (0, {DURATION_S_MAX:g}], not {duration_s}")
    if not 0 <= warmup_s <= DURATION_S_MAX:
        raise ValueError(f"warmup_s must be in [0, {DURATION_S_MAX:g}], not {warmup_s}")
    if not 1 <= records <= RECORDS_MAX:
        raise ValueError(f"records must be in 1..{RECORDS_MAX}, not {records}")
    if not 1 <= value_bytes <= VALUE_BYTES_MAX:
        raise ValueError(f"value_bytes must be in 1..{VALUE_BYTES_MAX}, not {value_bytes}")


# --- keys: YCSB's ScrambledZipfianGenerator ---------------------------------------

ZIPFIAN_THETA = 0.99
# YCSB draws from a zipfian over 10^10 items with zeta(10^10, 0.99) precomputed, then
# scrambles the rank over the record count with FNV; the hot keys are thus spread over
# the key space instead of being the lowest indexes.
ZIPFIAN_ITEMS = 10_000_000_000
ZIPFIAN_ZETAN = 26.46902820178302
ZIPFIAN_ZETA2 = 1.0 + 0.5**ZIPFIAN_THETA  # zeta(2, theta): u * zetan below it draws rank 0 or 1
FNV_OFFSET_BASIS_64 = 0xCBF29CE484222325
FNV_PRIME_64 = 1_099_511_628_211
MASK_64 = (1 << 64) - 1


def fnv_hash64(value: int) -> int:
    """YCSB's `Utils.fnvhash64`: FNV-1a over the 8 low-order bytes, then Java's
    `Math.abs` of the signed 64-bit result."""
    hashed = FNV_OFFSET_BASIS_64
    for _ in range(8):
        hashed ^= value & 0xFF
        value >>= 8
        hashed = (hashed * FNV_PRIME_64) & MASK_64
    signed = hashed - (1 << 64) if hashed >= 1 << 63 else hashed
    return abs(signed)


class ScrambledZipfian:
    """Record indexes in [0, records), zipfian with theta 0.99 (about 3.8 % of draws hit
    the hottest record), in a seed-determined order."""

    __slots__ = ("_alpha", "_eta", "records", "rng")

    def __init__(self, records: int, rng: random.Random) -> None:
        assert records >= 1
        self.records = records
        self.rng = rng
        items = ZIPFIAN_ITEMS + 1  # YCSB's ZipfianGenerator(0, ITEM_COUNT): both ends in
        self._alpha = 1.0 / (1.0 - ZIPFIAN_THETA)
        self._eta = (1.0 - (2.0 / items) ** (1.0 - ZIPFIAN_THETA)) / (
            1.0 - ZIPFIAN_ZETA2 / ZIPFIAN_ZETAN
        )

    def _rank(self) -> int:
        u = self.rng.random()
        uz = u * ZIPFIAN_ZETAN
        if uz < 1.0:
            return 0
        if uz < ZIPFIAN_ZETA2:
            return 1
        return int((ZIPFIAN_ITEMS + 1) * (self._eta * u - self._eta + 1.0) ** self._alpha)

    def next_index(self) -> int:
        return fnv_hash64(self._rank()) % self.records


# --- latency histogram -------------------------------------------------------------

SUB_BUCKET_BITS = 7  # 128 sub-buckets per power of two: at most 1/128 ≈ 0.8 % high
LATENCY_US_MAX = (1 << 27) - 1  # ≈ 134 s; longer latencies land in the last bucket


def _bucket_of(value_us: int) -> int:
    shift = max(0, value_us.bit_length() - SUB_BUCKET_BITS - 1)
    return (shift << SUB_BUCKET_BITS) + (value_us >> shift)


def _highest_in_bucket(index: int) -> int:
    shift = max(0, (index >> SUB_BUCKET_BITS) - 1)
    top = index - (shift << SUB_BUCKET_BITS)
    return ((top + 1) << shift) - 1


BUCKETS = _bucket_of(LATENCY_US_MAX) + 1


class LatencyHistogram:
    """Log-linear (HDR-style) histogram of integer microseconds: exact below 256 µs,
    then 128 buckets per power of two; a fixed 2,688 counters however long the run."""

    __slots__ = ("_counts", "count", "max_us", "min_us")

    def __init__(self) -> None:
        self._counts = [0] * BUCKETS
        self.count = 0
        self.min_us = 0
        self.max_us = 0

    def record_us(self, value_us: int) -> None:
        assert value_us >= 0
        value_us = min(value_us, LATENCY_US_MAX)
        self._counts[_bucket_of(value_us)] += 1
        self.min_us = value_us if self.count == 0 else min(self.min_us, value_us)
        self.max_us = max(self.max_us, value_us)
        self.count += 1

    def percentile_us(self, percent: float) -> int | None:
        """Nearest-rank percentile, reported as its bucket's highest value (never below
        the true one, at most 0.8 % above), clamped to the exact min and max."""
        assert 0.0 < percent <= 100.0
        if self.count == 0:
            return None
        rank = max(1, math.ceil(percent / 100.0 * self.count))
        seen = 0
        for index, bucket_count in enumerate(self._counts):
            seen += bucket_count
            if seen >= rank:
                return max(self.min_us, min(_highest_in_bucket(index), self.max_us))
        raise AssertionError("histogram counts do not add up to its count")


# --- results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    ops: int
    reads: int
    updates: int
    errors: int
    measured_s: float
    p50_ms: float | None
    p99_ms: float | None
    error_samples: tuple[str, ...] = ()

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.measured_s if self.measured_s > 0 else 0.0

    def as_json(self) -> dict[str, object]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "ops_per_s": round(self.ops_per_s, 1),
            "p50_ms": ms(self.p50_ms),
            "p99_ms": ms(self.p99_ms),
            "errors": self.errors,
        }


def report(
    workload: Workload, clients: int, duration_s: float, loom: Stats, peer: Stats | None
) -> dict[str, object]:
    """The `loom bench kv --json` object; ratio = loom / peer ops per second."""
    ratio = None
    if peer is not None and peer.ops_per_s > 0:
        ratio = round(loom.ops_per_s / peer.ops_per_s, 3)
    return {
        "workload": workload.name,
        "clients": clients,
        "duration_s": duration_s,
        "loom": loom.as_json(),
        "peer": None if peer is None else peer.as_json(),
        "ratio": ratio,
    }


# --- the drivers and the loops ----------------------------------------------------


class Driver(Protocol):
    async def get(self, key: bytes) -> bytes | None: ...

    async def put(self, key: bytes, value: bytes) -> None: ...

    async def close(self) -> None: ...


DriverFactory = Callable[[], Awaitable[Driver]]
ClockNs = Callable[[], int]


class LoadFailed(Exception):
    """Preloading the records failed; the run would read missing keys."""


@dataclass(slots=True)
class _Tally:
    """What every client of one run adds to (one event loop: no lock needed)."""

    window_start_ns: int
    deadline_ns: int
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    reads: int = 0
    updates: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def completed(self, op: Op, start_ns: int, end_ns: int) -> None:
        if not self.window_start_ns < end_ns <= self.deadline_ns:
            return
        self.histogram.record_us((end_ns - start_ns) // NS_PER_US)
        if op is Op.READ:
            self.reads += 1
        else:
            self.updates += 1

    def failed(self, error: Exception) -> None:
        # Counted over the whole run, warm-up included: a failure is never "warm-up".
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES_MAX:
            self.error_samples.append(f"{type(error).__name__}: {error}"[:200])

    def stats(self) -> Stats:
        def ms(percent: float) -> float | None:
            value = self.histogram.percentile_us(percent)
            return None if value is None else value / US_PER_MS

        return Stats(
            ops=self.reads + self.updates,
            reads=self.reads,
            updates=self.updates,
            errors=self.errors,
            measured_s=(self.deadline_ns - self.window_start_ns) / NS_PER_S,
            p50_ms=ms(50.0),
            p99_ms=ms(99.0),
            error_samples=tuple(self.error_samples),
        )


async def _open_drivers(
    stack: AsyncExitStack, driver_factory: DriverFactory, count: int, close_timeout_s: float
) -> list[Driver]:
    """Makes `count` drivers, each closed (under a timeout) when `stack` unwinds."""

    async def close(driver: Driver) -> None:
        async with asyncio.timeout(close_timeout_s):
            await driver.close()

    drivers: list[Driver] = []
    for _ in range(count):
        driver = await driver_factory()
        stack.push_async_callback(close, driver)
        drivers.append(driver)
    return drivers


def _rng(purpose: str, seed: int, number: int) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: stable across runs and processes.
    return random.Random(f"{purpose}:{seed}:{number}")


async def _client_loop(
    driver: Driver,
    workload: Workload,
    keys: ScrambledZipfian,
    value_bytes: int,
    tally: _Tally,
    *,
    op_timeout_s: float,
    clock_ns: ClockNs,
) -> None:
    rng = keys.rng
    while clock_ns() < tally.deadline_ns:
        op = choose_op(workload, rng)
        key = key_of(keys.next_index())
        value = rng.randbytes(value_bytes) if op is Op.UPDATE else b""
        start_ns = clock_ns()
        try:
            async with asyncio.timeout(op_timeout_s):
                if op is Op.READ:
                    await driver.get(key)
                else:
                    await driver.put(key, value)
        except Exception as error:  # noqa: BLE001 - any driver failure is counted, not fatal
            tally.failed(error)
            await asyncio.sleep(0)  # a driver failing without awaiting must not starve others
            continue
        tally.completed(op, start_ns, clock_ns())


async def run(
    driver_factory: DriverFactory,
    workload: Workload,
    *,
    clients: int,
    duration_s: float,
    records: int,
    value_bytes: int,
    seed: int,
    warmup_s: float = WARMUP_S_DEFAULT,
    op_timeout_s: float = OP_TIMEOUT_S_DEFAULT,
    clock_ns: ClockNs = time.monotonic_ns,
) -> Stats:
    """`clients` concurrent closed-loop clients, each with its own driver, for `warmup_s`
    unmeasured then `duration_s` measured seconds. Drivers are made before the clock
    starts and closed after the last client stops."""
    check_settings(
        clients=clients,
        duration_s=duration_s,
        records=records,
        value_bytes=value_bytes,
        warmup_s=warmup_s,
    )
    async with AsyncExitStack() as stack:
        drivers = await _open_drivers(stack, driver_factory, clients, op_timeout_s)
        start_ns = clock_ns()
        window_start_ns = start_ns + round(warmup_s * NS_PER_S)
        tally = _Tally(window_start_ns, window_start_ns + round(duration_s * NS_PER_S))
        async with asyncio.TaskGroup() as group:
            for client, driver in enumerate(drivers):
                keys = ScrambledZipfian(records, _rng("run", seed, client))
                loop = _client_loop(
                    driver,
                    workload,
                    keys,
                    value_bytes,
                    tally,
                    op_timeout_s=op_timeout_s,
                    clock_ns=clock_ns,
                )
                group.create_task(loop, name=f"ycsb-client-{client}")
    return tally.stats()


async def load(
    driver_factory: DriverFactory,
    records: int,
    value_bytes: int,
    concurrency: int = LOAD_CONCURRENCY_DEFAULT,
    *,
    seed: int = 0,
    op_timeout_s: float = OP_TIMEOUT_S_DEFAULT,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Puts every record once, `concurrency` drivers at a time; raises `LoadFailed` on
    the first failed put (after the other workers stop)."""
    check_settings(clients=concurrency, duration_s=1.0, records=records, value_bytes=value_bytes)
    indexes = iter(range(records))  # shared by the workers: each index is taken once
    failures: list[str] = []
    done = 0

    async def worker(driver: Driver, rng: random.Random) -> None:
        nonlocal done
        for index in indexes:
            if failures:
                return
            try:
                async with asyncio.timeout(op_timeout_s):
                    await driver.put(key_of(index), rng.randbytes(value_bytes))
            except Exception as error:  # noqa: BLE001 - reported as LoadFailed below
                failures.append(f"put of {key_of(index)!r} failed: {type(error).__name__}: {error}")
                return
            done += 1
            if progress is not None and done % LOAD_PROGRESS_EVERY == 0:
                progress(done)

    async with AsyncExitStack() as stack:
        workers = await _open_drivers(
            stack, driver_factory, min(concurrency, records), op_timeout_s
        )
        async with asyncio.TaskGroup() as group:
            for number, driver in enumerate(workers):
                group.create_task(worker(driver, _rng("load", seed, number)))
    if failures:
        raise LoadFailed(failures[0])
    if progress is not None:
        progress(done)
