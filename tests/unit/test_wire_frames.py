"""Frames and envelopes: round trips, arbitrary splits, typed rejection of bad input."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom.core.errors import InvalidArgument
from loom.wire.envelope import (
    BATCH_ITEMS_MAX,
    BadEnvelope,
    Batch,
    Request,
    Response,
    decode_items,
    encode_envelope,
    encode_items,
)
from loom.wire.frames import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    BadFrame,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
)


def test_a_frame_round_trips_through_the_decoder() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"hello")) == [b"hello"]
    assert decoder.buffered_bytes == 0


def test_an_empty_payload_is_a_valid_frame() -> None:
    assert FrameDecoder().feed(encode_frame(b"")) == [b""]


def test_the_header_is_magic_version_flags_and_big_endian_length() -> None:
    frame = encode_frame(b"abc")
    assert frame[:HEADER_BYTES] == bytes([MAGIC, VERSION, 0, 0, 0, 0, 3])
    assert len(frame) == HEADER_BYTES + 3


def test_coalesced_frames_come_out_in_order() -> None:
    payloads = [b"a", b"", b"bc" * 100, b"d"]
    stream = b"".join(encode_frame(payload) for payload in payloads)
    assert FrameDecoder().feed(stream) == payloads


def test_a_frame_fed_one_byte_at_a_time_is_decoded_once_complete() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(b"payload")
    results = [decoder.feed(frame[index : index + 1]) for index in range(len(frame))]
    assert results[:-1] == [[]] * (len(frame) - 1)
    assert results[-1] == [b"payload"]


def test_encoding_an_oversize_payload_raises_frame_too_large() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, frame_bytes_max=10)


def test_an_oversize_header_is_rejected_before_its_payload_is_buffered() -> None:
    decoder = FrameDecoder(frame_bytes_max=10)
    header = bytes([MAGIC, VERSION, 0]) + (11).to_bytes(4, "big")
    with pytest.raises(FrameTooLarge):
        decoder.feed(header)
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize(
    "header",
    [
        bytes([0x00, VERSION, 0, 0, 0, 0, 1]),  # bad magic
        bytes([MAGIC, VERSION + 1, 0, 0, 0, 0, 1]),  # unknown version
        bytes([MAGIC, VERSION, 0x01, 0, 0, 0, 1]),  # unknown flag
    ],
)
def test_a_bad_header_raises_bad_frame_and_breaks_the_decoder(header: bytes) -> None:
    decoder = FrameDecoder()
    with pytest.raises(BadFrame):
        decoder.feed(header + b"x")
    with pytest.raises(BadFrame):
        decoder.feed(encode_frame(b"fine"))


def test_frame_errors_are_invalid_arguments() -> None:
    assert issubclass(FrameTooLarge, InvalidArgument)
    assert issubclass(BadFrame, InvalidArgument)


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_payloads_split_anywhere_decode_to_the_same_payloads(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(payload, frame_bytes_max=300) for payload in payloads)
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    decoder = FrameDecoder(frame_bytes_max=300)
    decoded: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        decoded.extend(decoder.feed(stream[start:end]))
        assert decoder.buffered_bytes <= max(HEADER_BYTES, 300)
    assert decoded == payloads
    assert decoder.buffered_bytes == 0


def test_a_batch_of_requests_and_responses_round_trips() -> None:
    items = (
        Request(request_id=1, deadline_ms=100, body=b"q"),
        Response(request_id=2, body=b"r"),
        Response(request_id=3, error="handler_failed: boom"),
    )
    assert decode_items(encode_items(items)) == items
    assert decode_items(encode_items(items[:1])) == items[:1]


def test_a_batch_over_the_limit_is_refused_on_both_sides() -> None:
    items = tuple(Response(request_id=index) for index in range(BATCH_ITEMS_MAX + 1))
    with pytest.raises(InvalidArgument):
        encode_envelope(Batch(items=items))
    with pytest.raises(BadEnvelope):
        decode_items(msgspec.msgpack.encode(Batch(items=items)))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x93\xa3rq1\x01\x02",
        b"\x94\xa3zz1\x01\x02\xc4\x00",
        b"\x94\xa3rq1\xff\x02\xc4\x00",
    ],
)
def test_a_malformed_envelope_raises_bad_envelope(payload: bytes) -> None:
    with pytest.raises(BadEnvelope):
        decode_items(payload)
