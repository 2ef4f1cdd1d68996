"""The YCSB harness without a store: key skew, operation mix, the latency histogram,
and the closed loop against an in-memory driver on a virtual clock (no sleeps)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from loom.benchmarks import ycsb
from loom.benchmarks.ycsb import (
    WORKLOADS,
    LatencyHistogram,
    Op,
    ScrambledZipfian,
    Stats,
    choose_op,
    fnv_hash64,
    report,
)

DRAWS = 100_000


def draws(records: int, seed: int, count: int = DRAWS) -> list[int]:
    keys = ScrambledZipfian(records, random.Random(seed))
    return [keys.next_index() for _ in range(count)]


def test_zipfian_keys_stay_in_range_and_hit_most_of_a_small_key_space() -> None:
    indexes = draws(1000, seed=1)
    assert min(indexes) >= 0
    assert max(indexes) < 1000
    assert len(set(indexes)) > 900


def test_zipfian_hottest_key_gets_a_large_share_like_ycsb() -> None:
    counts = Counter(draws(10_000, seed=2)).most_common()
    hottest_share = counts[0][1] / DRAWS
    top_ten_share = sum(n for _, n in counts[:10]) / DRAWS
    # theta 0.99 over 10^10 items: rank 0 draws 1/zeta ≈ 3.8 %, the top ten ≈ 11 %
    # (uniform would give 0.01 % and 0.1 %).
    assert 0.03 < hottest_share < 0.05
    assert 0.09 < top_ten_share < 0.14


def test_zipfian_is_scrambled_so_the_hot_keys_are_not_the_lowest_indexes() -> None:
    hottest = [index for index, _ in Counter(draws(10_000, seed=3)).most_common(5)]
    assert sorted(hottest) != [0, 1, 2, 3, 4]


def test_zipfian_sequence_is_deterministic_for_a_seed() -> None:
    assert draws(5000, seed=7, count=1000) == draws(5000, seed=7, count=1000)
    assert draws(5000, seed=7, count=1000) != draws(5000, seed=8, count=1000)


def fnv1a_64(data: bytes) -> int:
    hashed = 0xCBF29CE484222325
    for byte in data:
        hashed = ((hashed ^ byte) * 0x100000001B3) % 2**64
    return hashed


def test_reference_fnv1a_matches_the_published_test_vectors() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("value", [0, 1, 255, 256, 12345, 2**40 + 7, 10_000_000_000])
def test_fnv_hash64_is_ycsbs_fnv1a_of_eight_little_endian_bytes_then_java_abs(
    value: int,
) -> None:
    hashed = fnv1a_64(value.to_bytes(8, "little"))
    signed = hashed - 2**64 if hashed >= 2**63 else hashed
    assert fnv_hash64(value) == abs(signed)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_operation_mix_follows_the_workload(name: str) -> None:
    workload = WORKLOADS[name]
    rng = random.Random(11)
    reads = sum(choose_op(workload, rng) is Op.READ for _ in range(DRAWS))
    assert abs(reads / DRAWS - workload.read_fraction) < 0.01


def test_workloads_are_ycsb_a_b_c_and_write_only() -> None:
    assert {n: (w.read_fraction, w.update_fraction) for n, w in WORKLOADS.items()} == {
        "A": (0.5, 0.5),
        "B": (0.95, 0.05),
        "C": (1.0, 0.0),
        "W": (0.0, 1.0),
    }


def nearest_rank(values: list[int], percent: float) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_histogram_percentiles_match_a_sorted_list_within_its_precision(seed: int) -> None:
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(20_000)] + [0, 1, 255, 256]
    histogram = LatencyHistogram()
    for value in values:
        histogram.record_us(value)
    for percent in (1, 50, 90, 99, 99.9, 100):
        exact = nearest_rank(values, percent)
        reported = histogram.percentile_us(percent)
        assert reported is not None
        assert exact <= reported <= exact * (1 + 1 / 128), (percent, exact, reported)


def test_histogram_is_exact_below_256_us_and_empty_has_no_percentile() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile_us(50) is None
    for value in range(256):
        histogram.record_us(value)
    assert histogram.percentile_us(50) == 127
    assert histogram.percentile_us(100) == 255


def test_histogram_clamps_huge_latencies_into_its_last_bucket() -> None:
    histogram = LatencyHistogram()
    histogram.record_us(10**12)
    assert histogram.percentile_us(100) == ycsb.LATENCY_US_MAX


def test_report_has_exactly_the_cli_json_shape() -> None:
    loom = Stats(ops=3000, reads=0, updates=3000, errors=1, measured_s=1.0, p50_ms=1.0, p99_ms=5.0)
    peer = Stats(ops=1500, reads=0, updates=1500, errors=0, measured_s=1.0, p50_ms=2.0, p99_ms=9.0)
    assert report(WORKLOADS["W"], 64, 10.0, loom, peer) == {
        "workload": "W",
        "clients": 64,
        "duration_s": 10.0,
        "loom": {"ops_per_s": 3000.0, "p50_ms": 1.0, "p99_ms": 5.0, "errors": 1},
        "peer": {"ops_per_s": 1500.0, "p50_ms": 2.0, "p99_ms": 9.0, "errors": 0},
        "ratio": 2.0,
    }
    alone = report(WORKLOADS["C"], 8, 1.0, loom, None)
    assert alone["peer"] is None
    assert alone["ratio"] is None


# --- the closed loop on a virtual clock ---------------------------------------------

OP_NS = 1_000_000  # each fake operation takes 1 ms of virtual time


@dataclass
class VirtualClock:
    now_ns: int = 0

    def __call__(self) -> int:
        return self.now_ns


@dataclass
class FakeStore:
    clock: VirtualClock
    data: dict[bytes, bytes] = field(default_factory=dict)
    fail_every: int = 0
    calls: int = 0
    drivers_made: int = 0
    drivers_closed: int = 0


class FakeDriver:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def _tick(self) -> None:
        self.store.calls += 1
        number = self.store.calls
        await asyncio.sleep(0)
        self.store.clock.now_ns += OP_NS
        if self.store.fail_every and number % self.store.fail_every == 0:
            raise ConnectionError(f"injected failure {number}")

    async def get(self, key: bytes) -> bytes | None:
        await self._tick()
        return self.store.data.get(key)

    async def put(self, key: bytes, value: bytes) -> None:
        await self._tick()
        self.store.data[key] = value

    async def close(self) -> None:
        self.store.drivers_closed += 1


def factory(store: FakeStore) -> ycsb.DriverFactory:
    async def make() -> ycsb.Driver:
        store.drivers_made += 1
        return FakeDriver(store)

    return make


def run_on(store: FakeStore, workload: str, *, clients: int, warmup_s: float) -> Stats:
    return asyncio.run(
        ycsb.run(
            factory(store),
            WORKLOADS[workload],
            clients=clients,
            duration_s=1.0,
            records=100,
            value_bytes=10,
            seed=5,
            warmup_s=warmup_s,
            clock_ns=store.clock,
        )
    )


def test_run_counts_only_operations_completed_after_the_warm_up_and_by_the_deadline() -> None:
    store = FakeStore(clock=VirtualClock())
    stats = run_on(store, "A", clients=1, warmup_s=0.5)
    # Operations end at 1, 2, ... 1500 ms; the window is (500 ms, 1500 ms].
    assert store.calls == 1500
    assert store.clock.now_ns == 1500 * OP_NS
    assert stats.ops == 1000
    assert stats.measured_s == 1.0
    assert stats.ops_per_s == 1000.0
    assert stats.p50_ms == 1.0
    assert stats.p99_ms == 1.0
    assert stats.errors == 0
    assert stats.reads + stats.updates == stats.ops


def test_run_gives_each_client_its_own_driver_and_closes_them_all() -> None:
    store = FakeStore(clock=VirtualClock())
    run_on(store, "B", clients=8, warmup_s=0.0)
    assert store.drivers_made == 8
    assert store.drivers_closed == 8


def test_run_stops_issuing_at_the_deadline_with_many_clients() -> None:
    store = FakeStore(clock=VirtualClock())
    stats = run_on(store, "A", clients=8, warmup_s=0.2)
    # Every client may have one operation in flight when the clock passes 1.2 s.
    assert 1200 <= store.calls <= 1200 + 8
    assert 990 <= stats.ops <= 1000


def test_run_counts_driver_errors_without_stopping_and_keeps_few_samples() -> None:
    store = FakeStore(clock=VirtualClock(), fail_every=10)
    stats = run_on(store, "A", clients=2, warmup_s=0.0)
    # The second client's last operation may end just past the deadline (at 1001 ms).
    assert store.calls in (1000, 1001)
    assert stats.errors == 100
    assert stats.ops == 900
    assert len(stats.error_samples) == ycsb.ERROR_SAMPLES_MAX
    assert stats.error_samples[0].startswith("ConnectionError: injected failure")
    assert stats.as_json()["errors"] == 100


def test_run_mix_of_workload_b_is_95_percent_reads() -> None:
    store = FakeStore(clock=VirtualClock())
    stats = run_on(store, "B", clients=4, warmup_s=0.0)
    assert stats.ops > 900
    assert abs(stats.reads / stats.ops - 0.95) < 0.03


def test_run_with_a_never_answering_driver_counts_timeouts() -> None:
    class Hung:
        async def get(self, key: bytes) -> bytes | None:
            await asyncio.Event().wait()
            return None

        async def put(self, key: bytes, value: bytes) -> None:
            await asyncio.Event().wait()

        async def close(self) -> None:
            return None

    async def make() -> ycsb.Driver:
        return Hung()

    stats = asyncio.run(
        ycsb.run(
            make,
            WORKLOADS["A"],
            clients=2,
            duration_s=0.05,
            records=10,
            value_bytes=1,
            seed=1,
            warmup_s=0.0,
            op_timeout_s=0.01,
        )
    )
    assert stats.ops == 0
    assert stats.errors >= 2
    assert stats.p50_ms is None
    assert stats.error_samples[0].startswith("TimeoutError")


def test_load_puts_every_record_once() -> None:
    store = FakeStore(clock=VirtualClock())
    seen: list[int] = []
    asyncio.run(ycsb.load(factory(store), 2500, 10, 16, seed=3, progress=seen.append))
    assert sorted(store.data) == [ycsb.key_of(i) for i in range(2500)]
    assert store.calls == 2500
    assert all(len(v) == 10 for v in store.data.values())
    assert seen == [1000, 2000, 2500]
    assert store.drivers_closed == store.drivers_made == 16


def test_load_raises_load_failed_on_a_failed_put() -> None:
    store = FakeStore(clock=VirtualClock(), fail_every=50)
    with pytest.raises(ycsb.LoadFailed, match="injected failure"):
        asyncio.run(ycsb.load(factory(store), 1000, 10, 4))
    assert store.drivers_closed == store.drivers_made


def test_settings_outside_the_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="clients"):
        ycsb.check_settings(clients=0, duration_s=1, records=10, value_bytes=10)
    with pytest.raises(ValueError, match="records"):
        ycsb.check_settings(clients=1, duration_s=1, records=ycsb.RECORDS_MAX + 1, value_bytes=10)
    with pytest.raises(ValueError, match="value_bytes"):
        ycsb.check_settings(
            clients=1, duration_s=1, records=10, value_bytes=ycsb.VALUE_BYTES_MAX + 1
        )
