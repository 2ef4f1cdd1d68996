"""Properties of apply over random command sequences: determinism, overlay, exactly-once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kv_state import Harness, U, request

from loom.core.ids import Epoch, Generation, RequestId, RequestSeq, Seq, Version
from loom.core.limits import Limits
from loom.kvstate import keys
from loom.kvstate.commands import (
    Applied,
    Command,
    Delete,
    Gc,
    Increment,
    Noop,
    Put,
    Result,
    TxnCommit,
    TxnRead,
    TxnWrite,
    decode_result,
)
from loom.kvstate.overlay import StateReader
from loom.kvstate.reads import state_digest
from loom.kvstate.records import decode_dedupe_record, decode_uint64, decode_value_record

user_keys = st.sampled_from([b"a", b"b", b"c"])
values = st.sampled_from([b"x", b"y", b"\x00" * 8])
requests = st.builds(request, st.integers(1, 6), st.sampled_from(["c1", "c2"]))
floors = st.integers(0, 3).map(RequestSeq)
ttls = st.none() | st.integers(1, 30)
versions = st.builds(Version, st.just(Generation(1)), st.integers(0, 8).map(Seq), st.integers(0, 3))


def puts(with_versions: bool) -> st.SearchStrategy[Put]:
    return st.builds(
        Put,
        request=requests,
        ushard=st.just(U),
        key=user_keys,
        value=values,
        if_absent=st.booleans(),
        if_version=versions if with_versions else st.none(),
        if_value=st.none() | values,
        ttl_ms=ttls,
        client_floor=floors,
    )


def deletes(with_versions: bool) -> st.SearchStrategy[Delete]:
    return st.builds(
        Delete,
        request=requests,
        ushard=st.just(U),
        key=user_keys,
        if_exists=st.booleans(),
        if_version=st.none() | versions if with_versions else st.none(),
        client_floor=floors,
    )


increments = st.builds(
    Increment,
    request=requests,
    ushard=st.just(U),
    key=user_keys,
    delta=st.integers(-3, 3),
    client_floor=floors,
)
transactions = st.builds(
    TxnCommit,
    request=requests,
    ushard=st.just(U),
    snapshot=versions,
    epoch=st.sampled_from([Epoch(1), Epoch(2)]),
    reads=st.lists(st.builds(TxnRead, user_keys, st.none() | versions), max_size=3).map(tuple),
    writes=st.lists(st.builds(TxnWrite, user_keys, st.none() | values), max_size=3).map(tuple),
)
garbage_collections = st.builds(
    Gc,
    tombstone_horizon=st.integers(0, 6).map(Seq),
    dedupe_before_wall_ms=st.integers(1_000_000, 1_000_100),
)
any_command: st.SearchStrategy[Command | bytes] = st.one_of(
    puts(with_versions=True),
    deletes(with_versions=True),
    increments,
    transactions,
    garbage_collections,
    st.just(Noop()),
    st.binary(max_size=6),
)
Write = Put | Delete | Increment
versionless_command: st.SearchStrategy[Write] = st.one_of(
    puts(with_versions=False), deletes(with_versions=False), increments
)
entries = st.lists(
    st.tuples(st.integers(0, 20), st.lists(any_command, min_size=1, max_size=4)), max_size=6
)


def assert_dedupe_bookkeeping_exact(state: StateReader) -> None:
    """The count and the age index track the dedupe table exactly."""
    span = keys.dedupe_range(U)
    records = [k for k, _ in state.scan(span.start, span.end)]
    age = keys.dedupe_age_range(U)
    indexed = sorted(
        keys.dedupe_entry_key_for_age_key(k) for k, _ in state.scan(age.start, age.end)
    )
    assert indexed == records
    stored = state.get(keys.dedupe_count_key(U))
    assert (0 if stored is None else decode_uint64(stored)) == len(records)


@settings(max_examples=150)
@given(entries)
def test_two_replicas_applying_the_same_entries_produce_identical_batches_and_results(
    log: list[tuple[int, list[Command | bytes]]],
) -> None:
    limits = Limits(dedupe_entries_per_ushard_max=4)
    a, b = Harness(limits=limits), Harness(limits=limits)
    for wall_step, commands in log:
        for replica in (a, b):
            replica.wall_ms += wall_step
        assert a.entry(commands) == b.entry(commands)
        assert a.batches[-1] == b.batches[-1]
        assert_dedupe_bookkeeping_exact(a.state)
    assert state_digest(a.state) == state_digest(b.state)


def strip_result(result: Result) -> tuple[object, ...]:
    if isinstance(result, Applied):
        return ("ok", result.counter, result.existed)
    return ("no", result.reason, result.message, result.current is None)


def strip_versions(state: StateReader) -> list[tuple[bytes, object]]:
    """The whole state with versions blanked out: what must not depend on batching."""
    out: list[tuple[bytes, object]] = []
    for key_range in keys.ALL_RANGES:
        for key, value in state.scan(key_range.start, key_range.end):
            stripped: object = value
            if key_range.start == keys.DATA_PREFIX:
                record = decode_value_record(value)
                stripped = (record.value, record.expires_at_ms)
            elif (
                key_range.start == keys.DEDUPE_PREFIX and keys.parse_dedupe_key(key)[2] is not None
            ):
                dedupe = decode_dedupe_record(value)
                stripped = (dedupe.wall_ms, strip_result(decode_result(dedupe.result)))
            elif key == keys.TOMBSTONE_HORIZON_KEY:
                continue
            out.append((key, stripped))
    return out


@settings(max_examples=150)
@given(st.lists(versionless_command, min_size=1, max_size=12))
def test_one_entry_of_many_commands_equals_one_entry_per_command_but_for_versions(
    commands: list[Write],
) -> None:
    batched, single = Harness(), Harness()
    batched_results = batched.entry(commands)
    single_results = [single.one(command) for command in commands]
    assert [strip_result(r) for r in batched_results] == [strip_result(r) for r in single_results]
    assert strip_versions(batched.state) == strip_versions(single.state)


@settings(max_examples=100)
@given(st.lists(st.lists(versionless_command, min_size=1, max_size=3), max_size=5))
def test_retrying_every_request_returns_its_first_result_and_changes_nothing(
    log: list[list[Write]],
) -> None:
    # A floor above the request itself is rejected unremembered: not a retry case.
    log = [[c for c in entry if c.client_floor <= c.request.seq] for entry in log]
    h = Harness()
    first: dict[RequestId, Result] = {}
    for commands in filter(None, log):
        for command, result in zip(commands, h.entry(commands), strict=True):
            first.setdefault(command.request, result)
    digest = state_digest(h.state)
    floors = {
        client: max(c.client_floor for entry in log for c in entry if c.request.client == client)
        for client in {c.request.client for entry in log for c in entry}
    }
    for command in (c for entry in log for c in entry):
        # Requests below the client's floor were forgotten on purpose (see test_kv_dedupe).
        if command.request.seq >= floors[command.request.client]:
            assert h.one(command) == first[command.request]
    assert state_digest(h.state) == digest
