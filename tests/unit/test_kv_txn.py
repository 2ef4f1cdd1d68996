"""Optimistic transactions within one μshard: read set, snapshot, epoch and horizon checks."""

from __future__ import annotations

from kv_state import Harness, U

from loom.core.ids import Epoch, Generation, Seq, Version
from loom.core.limits import Limits
from loom.kvstate.commands import (
    Applied,
    Delete,
    Gc,
    Noop,
    Put,
    Rejected,
    Result,
    TxnCommit,
    TxnRead,
    TxnWrite,
)
from loom.kvstate.reads import read_item, read_version


def snapshot(h: Harness) -> Version:
    """The version a replica reports after applying everything so far."""
    return Version(generation=h.generation, seq=Seq(h.seq), index=0)


def reads_now(h: Harness, *names: bytes) -> tuple[TxnRead, ...]:
    return tuple(TxnRead(key, read_version(h.state, U, key)) for key in names)


def txn(
    h: Harness,
    reads: tuple[TxnRead, ...],
    writes: dict[bytes, bytes | None],
    at: Version,
    epoch: Epoch | None = None,
) -> TxnCommit:
    return TxnCommit(
        request=h.next_request(),
        ushard=U,
        snapshot=at,
        epoch=h.epoch if epoch is None else epoch,
        reads=reads,
        writes=tuple(TxnWrite(k, v) for k, v in sorted(writes.items())),
    )


def put(h: Harness, key: bytes, value: bytes = b"v") -> Put:
    return Put(request=h.next_request(), ushard=U, key=key, value=value)


def reason(result: Result) -> str | None:
    return result.reason if isinstance(result, Rejected) else None


def test_a_transaction_with_an_unchanged_read_set_applies_all_writes_at_its_version() -> None:
    h = Harness()
    h.one(put(h, b"a", b"1"))
    h.one(put(h, b"b", b"2"))
    at = snapshot(h)
    result = h.one(txn(h, reads_now(h, b"a", b"missing"), {b"a": None, b"c": b"3"}, at))
    assert isinstance(result, Applied)
    assert read_item(h.state, U, b"a", h.wall_ms) is None
    assert read_version(h.state, U, b"a") == result.version
    item = read_item(h.state, U, b"c", h.wall_ms)
    assert item is not None and (item.value, item.version) == (b"3", result.version)


def test_a_key_read_as_absent_and_written_after_the_snapshot_conflicts() -> None:
    h = Harness()
    h.one(Noop())
    at = snapshot(h)
    reads = reads_now(h, b"x")
    h.one(put(h, b"x"))
    assert reason(h.one(txn(h, reads, {b"y": b"1"}, at))) == "conflict"
    assert read_item(h.state, U, b"y", h.wall_ms) is None


def test_a_key_read_as_absent_and_deleted_after_the_snapshot_conflicts() -> None:
    """Deleting an absent key leaves a tombstone newer than the snapshot."""
    h = Harness()
    h.one(Noop())
    at = snapshot(h)
    reads = reads_now(h, b"x")
    h.one(Delete(request=h.next_request(), ushard=U, key=b"x"))
    assert reason(h.one(txn(h, reads, {b"y": b"1"}, at))) == "conflict"


def test_a_key_read_as_present_and_deleted_after_the_snapshot_conflicts() -> None:
    h = Harness()
    h.one(put(h, b"x"))
    at = snapshot(h)
    reads = reads_now(h, b"x")
    h.one(Delete(request=h.next_request(), ushard=U, key=b"x"))
    result = h.one(txn(h, reads, {b"y": b"1"}, at))
    assert reason(result) == "conflict"
    assert isinstance(result, Rejected) and result.current == read_version(h.state, U, b"x")


def test_a_read_version_that_does_not_match_the_current_record_conflicts() -> None:
    h = Harness()
    h.one(put(h, b"x"))
    at = snapshot(h)
    stale = (TxnRead(b"x", Version(generation=Generation(1), seq=Seq(0), index=0)),)
    assert reason(h.one(txn(h, stale, {b"y": b"1"}, at))) == "conflict"


def test_write_skew_is_prevented() -> None:
    """Two doctors on call: each checks the other is on call, then goes off call."""
    h = Harness()
    h.entry([put(h, b"alice", b"on"), put(h, b"bob", b"on")])
    at = snapshot(h)  # index 0, yet it covers bob's write at index 1 of the same entry
    both = reads_now(h, b"alice", b"bob")
    alice_off = txn(h, both, {b"alice": b"off"}, at)
    bob_off = txn(h, both, {b"bob": b"off"}, at)
    first, second = h.entry([alice_off, bob_off])
    assert isinstance(first, Applied)
    assert reason(second) == "conflict"
    bob = read_item(h.state, U, b"bob", h.wall_ms)
    assert bob is not None and bob.value == b"on"


def test_a_snapshot_read_in_another_epoch_is_rejected() -> None:
    h = Harness()
    h.one(put(h, b"x"))
    at = snapshot(h)
    h.epoch = Epoch(2)
    result = h.one(txn(h, reads_now(h, b"x"), {b"x": b"2"}, at, epoch=Epoch(1)))
    assert reason(result) == "epoch"


def test_a_snapshot_from_before_a_move_is_rejected() -> None:
    h = Harness()
    h.one(put(h, b"x"))
    at = snapshot(h)
    h.generation = Generation(2)
    assert reason(h.one(txn(h, reads_now(h, b"x"), {b"x": b"2"}, at))) == "epoch"


def test_a_snapshot_below_the_gc_horizon_is_rejected() -> None:
    h = Harness()
    h.one(put(h, b"x"))
    at = snapshot(h)  # seq 1
    reads = reads_now(h, b"x")
    h.one(Delete(request=h.next_request(), ushard=U, key=b"x"))  # seq 2
    h.one(Gc(tombstone_horizon=Seq(3), dedupe_before_wall_ms=0))
    assert reason(h.one(txn(h, reads, {b"y": b"1"}, at))) == "horizon"
    fresh = snapshot(h)
    assert isinstance(h.one(txn(h, reads_now(h, b"x"), {b"y": b"1"}, fresh)), Applied)


def test_an_expired_value_written_after_the_snapshot_still_conflicts() -> None:
    h = Harness()
    h.one(Noop())
    at = snapshot(h)
    reads = reads_now(h, b"x")
    h.one(Put(request=h.next_request(), ushard=U, key=b"x", value=b"v", ttl_ms=1))
    h.wall_ms += 5
    assert reason(h.one(txn(h, reads, {b"y": b"1"}, at))) == "conflict"


def test_transactions_over_the_read_or_write_limit_are_invalid() -> None:
    h = Harness(limits=Limits(txn_reads_max=2, txn_writes_max=1))
    h.one(Noop())
    at = snapshot(h)
    too_many_reads = reads_now(h, b"a", b"b", b"c")
    assert reason(h.one(txn(h, too_many_reads, {}, at))) == "invalid"
    assert reason(h.one(txn(h, (), {b"a": b"1", b"b": b"2"}, at))) == "invalid"
    assert isinstance(h.one(txn(h, reads_now(h, b"a", b"b"), {b"a": b"1"}, at)), Applied)


def test_a_retried_commit_returns_its_first_outcome() -> None:
    h = Harness()
    h.one(Noop())
    at = snapshot(h)
    commit = txn(h, reads_now(h, b"x"), {b"x": b"1"}, at)
    first = h.one(commit)
    assert isinstance(first, Applied)
    # Re-applied, it would now conflict with its own write; dedupe answers instead.
    assert h.one(commit) == first
