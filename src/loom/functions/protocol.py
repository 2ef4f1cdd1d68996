"""Messages between workers and schedulers (msgspec MessagePack, tagged, typed).

A worker pulls: `Pull` says which functions it runs and how many free slots it has;
the scheduler answers, within `wait_ms`, with `Work` — batches of calls it claimed for
that worker (a batch of one for an unbatched function). After recording outcomes in
the store, the worker sends `Report` to the scheduler that dispatched them: which
calls finished, which downstreams pushed back, and (to every scheduler) the calls
still running, as heartbeats.
"""

from __future__ import annotations

import msgspec

from loom.core.errors import InvalidArgument
from loom.functions.queue import CallRecord

MESSAGE_BYTES_MAX = 16 * 1024 * 1024
SLOTS_PER_PULL_MAX = 4096
WAIT_MS_MAX = 30_000


class Pull(msgspec.Struct, frozen=True, kw_only=True, tag="pull1"):
    worker: str
    app: str
    functions: tuple[str, ...]
    slots: int
    wait_ms: int


class Work(msgspec.Struct, frozen=True, kw_only=True, tag="work1"):
    scheduler: str
    batches: tuple[tuple[CallRecord, ...], ...] = ()


class Finished(msgspec.Struct, frozen=True, array_like=True):
    call_id: str
    attempt: int
    duration_ms: int


class Signal(msgspec.Struct, frozen=True, array_like=True):
    """Back-pressure from a downstream: `Throttled` met by a call, or a function
    saying so itself (`Context.backpressure`)."""

    downstream: str
    kind: str  # "throttled" | "explicit"


class Report(msgspec.Struct, frozen=True, kw_only=True, tag="report1"):
    worker: str
    finished: tuple[Finished, ...] = ()
    signals: tuple[Signal, ...] = ()
    running: tuple[tuple[str, int], ...] = ()  # (call id, attempt) still running


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag="ack1"):
    pass


Message = Pull | Work | Report | Ack
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _ENCODER.encode(message)


def decode(body: bytes) -> Message:
    if len(body) > MESSAGE_BYTES_MAX:
        raise InvalidArgument("functions message too large")
    try:
        message: Message = _DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"bad functions message: {str(error)[:200]}") from None
    if isinstance(message, Pull) and not (
        1 <= message.slots <= SLOTS_PER_PULL_MAX and 0 <= message.wait_ms <= WAIT_MS_MAX
    ):
        raise InvalidArgument("pull slots or wait out of range")
    return message
