"""The scheduler's dispatch pass, without a network: which waiting worker gets which
calls, under fair share, limits, batching and time-shifting. (Claims are not run: the
pass's picks are what is checked; the store-backed path is in tests/integration.)"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from loom.functions.limits import AimdSettings
from loom.functions.protocol import Pull
from loom.functions.queue import Criticality, DueCall, DurableQueue, LeaseHold
from loom.functions.registry import Batch, FunctionConfig
from loom.functions.scheduler import PartitionView, Scheduler, Waiter

PARTITIONS = 4


def scheduler(aimd: AimdSettings | None = None) -> Scheduler:
    store: Any = SimpleNamespace(keyspace=lambda name: None)
    s = Scheduler(store, aimd=aimd)
    s.queue = DurableQueue(store, partitions=PARTITIONS)
    for p in range(PARTITIONS):
        s.partitions[p] = PartitionView(LeaseHold(p, s.name, 1), valid_until=time.monotonic() + 60)
    s._spawn = lambda coroutine: coroutine.close()  # type: ignore[method-assign]
    return s


def add_function(
    s: Scheduler, config: FunctionConfig, calls: int, *, deadline_ms: int | None = None
) -> None:
    state = s._function(config.app, config.function)
    state.config = config
    for p in range(PARTITIONS):
        state.candidates[p] = deque(
            DueCall(f"{p}-{config.app}.{config.function}.{i}", 0, deadline_ms)
            for i in range(p, calls, PARTITIONS)
        )
    s._reallot()


LOOP = asyncio.new_event_loop()


@pytest.fixture(autouse=True, scope="module")
def _close_loop() -> Iterator[None]:
    yield
    LOOP.close()


def waiter(s: Scheduler, app: str, functions: tuple[str, ...], slots: int) -> Waiter:
    loop = LOOP
    w = Waiter(
        Pull(worker="w", app=app, functions=functions, slots=slots, wait_ms=0),
        loop.create_future(),
        slots,
    )
    s.waiters.append(w)
    return w


def picked(w: Waiter) -> int:
    return sum(len(b) for b in w.batches)


@pytest.mark.parametrize(("weight", "expected"), [(1, (200, 200)), (3, (300, 100))])
def test_tenants_share_a_downstream_by_weight(weight: int, expected: tuple[int, int]) -> None:
    # The downstream admits 400 calls in this pass (its burst: 5% of 8000/s).
    s = scheduler(AimdSettings(rate_initial=8000, rate_max=8000))
    for app, w in (("flood", weight), ("quiet", 1)):
        add_function(
            s,
            FunctionConfig(app=app, function="f", tenant=app, weight=w, downstream=("kv:x",)),
            1000,
        )
    s.downstreams["kv:x"].bucket.tokens = 400.0
    s.downstreams["kv:x"].bucket.at = time.monotonic() + 3600  # no refill during the pass
    flood, quiet = waiter(s, "flood", ("f",), 500), waiter(s, "quiet", ("f",), 500)
    s._dispatch()
    # Shares by weight, give or take the last round's quantum (8 calls per weight).
    assert picked(flood) + picked(quiet) == 400
    assert abs(picked(flood) - expected[0]) <= 8 * weight


def test_concurrency_and_rate_allotments_bound_a_pass() -> None:
    s = scheduler()
    add_function(s, FunctionConfig(app="a", function="narrow", tenant="a", concurrency_max=3), 50)
    add_function(s, FunctionConfig(app="a", function="slow", tenant="a", rate_limit_per_s=10), 50)
    state = s.functions["a", "slow"]
    assert state.bucket is not None
    state.bucket.tokens, state.bucket.at = 1.0, time.monotonic() + 3600
    w = waiter(s, "a", ("narrow", "slow"), 100)
    s._dispatch()
    names = [s.where[b[0][1].call_id][1] for b in w.batches]
    assert names.count("narrow") == 3 and names.count("slow") == 1
    assert len(s.functions["a", "narrow"].inflight) == 3


def test_batched_calls_go_out_as_one_batch_once_full() -> None:
    s = scheduler()
    add_function(
        s,
        FunctionConfig(app="a", function="b", tenant="a", batch=Batch(size_max=10, wait_ms=60_000)),
        25,
    )
    w = waiter(s, "a", ("b",), 2)
    s._dispatch()
    assert [len(b) for b in w.batches] == [10, 10]  # two slots, two full batches
    w2 = waiter(s, "a", ("b",), 2)
    s._dispatch()
    assert w2.batches == []  # 5 left: waits for the batch to fill (wait_ms not over)


def test_low_criticality_waits_while_busy_unless_its_deadline_nears() -> None:
    s = scheduler()
    now_ms = int(time.time() * 1000)
    low = dict(app="a", tenant="a", criticality=Criticality.LOW)
    add_function(s, FunctionConfig(function="later", **low), 8)  # type: ignore[arg-type]
    add_function(s, FunctionConfig(function="soon", **low), 8, deadline_ms=now_ms + 1_000)  # type: ignore[arg-type]
    s.busy = True
    w = waiter(s, "a", ("later", "soon"), 100)
    s._dispatch()
    names = {s.where[b[0][1].call_id][1] for b in w.batches}
    assert names == {"soon"}
    s.busy = False
    w2 = waiter(s, "a", ("later", "soon"), 100)
    s._dispatch()
    assert picked(w2) == 8
