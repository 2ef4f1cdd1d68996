"""The RPC envelope: what one frame's payload holds.

A payload is one msgpack-encoded `Request`, `Response` or `Batch` (many requests or
responses in one frame: pipelining without a frame per call). Bodies are opaque bytes;
what they mean is the business of the layer above.

Rules of this module:
- structs are tagged with their schema version (`"rq1"`, ...) and array-like: fields may
  only be appended, with defaults; a changed meaning gets a new tag;
- `deadline_ms` is a relative budget (ms left when sent), never a clock reading: hosts'
  clocks are not compared;
- a batch holds at most `BATCH_ITEMS_MAX` items, checked on encode and on decode;
- malformed input from a peer is `BadEnvelope` (never an assert, STYLE rule 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final

import msgspec

from loom.core.errors import InvalidArgument

BATCH_ITEMS_MAX: Final = 1024
_U63 = msgspec.Meta(ge=0, le=2**63 - 1)
_U32 = msgspec.Meta(ge=0, lt=2**32)

# Error codes a Response carries as "code: detail".
ERROR_OVERLOADED: Final = "overloaded"
ERROR_DEADLINE_EXCEEDED: Final = "deadline_exceeded"
ERROR_HANDLER_FAILED: Final = "handler_failed"


class BadEnvelope(InvalidArgument):
    """A payload is not a valid envelope; the peer broke the protocol."""


class Request(msgspec.Struct, tag="rq1", array_like=True, frozen=True, kw_only=True):
    request_id: Annotated[int, _U63]
    # Time budget left when sent, in ms; the server gives up on the call after it.
    deadline_ms: Annotated[int, _U32]
    body: bytes


class Response(msgspec.Struct, tag="rs1", array_like=True, frozen=True, kw_only=True):
    request_id: Annotated[int, _U63]
    body: bytes = b""
    # None on success, else "code: detail" with code one of the ERROR_* constants.
    error: str | None = None


class Batch(msgspec.Struct, tag="bt1", array_like=True, frozen=True, kw_only=True):
    items: Annotated[tuple[Request | Response, ...], msgspec.Meta(max_length=BATCH_ITEMS_MAX)]


Envelope = Request | Response | Batch

# Created once: msgspec encoders/decoders are reusable and hold no per-message state.
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final[msgspec.msgpack.Decoder[Envelope]] = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    if isinstance(envelope, Batch) and len(envelope.items) > BATCH_ITEMS_MAX:
        raise InvalidArgument(f"batch of {len(envelope.items)} items is over {BATCH_ITEMS_MAX}")
    return _ENCODER.encode(envelope)


def encode_items(items: Sequence[Request | Response]) -> bytes:
    """One item is sent bare, several as a `Batch`."""
    if len(items) == 1:
        return _ENCODER.encode(items[0])
    return encode_envelope(Batch(items=tuple(items)))


def decode_envelope(payload: bytes) -> Envelope:
    try:
        return _DECODER.decode(payload)
    # msgspec lets UnicodeDecodeError through for a string that is not UTF-8.
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise BadEnvelope(f"bad envelope: {error}") from None


def decode_items(payload: bytes) -> tuple[Request | Response, ...]:
    """The requests/responses a payload carries, in order."""
    envelope = decode_envelope(payload)
    if isinstance(envelope, Batch):
        return envelope.items
    return (envelope,)
