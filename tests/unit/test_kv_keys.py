"""Key layout: round trips, contiguity of a μshard, and order-preserving encodings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loom.core.ids import ClientId, Generation, RequestId, RequestSeq, Seq, UShard, Version
from loom.kvstate import keys
from loom.kvstate.records import (
    DedupeRecord,
    FloorRecord,
    ValueRecord,
    decode_counter,
    decode_dedupe_record,
    decode_floor_record,
    decode_value_record,
    encode_counter,
    encode_dedupe_record,
    encode_floor_record,
    encode_value_record,
)

ushards = st.integers(0, keys.USHARD_MAX).map(UShard)
clients = st.text(max_size=8).map(ClientId)
request_seqs = st.integers(0, keys.REQUEST_SEQ_MAX).map(RequestSeq)


def inside(key: bytes, key_range: keys.KeyRange) -> bool:
    return key_range.start <= key < key_range.end


@given(ushards, st.binary(max_size=16))
def test_data_keys_round_trip_and_stay_inside_their_ushard_range(u: UShard, key: bytes) -> None:
    stored = keys.data_key(u, key)
    assert keys.parse_data_key(stored) == (u, key)
    assert inside(stored, keys.data_range(u))
    assert inside(stored, keys.ALL_DATA)
    assert keys.ushard_of_table_key(stored) == u


@given(ushards, ushards, st.binary(max_size=8), st.binary(max_size=8))
def test_data_keys_of_different_ushards_never_share_a_range(
    a: UShard, b: UShard, key_a: bytes, key_b: bytes
) -> None:
    if a != b:
        assert not inside(keys.data_key(a, key_a), keys.data_range(b))
        assert not inside(keys.data_key(b, key_b), keys.data_range(a))


@given(ushards, st.binary(max_size=6), st.binary(max_size=6))
def test_a_prefix_range_holds_exactly_the_keys_with_that_prefix(
    u: UShard, prefix: bytes, key: bytes
) -> None:
    assert inside(keys.data_key(u, key), keys.data_prefix_range(u, prefix)) == key.startswith(
        prefix
    )


@given(ushards, clients, request_seqs)
def test_dedupe_keys_round_trip(u: UShard, client: ClientId, seq: RequestSeq) -> None:
    stored = keys.dedupe_key(u, RequestId(client=client, seq=seq))
    assert keys.parse_dedupe_key(stored) == (u, client, seq)
    assert keys.parse_dedupe_key(keys.floor_key(u, client)) == (u, client, None)
    assert inside(stored, keys.dedupe_range(u))
    assert keys.floor_key(u, client) < stored


@given(ushards, clients, clients, request_seqs, request_seqs)
def test_one_clients_entries_are_contiguous_and_ordered_by_seq(
    u: UShard, a: ClientId, b: ClientId, seq_a: RequestSeq, seq_b: RequestSeq
) -> None:
    key_a = keys.dedupe_key(u, RequestId(client=a, seq=seq_a))
    key_b = keys.dedupe_key(u, RequestId(client=b, seq=seq_b))
    below_b = keys.client_entries_below(u, b, RequestSeq(seq_b + 1))
    if a == b:
        assert (key_a < key_b) == (seq_a < seq_b)
        assert inside(key_a, below_b) == (seq_a <= seq_b)
    else:
        # The length prefix keeps "ab" out of "a"'s range whatever the seq bytes are.
        assert not inside(key_a, below_b)
    assert not inside(keys.floor_key(u, b), below_b)


@given(ushards, st.integers(0, keys.WALL_MS_MAX), clients, st.none() | request_seqs)
def test_dedupe_age_keys_round_trip_and_point_at_their_record(
    u: UShard, wall_ms: int, client: ClientId, seq: RequestSeq | None
) -> None:
    stored = keys.dedupe_age_key(u, wall_ms, client, seq)
    assert keys.parse_dedupe_age_key(stored) == (u, wall_ms, client, seq)
    expected = (
        keys.floor_key(u, client)
        if seq is None
        else keys.dedupe_key(u, RequestId(client=client, seq=seq))
    )
    assert keys.dedupe_entry_key_for_age_key(stored) == expected
    assert inside(stored, keys.dedupe_age_range(u))
    assert inside(stored, keys.dedupe_age_range(u, wall_ms + 1))
    assert not inside(stored, keys.dedupe_age_range(u, wall_ms))


def test_every_ushard_table_is_inside_the_ushards_ranges_and_all_ranges() -> None:
    u = UShard(keys.USHARD_MAX)
    request = RequestId(client=ClientId("c"), seq=RequestSeq(1))
    owned = [
        keys.data_key(u, b"\xff\xff"),
        keys.dedupe_key(u, request),
        keys.floor_key(u, request.client),
        keys.dedupe_age_key(u, 5, request.client, request.seq),
        keys.dedupe_count_key(u),
    ]
    for stored in owned:
        assert sum(inside(stored, r) for r in keys.ushard_ranges(u)) == 1
        assert sum(inside(stored, r) for r in keys.ALL_RANGES) == 1
    assert sum(inside(keys.TOMBSTONE_HORIZON_KEY, r) for r in keys.ALL_RANGES) == 1
    assert not any(inside(keys.TOMBSTONE_HORIZON_KEY, r) for r in keys.ushard_ranges(u))


def test_prefix_end_skips_trailing_ff_bytes() -> None:
    assert keys.prefix_end(b"a") == b"b"
    assert keys.prefix_end(b"a\xff\xff") == b"b"
    assert keys.prefix_end(b"a\x00") == b"a\x01"


def test_client_validation_bounds_the_client_id_length() -> None:
    ok = RequestId(client=ClientId("x" * keys.CLIENT_ID_BYTES_MAX), seq=RequestSeq(0))
    too_long = RequestId(client=ClientId("é" * keys.CLIENT_ID_BYTES_MAX), seq=RequestSeq(0))
    assert keys.is_valid_request(ok)
    assert not keys.is_valid_request(too_long)
    assert not keys.is_valid_request(RequestId(client=ClientId("c"), seq=RequestSeq(2**64)))


versions = st.builds(
    Version,
    generation=st.integers(0, 2**32),
    seq=st.integers(0, 2**63),
    index=st.integers(0, 255),
)


@given(versions, st.none() | st.binary(max_size=8), st.integers(0, 2**63))
def test_records_round_trip(version: Version, value: bytes | None, expires_at_ms: int) -> None:
    record = ValueRecord(version=version, value=value, expires_at_ms=expires_at_ms)
    assert decode_value_record(encode_value_record(record)) == record
    dedupe = DedupeRecord(wall_ms=expires_at_ms, result=b"r")
    assert decode_dedupe_record(encode_dedupe_record(dedupe)) == dedupe
    floor = FloorRecord(wall_ms=expires_at_ms, floor=RequestSeq(3))
    assert decode_floor_record(encode_floor_record(floor)) == floor


def test_a_value_record_starts_with_its_format_version() -> None:
    record = ValueRecord(version=Version(generation=Generation(1), seq=Seq(2), index=3), value=b"v")
    assert encode_value_record(record)[1] == 1  # array header, then tag 1


@given(st.integers(-(2**63), 2**63 - 1))
def test_counters_round_trip(n: int) -> None:
    assert decode_counter(encode_counter(n)) == n
    assert decode_counter(encode_counter(n) + b"\x00") is None
