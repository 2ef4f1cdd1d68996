"""The kv state machine, command by command: conditions, counters, TTL, tombstones, Gc."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from kv_state import Harness, U, request

from loom.core.ids import Generation, RequestSeq, Seq, UShard, Version
from loom.core.limits import Limits
from loom.kvstate import keys
from loom.kvstate.commands import (
    Applied,
    Delete,
    Gc,
    Increment,
    Noop,
    Put,
    Rejected,
    Result,
)
from loom.kvstate.reads import read_item, read_version
from loom.kvstate.records import encode_counter

KEY = b"k"


def put(h: Harness, key: bytes = KEY, value: bytes = b"new", **kw: Any) -> Put:
    return Put(request=h.next_request(), ushard=U, key=key, value=value, **kw)


def delete(h: Harness, key: bytes = KEY, **kw: Any) -> Delete:
    return Delete(request=h.next_request(), ushard=U, key=key, **kw)


def increment(h: Harness, delta: int, key: bytes = KEY, **kw: Any) -> Increment:
    return Increment(request=h.next_request(), ushard=U, key=key, delta=delta, **kw)


def applied(result: Result) -> Applied:
    assert isinstance(result, Applied), result
    return result


def rejected(result: Result, reason: str) -> Rejected:
    assert isinstance(result, Rejected), result
    assert result.reason == reason, result
    return result


def value_of(h: Harness, key: bytes = KEY) -> bytes | None:
    item = read_item(h.state, U, key, h.wall_ms)
    return None if item is None else item.value


def make_existing(h: Harness, existing: str) -> None:
    """Leave KEY absent, live (b"old"), deleted (tombstone) or expired."""
    match existing:
        case "absent":
            pass
        case "live":
            applied(h.one(put(h, value=b"old")))
        case "tombstone":
            h.entry([put(h, value=b"old"), delete(h)])
        case "expired":
            applied(h.one(put(h, value=b"old", ttl_ms=10)))
            h.wall_ms += 10
        case _:
            raise AssertionError(existing)


OTHER_VERSION = Version(generation=Generation(1), seq=Seq(999), index=0)

PUT_CASES = [
    ("absent", {"if_absent": True}, True),
    ("live", {"if_absent": True}, False),
    ("tombstone", {"if_absent": True}, True),
    ("expired", {"if_absent": True}, True),
    ("live", {"if_version": "current"}, True),
    ("live", {"if_version": OTHER_VERSION}, False),
    ("tombstone", {"if_version": "current"}, False),
    ("expired", {"if_version": "current"}, False),
    ("absent", {"if_version": OTHER_VERSION}, False),
    ("live", {"if_value": b"old"}, True),
    ("live", {"if_value": b"other"}, False),
    ("absent", {"if_value": b"old"}, False),
    ("expired", {"if_value": b"old"}, False),
    ("live", {"if_value": b"old", "if_version": "current"}, True),
    ("live", {"if_value": b"other", "if_version": "current"}, False),
    ("live", {}, True),
    ("tombstone", {}, True),
]


@pytest.mark.parametrize(("existing", "conditions", "ok"), PUT_CASES)
def test_put_applies_only_when_its_conditions_hold(
    existing: str, conditions: dict[str, Any], ok: bool
) -> None:
    h = Harness()
    make_existing(h, existing)
    if conditions.get("if_version") == "current":
        conditions = {**conditions, "if_version": read_version(h.state, U, KEY)}
    before = read_item(h.state, U, KEY, h.wall_ms)
    result = h.one(put(h, **conditions))
    if ok:
        assert applied(result).version == Version(generation=h.generation, seq=Seq(h.seq), index=0)
        assert value_of(h) == b"new"
    else:
        failure = rejected(result, "condition")
        assert failure.current == (None if before is None else before.version)
        assert read_item(h.state, U, KEY, h.wall_ms) == before


DELETE_CASES = [
    ("absent", {}, True, False),
    ("live", {}, True, True),
    ("absent", {"if_exists": True}, False, False),
    ("tombstone", {"if_exists": True}, False, False),
    ("expired", {"if_exists": True}, False, False),
    ("live", {"if_exists": True}, True, True),
    ("live", {"if_version": "current"}, True, True),
    ("live", {"if_version": OTHER_VERSION}, False, True),
]


@pytest.mark.parametrize(("existing", "conditions", "ok", "existed"), DELETE_CASES)
def test_delete_writes_a_tombstone_only_when_its_conditions_hold(
    existing: str, conditions: dict[str, Any], ok: bool, existed: bool
) -> None:
    h = Harness()
    make_existing(h, existing)
    if conditions.get("if_version") == "current":
        conditions = {**conditions, "if_version": read_version(h.state, U, KEY)}
    version_before = read_version(h.state, U, KEY)
    result = h.one(delete(h, **conditions))
    if ok:
        assert applied(result).existed is existed
        assert value_of(h) is None
        # Even deleting an absent key leaves a versioned tombstone, for transactions.
        assert read_version(h.state, U, KEY) == applied(result).version
    else:
        rejected(result, "condition")
        assert read_version(h.state, U, KEY) == version_before


def test_increment_counts_from_zero_for_an_absent_key() -> None:
    h = Harness()
    assert applied(h.one(increment(h, 5))).counter == 5
    assert applied(h.one(increment(h, -7))).counter == -2
    assert value_of(h) == encode_counter(-2)


def test_increment_treats_an_expired_or_deleted_counter_as_zero() -> None:
    h = Harness()
    h.one(put(h, value=encode_counter(40), ttl_ms=5))
    h.wall_ms += 5
    assert applied(h.one(increment(h, 1))).counter == 1
    h.one(delete(h))
    assert applied(h.one(increment(h, 2))).counter == 2


def test_increment_keeps_the_expiry_of_a_live_counter() -> None:
    h = Harness()
    h.one(put(h, value=encode_counter(1), ttl_ms=100))
    h.one(increment(h, 1))
    item = read_item(h.state, U, KEY, h.wall_ms)
    assert item is not None
    assert item.expires_at_ms == 1_000_000 + 100


@pytest.mark.parametrize(
    ("stored", "delta"),
    [
        (b"abc", 1),  # not an 8-byte counter
        (encode_counter(2**63 - 1), 1),  # overflow
        (encode_counter(-(2**63)), -1),  # underflow
        (encode_counter(0), 2**63),  # delta outside int64
    ],
)
def test_increment_rejects_non_counters_and_overflow_as_invalid(stored: bytes, delta: int) -> None:
    h = Harness()
    h.one(put(h, value=stored))
    version = read_version(h.state, U, KEY)
    rejected(h.one(increment(h, delta)), "invalid")
    assert read_version(h.state, U, KEY) == version


def test_commands_in_one_entry_get_distinct_versions_in_order() -> None:
    h = Harness()
    results = h.entry([put(h), Noop(), put(h, key=b"x"), delete(h)])
    versions = [applied(r).version for r in results]
    assert versions == [
        Version(generation=Generation(1), seq=Seq(1), index=i) for i in range(len(results))
    ]


def test_if_version_over_a_write_earlier_in_the_same_entry_fails() -> None:
    """PITFALLS 17: two writers conditioned on the same version; only the first wins."""
    h = Harness()
    h.one(put(h, value=b"v0"))
    seen = read_version(h.state, U, KEY)
    first, second = h.entry(
        [put(h, value=b"a", if_version=seen), put(h, value=b"b", if_version=seen)]
    )
    applied(first)
    assert rejected(second, "condition").current == applied(first).version
    assert value_of(h) == b"a"


def test_later_commands_see_earlier_writes_of_the_same_entry() -> None:
    h = Harness()
    results = h.entry([increment(h, 1), increment(h, 1), put(h, key=b"x", if_absent=True)])
    assert [applied(r).counter for r in results[:2]] == [1, 2]
    results = h.entry([delete(h, key=b"x"), put(h, key=b"x", if_absent=True)])
    assert [r.__class__ for r in results] == [Applied, Applied]


def test_put_ttl_expires_at_the_stamped_wall_time() -> None:
    h = Harness()
    h.one(put(h, ttl_ms=50))
    h.wall_ms += 49
    assert value_of(h) == b"new"
    h.wall_ms += 1
    assert value_of(h) is None
    # An expired value counts as absent for conditions.
    applied(h.one(put(h, value=b"again", if_absent=True)))


@pytest.mark.parametrize(
    "command",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode({"type": "put"}),
        msgspec.msgpack.encode(["not", "a", "command"]),
    ],
)
def test_undecodable_command_bytes_are_rejected_as_invalid(command: bytes) -> None:
    h = Harness()
    rejected(h.one(command), "invalid")
    assert h.state.data == {}


@pytest.mark.parametrize(
    "build",
    [
        lambda h: put(h, key=b"x" * 17),
        lambda h: put(h, value=b"x" * 33),
        lambda h: put(h, if_value=b"x" * 33),
        lambda h: put(h, ttl_ms=0),
        lambda h: put(h, ttl_ms=-5),
        lambda h: delete(h, key=b"x" * 17),
        lambda h: increment(h, 1, key=b"x" * 17),
    ],
)
def test_out_of_range_commands_are_rejected_as_invalid_and_remembered(build: Any) -> None:
    h = Harness(limits=Limits(key_bytes_max=16, value_bytes_max=32))
    command = build(h)
    first = rejected(h.one(command), "invalid")
    assert h.one(command) == first
    assert read_item(h.state, U, KEY, h.wall_ms) is None


def test_commands_without_a_valid_request_id_or_ushard_are_rejected_and_not_remembered() -> None:
    h = Harness()
    for command in [
        Put(request=request(1), ushard=UShard(2**32), key=KEY, value=b"v"),
        Put(request=request(-1), ushard=U, key=KEY, value=b"v"),
        Put(request=request(1, "x" * 70_000), ushard=U, key=KEY, value=b"v"),
    ]:
        rejected(h.one(command), "invalid")
    assert h.state.data == {}


def test_noop_writes_nothing() -> None:
    h = Harness()
    assert isinstance(h.one(Noop()), Applied)
    assert len(h.batches[-1]) == 0


def test_gc_drops_tombstones_below_the_horizon_and_keeps_the_rest() -> None:
    h = Harness()
    h.entry([put(h, key=b"live"), put(h, key=b"gone")])
    h.one(delete(h, key=b"gone"))  # seq 2
    h.one(delete(h, key=b"late"))  # seq 3
    applied(h.one(Gc(tombstone_horizon=Seq(3), dedupe_before_wall_ms=0)))
    assert read_version(h.state, U, b"gone") is None
    assert read_version(h.state, U, b"late") is not None
    assert value_of(h, b"live") == b"new"
    assert h.state.get(keys.TOMBSTONE_HORIZON_KEY) is not None


def test_gc_drops_expired_values_below_the_horizon() -> None:
    h = Harness()
    h.one(put(h, ttl_ms=10))
    h.wall_ms += 10
    h.one(Gc(tombstone_horizon=Seq(2), dedupe_before_wall_ms=0))
    assert read_version(h.state, U, KEY) is None


def test_gc_never_lowers_the_horizon() -> None:
    h = Harness()
    for _ in range(5):
        h.one(Noop())
    h.one(Gc(tombstone_horizon=Seq(5), dedupe_before_wall_ms=0))
    h.one(delete(h))  # seq 7
    h.one(Gc(tombstone_horizon=Seq(2), dedupe_before_wall_ms=0))
    from loom.kvstate.apply import tombstone_horizon

    assert tombstone_horizon(h.state) == 5
    assert read_version(h.state, U, KEY) is not None


@pytest.mark.parametrize(
    "gc",
    [
        Gc(tombstone_horizon=Seq(100), dedupe_before_wall_ms=0),
        Gc(tombstone_horizon=Seq(-1), dedupe_before_wall_ms=0),
        Gc(tombstone_horizon=Seq(0), dedupe_before_wall_ms=-1),
    ],
)
def test_gc_with_an_impossible_horizon_is_invalid(gc: Gc) -> None:
    h = Harness()
    rejected(h.one(gc), "invalid")
    assert h.state.data == {}


def test_client_floor_above_the_request_itself_is_invalid() -> None:
    h = Harness()
    command = Put(request=request(3), ushard=U, key=KEY, value=b"v", client_floor=RequestSeq(4))
    rejected(h.one(command), "invalid")
    assert value_of(h) is None
