"""Exactly-once writes (PITFALLS 5): the per-μshard table of recent requests."""

from __future__ import annotations

from kv_state import Harness, U, request

from loom.core.ids import ClientId, RequestSeq, Seq, UShard
from loom.core.limits import Limits
from loom.kvstate import keys
from loom.kvstate.commands import Applied, Delete, Gc, Increment, Put, Rejected
from loom.kvstate.reads import read_item, state_digest
from loom.kvstate.records import decode_uint64, encode_counter

KEY = b"counter"


def inc(seq: int, *, client: str = "c1", floor: int = 0, ushard: UShard = U) -> Increment:
    return Increment(
        request=request(seq, client),
        ushard=ushard,
        key=KEY,
        delta=1,
        client_floor=RequestSeq(floor),
    )


def counter(h: Harness, ushard: UShard = U) -> bytes | None:
    item = read_item(h.state, ushard, KEY, h.wall_ms)
    return None if item is None else item.value


def dedupe_seqs(h: Harness, ushard: UShard = U) -> list[tuple[str, int | None]]:
    span = keys.dedupe_range(ushard)
    parsed = [keys.parse_dedupe_key(k) for k, _ in h.state.scan(span.start, span.end)]
    return [(client, seq) for _, client, seq in parsed]


def dedupe_count(h: Harness, ushard: UShard = U) -> int:
    stored = h.state.get(keys.dedupe_count_key(ushard))
    return 0 if stored is None else decode_uint64(stored)


def test_a_retried_increment_returns_the_first_result_and_applies_once() -> None:
    h = Harness()
    first = h.one(inc(1))
    digest = state_digest(h.state)
    h.wall_ms += 1_000
    assert h.one(inc(1)) == first
    assert counter(h) == encode_counter(1)
    assert state_digest(h.state) == digest, "a retry changes nothing, not even stamps"


def test_a_retry_in_the_same_entry_applies_once() -> None:
    h = Harness()
    first, retry, other = h.entry([inc(1), inc(1), inc(2)])
    assert retry == first
    assert isinstance(other, Applied) and other.counter == 2


def test_requests_are_remembered_per_client_and_ushard() -> None:
    h = Harness()
    results = h.entry([inc(1), inc(1, client="c2"), inc(1, ushard=UShard(8))])
    assert all(isinstance(r, Applied) for r in results)
    assert counter(h) == encode_counter(2)
    assert counter(h, UShard(8)) == encode_counter(1)


def test_a_rejected_result_is_remembered_too() -> None:
    h = Harness()
    h.one(Put(request=request(1), ushard=U, key=KEY, value=b"x"))
    conditional = Put(request=request(2), ushard=U, key=KEY, value=b"y", if_absent=True)
    first = h.one(conditional)
    assert isinstance(first, Rejected)
    h.one(Delete(request=request(3), ushard=U, key=KEY))
    # The condition would hold now, but the request already has its answer.
    assert h.one(conditional) == first
    assert counter(h) is None


def test_client_floor_forgets_that_clients_entries_below_it() -> None:
    h = Harness()
    h.entry([inc(1), inc(2), inc(3), inc(1, client="c2")])
    h.one(inc(4, floor=3))
    assert dedupe_seqs(h) == [("c1", None), ("c1", 3), ("c1", 4), ("c2", 1)]
    assert dedupe_count(h) == 4  # the floor record counts as a record


def test_a_late_copy_below_the_floor_is_refused_not_applied() -> None:
    h = Harness()
    h.entry([inc(1), inc(2, floor=2)])
    late = h.one(inc(1))
    assert isinstance(late, Rejected) and late.reason == "invalid"
    assert counter(h) == encode_counter(2)


def test_the_floor_is_never_lowered() -> None:
    h = Harness()
    h.one(inc(5, floor=5))
    h.one(inc(6, floor=2))
    assert isinstance(h.one(inc(4)), Rejected)
    assert counter(h) == encode_counter(2)


def test_over_the_limit_the_oldest_stamped_records_go_first() -> None:
    h = Harness(limits=Limits(dedupe_entries_per_ushard_max=3))
    for seq in range(1, 6):
        h.wall_ms += 10
        h.one(inc(seq))
    assert dedupe_seqs(h) == [("c1", 3), ("c1", 4), ("c1", 5)]
    assert dedupe_count(h) == 3
    age = keys.dedupe_age_range(U)
    assert len(list(h.state.scan(age.start, age.end))) == 3
    # RISK documented in loom.kvstate.dedupe: a retry of a trimmed request applies again.
    assert isinstance(h.one(inc(1)), Applied)
    assert counter(h) == encode_counter(6)


def test_gc_forgets_records_stamped_before_the_cutoff_in_every_ushard() -> None:
    h = Harness()
    h.entry([inc(1), inc(1, ushard=UShard(9)), inc(2, floor=2, client="c2")])
    h.wall_ms += 100
    h.entry([inc(2), inc(3, ushard=UShard(9))])
    h.one(Gc(tombstone_horizon=Seq(h.seq), dedupe_before_wall_ms=h.wall_ms))
    assert dedupe_seqs(h) == [("c1", 2)]
    assert dedupe_seqs(h, UShard(9)) == [("c1", 3)]
    assert dedupe_count(h) == 1
    assert dedupe_count(h, UShard(9)) == 1
    everything = keys.ALL_DEDUPE_AGE
    assert len(list(h.state.scan(everything.start, everything.end))) == 2


def test_gc_at_the_last_ushard_terminates() -> None:
    h = Harness()
    last = UShard(keys.USHARD_MAX)
    h.one(inc(1, ushard=last))
    h.wall_ms += 1
    h.one(Gc(tombstone_horizon=Seq(h.seq), dedupe_before_wall_ms=h.wall_ms))
    assert dedupe_seqs(h, last) == []
    assert dedupe_count(h, last) == 0


def test_every_dedupe_record_has_exactly_one_age_index_entry() -> None:
    h = Harness(limits=Limits(dedupe_entries_per_ushard_max=4))
    for seq in range(1, 12):
        h.wall_ms += seq % 3
        h.one(inc(seq, floor=max(0, seq - 3), client=f"c{seq % 2}"))
    age = keys.dedupe_age_range(U)
    indexed = sorted(
        keys.dedupe_entry_key_for_age_key(k) for k, _ in h.state.scan(age.start, age.end)
    )
    span = keys.dedupe_range(U)
    assert indexed == [k for k, _ in h.state.scan(span.start, span.end)]
    assert dedupe_count(h) == len(indexed) <= 4
    assert ClientId("c1") in {c for c, _ in dedupe_seqs(h)}
