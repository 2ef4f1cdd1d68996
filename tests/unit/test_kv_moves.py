"""μshard moves in the kv state machine: Freeze / Ingest / Own / Abort / Drop (DESIGN §6)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kv_state import Harness, U, request

from loom.core.ids import Epoch, Generation, MoveId, Seq, UShard, Version
from loom.kvstate import keys
from loom.kvstate.commands import (
    Abort,
    Applied,
    Delete,
    Drop,
    Freeze,
    Gc,
    Increment,
    Ingest,
    IngestRecord,
    MoveCommand,
    Own,
    Put,
    Rejected,
    Result,
    TxnCommit,
    TxnRead,
    TxnWrite,
)
from loom.kvstate.ownership import Owner, export_chunk, is_movable_key, ownership
from loom.kvstate.reads import read_item
from loom.kvstate.records import ValueRecord, encode_value_record

M1 = MoveId(1)
M2 = MoveId(2)
OTHER = UShard(8)


def put(h: Harness, key: bytes, value: bytes, seq: int | None = None, ushard: UShard = U) -> Put:
    rid = h.next_request() if seq is None else request(seq)
    return Put(request=rid, ushard=ushard, key=key, value=value)


def copy(src: Harness, dst: Harness, move: MoveId, chunk: int = 3) -> int:
    """Export the frozen μshard from `src` chunk by chunk and ingest it into `dst`;
    returns how many records were exported."""
    cursor: bytes | None = None
    total = 0
    while True:
        records, cursor = export_chunk(src.state, U, cursor, chunk)
        result = dst.one(
            Ingest(
                ushard=U,
                move_id=move,
                records=tuple(IngestRecord(k, v) for k, v in records),
            )
        )
        assert isinstance(result, Applied), result
        total += len(records)
        if cursor is None:
            return total


def moved_state(h: Harness, ushard: UShard = U) -> dict[bytes, bytes]:
    return {k: v for k, v in h.state.data.items() if is_movable_key(k, ushard)}


def is_moved(result: Result) -> bool:
    return isinstance(result, Rejected) and result.reason == "moved"


def two_sides() -> tuple[Harness, Harness]:
    """A source owning every μshard and a target created with none."""
    return Harness(), Harness(initial=frozenset(), seq=40)


def test_freeze_answers_every_write_of_the_ushard_moved_and_remembers_none_of_them() -> None:
    h = Harness()
    h.one(put(h, b"k", b"v"))
    assert isinstance(h.one(Freeze(ushard=U, move_id=M1)), Applied)
    before = dict(h.state.data)
    txn = TxnCommit(
        request=h.next_request(),
        ushard=U,
        snapshot=Version(Generation(1), Seq(1), 0),
        epoch=Epoch(1),
        reads=(TxnRead(b"k", Version(Generation(1), Seq(1), 0)),),
        writes=(TxnWrite(b"k", b"t"),),
    )
    results = h.entry(
        [
            put(h, b"k", b"w"),
            Delete(request=h.next_request(), ushard=U, key=b"k"),
            Increment(request=h.next_request(), ushard=U, key=b"c", delta=1),
            txn,
        ]
    )
    assert all(is_moved(r) for r in results), results
    assert h.state.data == before  # not even the dedupe table changed
    assert isinstance(h.one(put(h, b"k", b"x", ushard=OTHER)), Applied)  # other μshards live


def test_a_ushard_the_pshard_was_not_created_with_is_not_owned() -> None:
    h = Harness(initial=frozenset({OTHER}))
    assert is_moved(h.one(put(h, b"k", b"v")))
    assert isinstance(h.one(put(h, b"k", b"v", ushard=OTHER)), Applied)


def test_a_whole_move_carries_data_dedupe_table_and_a_higher_generation() -> None:
    src, dst = two_sides()
    first = src.one(put(src, b"k", b"v1", seq=1))
    src.one(Increment(request=request(2), ushard=U, key=b"c", delta=5))
    src.one(Delete(request=request(3), ushard=U, key=b"gone"))
    assert isinstance(src.one(Freeze(ushard=U, move_id=M1)), Applied)
    frozen = moved_state(src)
    records = copy(src, dst, M1)
    assert records > 3  # several chunks
    assert ownership(dst.state, U, dst.initial).state is Owner.INCOMING
    assert is_moved(dst.one(put(dst, b"k", b"early")))  # not owned before Own
    own = Own(ushard=U, move_id=M1, generation=Generation(2), records=records)
    assert isinstance(dst.one(own), Applied)
    assert {k: v for k, v in moved_state(dst).items() if k != keys.generation_key(U)} == frozen
    # A retry of a request applied on the source gets its first result, applied once.
    assert dst.one(put(dst, b"k", b"v1", seq=1)) == first
    again = dst.one(Increment(request=request(2), ushard=U, key=b"c", delta=5))
    assert isinstance(again, Applied) and again.counter == 5
    # Versions written after the move are above every version before it (PITFALLS 17).
    later = dst.one(put(dst, b"k", b"v2", seq=4))
    assert isinstance(first, Applied) and isinstance(later, Applied)
    assert later.version > first.version and later.version.generation == Generation(2)
    item = read_item(dst.state, U, b"k", dst.wall_ms)
    assert item is not None and item.value == b"v2"
    # The source forgets the μshard and keeps answering MOVED.
    assert isinstance(src.one(Drop(ushard=U, move_id=M1)), Applied)
    assert set(k for k in src.state.data if keys.ushard_of_table_key(k) == U) == {keys.owner_key(U)}
    assert is_moved(src.one(put(src, b"k", b"stale")))


def test_move_commands_are_idempotent_under_duplicates() -> None:
    src, dst = two_sides()
    src.one(put(src, b"k", b"v"))
    freeze = Freeze(ushard=U, move_id=M1)
    assert isinstance(src.one(freeze), Applied)
    assert isinstance(src.one(freeze), Applied)
    records, _ = export_chunk(src.state, U, None, 100)
    ingest = Ingest(ushard=U, move_id=M1, records=tuple(IngestRecord(k, v) for k, v in records))
    dst.one(ingest)
    snapshot = dict(dst.state.data)
    assert isinstance(dst.one(ingest), Applied)
    assert dst.state.data == snapshot
    own = Own(ushard=U, move_id=M1, generation=Generation(1), records=len(records))
    assert isinstance(dst.one(own), Applied)
    owned = dict(dst.state.data)
    assert isinstance(dst.one(own), Applied) and dst.state.data == owned
    # A chunk delayed past Own must not overwrite what the owner wrote since.
    dst.one(put(dst, b"k", b"new"))
    assert isinstance(dst.one(ingest), Rejected)
    drop = Drop(ushard=U, move_id=M1)
    assert isinstance(src.one(drop), Applied) and isinstance(src.one(drop), Applied)


def test_abort_before_own_gives_the_ushard_back_and_refuses_late_commands_of_that_move() -> None:
    src, dst = two_sides()
    src.one(put(src, b"k", b"v"))
    src.one(Freeze(ushard=U, move_id=M1))
    records = copy(src, dst, M1)
    assert isinstance(src.one(Abort(ushard=U, move_id=M1)), Applied)
    assert isinstance(dst.one(Abort(ushard=U, move_id=M1)), Applied)
    assert moved_state(dst) == {}
    assert isinstance(src.one(put(src, b"k", b"after")), Applied)
    # Late copies of the aborted move's commands change nothing.
    assert isinstance(src.one(Freeze(ushard=U, move_id=M1)), Rejected)
    assert isinstance(dst.one(Ingest(ushard=U, move_id=M1, records=())), Rejected)
    late_own = Own(ushard=U, move_id=M1, generation=Generation(1), records=records)
    assert isinstance(dst.one(late_own), Rejected)
    # A later move of the same μshard works.
    assert isinstance(src.one(Freeze(ushard=U, move_id=M2)), Applied)
    records = copy(src, dst, M2)
    own = Own(ushard=U, move_id=M2, generation=Generation(1), records=records)
    assert isinstance(dst.one(own), Applied)


def test_abort_after_own_or_drop_is_refused() -> None:
    src, dst = two_sides()
    src.one(Freeze(ushard=U, move_id=M1))
    records = copy(src, dst, M1)
    dst.one(Own(ushard=U, move_id=M1, generation=Generation(1), records=records))
    src.one(Drop(ushard=U, move_id=M1))
    assert isinstance(dst.one(Abort(ushard=U, move_id=M1)), Rejected)
    assert isinstance(src.one(Abort(ushard=U, move_id=M1)), Rejected)
    assert ownership(dst.state, U, dst.initial).state is Owner.OWNED


def test_abort_on_a_side_the_move_never_reached_fences_its_late_commands() -> None:
    src, dst = two_sides()
    assert isinstance(src.one(Abort(ushard=U, move_id=M1)), Applied)  # its Freeze was lost
    assert isinstance(src.one(Freeze(ushard=U, move_id=M1)), Rejected)
    assert isinstance(dst.one(Abort(ushard=U, move_id=M1)), Applied)  # no Ingest arrived
    assert isinstance(dst.one(Ingest(ushard=U, move_id=M1, records=())), Rejected)


def test_own_without_ingest_and_drop_without_freeze_are_refused() -> None:
    src, dst = two_sides()
    own = Own(ushard=U, move_id=M1, generation=Generation(1), records=0)
    assert isinstance(dst.one(own), Rejected)
    assert isinstance(src.one(Drop(ushard=U, move_id=M1)), Rejected)
    assert ownership(src.state, U, src.initial).state is Owner.OWNED


def test_own_must_raise_the_generation() -> None:
    src, dst = two_sides()
    src.one(put(src, b"k", b"v"))
    src.one(Freeze(ushard=U, move_id=M1))
    records = copy(src, dst, M1)
    dst.one(Own(ushard=U, move_id=M1, generation=Generation(3), records=records))
    dst.one(Freeze(ushard=U, move_id=M2))
    back = Harness(initial=frozenset())
    records = copy(dst, back, M2)
    refused = back.one(Own(ushard=U, move_id=M2, generation=Generation(3), records=records))
    assert isinstance(refused, Rejected) and refused.reason == "ownership"
    own = Own(ushard=U, move_id=M2, generation=Generation(4), records=records)
    assert isinstance(back.one(own), Applied)


def test_own_refuses_a_copy_with_records_missing() -> None:
    src, dst = two_sides()
    for i in range(5):
        src.one(put(src, b"k%d" % i, b"v"))
    src.one(Freeze(ushard=U, move_id=M1))
    first, _cursor = export_chunk(src.state, U, None, 4)
    dst.one(Ingest(ushard=U, move_id=M1, records=tuple(IngestRecord(k, v) for k, v in first)))
    total = len(moved_state(src))
    refused = dst.one(Own(ushard=U, move_id=M1, generation=Generation(2), records=total))
    assert isinstance(refused, Rejected) and "incomplete" in refused.message
    assert ownership(dst.state, U, dst.initial).state is Owner.INCOMING


def test_ingest_refuses_keys_outside_the_ushard_and_its_ownership_record() -> None:
    _, dst = two_sides()
    for key in (keys.data_key(OTHER, b"k"), keys.owner_key(U), keys.TOMBSTONE_HORIZON_KEY):
        bad = Ingest(ushard=U, move_id=M1, records=(IngestRecord(key, b"x"),))
        assert isinstance(dst.one(bad), Rejected)
    assert dst.state.data == {}


def test_gc_leaves_a_frozen_ushard_exactly_as_it_was() -> None:
    h = Harness()
    h.one(put(h, b"k", b"v"))
    h.one(Delete(request=h.next_request(), ushard=U, key=b"k"))
    h.one(put(h, b"o", b"v", ushard=OTHER))
    h.one(Delete(request=h.next_request(), ushard=OTHER, key=b"o"))
    h.one(Freeze(ushard=U, move_id=M1))
    frozen = moved_state(h)
    h.wall_ms += 10**9
    assert isinstance(
        h.one(Gc(tombstone_horizon=Seq(h.seq), dedupe_before_wall_ms=h.wall_ms)), Applied
    )
    assert moved_state(h) == frozen
    assert moved_state(h, OTHER) == {}  # an owned μshard was collected


def test_export_chunks_cover_the_ushard_exactly_once_in_key_order() -> None:
    h = Harness()
    for i in range(7):
        h.one(put(h, b"k%d" % i, b"v"))
    h.one(put(h, b"x", b"v", ushard=OTHER))
    h.one(Freeze(ushard=U, move_id=M1))
    for size in (1, 2, 5, 100):
        seen: list[bytes] = []
        cursor: bytes | None = None
        while True:
            records, cursor = export_chunk(h.state, U, cursor, size)
            assert len(records) <= size
            seen += [k for k, _ in records]
            if cursor is None:
                break
        assert seen == sorted(moved_state(h))


# --- properties ------------------------------------------------------------------------

move_ids = st.integers(1, 3).map(MoveId)
generations = st.integers(1, 4).map(Generation)
chunk_records = st.lists(
    st.builds(
        IngestRecord,
        st.sampled_from([keys.data_key(U, b"a"), keys.data_key(U, b"b")]),
        st.sampled_from([b"x", b"y"]).map(
            lambda v: encode_value_record(ValueRecord(Version(Generation(0), Seq(1), 0), v))
        ),
    ),
    max_size=2,
).map(tuple)
move_commands = st.one_of(
    st.builds(Freeze, ushard=st.just(U), move_id=move_ids),
    st.builds(Ingest, ushard=st.just(U), move_id=move_ids, records=chunk_records),
    st.builds(
        Own,
        ushard=st.just(U),
        move_id=move_ids,
        generation=generations,
        records=st.integers(0, 3),
    ),
    st.builds(Abort, ushard=st.just(U), move_id=move_ids),
    st.builds(Drop, ushard=st.just(U), move_id=move_ids),
)
writes = st.builds(
    Put,
    request=st.builds(request, st.integers(1, 4)),
    ushard=st.just(U),
    key=st.sampled_from([b"a", b"b"]),
    value=st.sampled_from([b"1", b"2"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(move_commands, writes), max_size=25), st.booleans())
def test_ownership_records_only_move_forward_and_move_commands_are_idempotent(
    commands: list[MoveCommand | Put], born_with: bool
) -> None:
    h = Harness(initial=None if born_with else frozenset())
    twin = Harness(initial=h.initial)
    last_move, last_generation = 0, 0
    for command in commands:
        before_state = dict(h.state.data)
        before = ownership(h.state, U, h.initial)
        result = h.one(command)
        assert twin.one(command) == result and twin.state.data == h.state.data  # deterministic
        after = ownership(h.state, U, h.initial)
        assert after.move_id >= last_move
        last_move = after.move_id
        stored = h.state.get(keys.generation_key(U))
        generation = 0 if stored is None else int.from_bytes(stored, "big")
        if after.state not in (Owner.ABSENT, Owner.DROPPED):  # a cleared μshard restarts
            assert generation >= last_generation
        last_generation = generation
        if isinstance(command, Put):
            assert isinstance(result, Applied) == (before.state is Owner.OWNED)
            if before.state is not Owner.OWNED:
                assert h.state.data == before_state
            continue
        # A duplicate right after changes nothing and gets the same kind of answer.
        applied = dict(h.state.data)
        again = h.one(command)
        twin.one(command)
        if isinstance(result, Applied):
            assert isinstance(again, Applied), (command, again)
        assert h.state.data == applied
        if isinstance(command, Own) and isinstance(result, Applied):
            assert before.state in (Owner.INCOMING, Owner.OWNED) and after.state is Owner.OWNED
            assert before.state is Owner.INCOMING or before.committed  # or a retry
        if before.state is Owner.OWNED and before.committed and before.move_id == command.move_id:
            assert after.state is Owner.OWNED  # Own is the commit point: no way back
