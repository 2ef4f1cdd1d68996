"""On-disk layout of one replica inside its shard's prefix. Format v1.

P          promise record (ballot, config, prior config)
C          commit point known to this replica
A          applied_seq: written in the same atomic batch as the data it covers
T          truncation point (seq, ballot of that entry)
I          the μshards the p-shard was created with ([first, end) ranges); absent: all
L<seq>     log entries, seq as 8 bytes big-endian
K...       the kv state machine's namespace (loom.kvstate.keys)
"""

from __future__ import annotations

import msgspec

from loom.core.ids import ZERO_BALLOT, Ballot, Seq, UShard
from loom.kvstate.overlay import StateReader
from loom.paxos.durable import DurableState
from loom.paxos.messages import Entry
from loom.paxos.ready import PromiseRecord
from loom.storage.api import WriteBatch

PROMISE = b"P"
COMMIT = b"C"
APPLIED = b"A"
TRUNCATED = b"T"
INITIAL = b"I"
LOG = b"L"
LOG_END = b"M"
STATE = b"K"
STATE_END = b"L"

_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(Entry)
_promise_decoder = msgspec.msgpack.Decoder(PromiseRecord)
_truncated_decoder = msgspec.msgpack.Decoder(tuple[int, Ballot])
_initial_decoder = msgspec.msgpack.Decoder(tuple[tuple[int, int], ...])


def log_key(seq: Seq) -> bytes:
    return LOG + seq.to_bytes(8, "big")


def encode_seq(seq: Seq) -> bytes:
    return seq.to_bytes(8, "big")


def decode_seq(data: bytes | None) -> Seq:
    return Seq(int.from_bytes(data, "big")) if data else Seq(0)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def load(store: StateReader) -> DurableState:
    """Rebuild what an acceptor remembers from its shard's namespace."""
    state = DurableState()
    promise = store.get(PROMISE)
    if promise is not None:
        state.promise = _promise_decoder.decode(promise)
    state.commit_seq = decode_seq(store.get(COMMIT))
    state.applied_seq = decode_seq(store.get(APPLIED))
    truncated = store.get(TRUNCATED)
    if truncated is not None:
        seq, ballot = _truncated_decoder.decode(truncated)
        state.truncated_seq, state.truncated_ballot = Seq(seq), ballot
    for _key, value in store.scan(LOG, LOG_END):
        entry = _entry_decoder.decode(value)
        state.entries[entry.seq] = entry
    return state


def put_promise(batch: WriteBatch, record: PromiseRecord) -> None:
    batch.put(PROMISE, _encoder.encode(record))


def put_entry(batch: WriteBatch, entry: Entry) -> None:
    batch.put(log_key(entry.seq), encode_entry(entry))


def put_commit(batch: WriteBatch, seq: Seq) -> None:
    batch.put(COMMIT, encode_seq(seq))


def put_applied(batch: WriteBatch, seq: Seq) -> None:
    batch.put(APPLIED, encode_seq(seq))


def truncate(batch: WriteBatch, through: Seq, ballot: Ballot = ZERO_BALLOT) -> None:
    batch.delete_range(LOG, log_key(Seq(through + 1)))
    batch.put(TRUNCATED, _encoder.encode((through, ballot)))


def put_initial(batch: WriteBatch, ranges: tuple[tuple[int, int], ...]) -> None:
    batch.put(INITIAL, _encoder.encode(ranges))


def load_initial(store: StateReader) -> frozenset[UShard] | None:
    """The μshards the p-shard was created with; None if never recorded (all)."""
    stored = store.get(INITIAL)
    if stored is None:
        return None
    ranges = _initial_decoder.decode(stored)
    return frozenset(UShard(u) for first, end in ranges for u in range(first, end))
