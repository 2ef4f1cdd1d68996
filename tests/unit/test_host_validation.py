"""A host refuses malformed client input with a typed INVALID reply and never crashes."""

import math

import msgspec
import pytest

from loom.core.ids import (
    ClientId,
    Incarnation,
    NodeId,
    RequestId,
    RequestSeq,
    Seq,
    ShardId,
    UShard,
)
from loom.core.time import Instant, WallMs
from loom.host.requests import (
    Consistency,
    Durability,
    ErrorCode,
    ErrorReply,
    ReadRequest,
    WriteRequest,
)
from loom.host.shard import ShardHost
from loom.kvstate.commands import Gc, Increment, Put, encode_command
from loom.paxos.params import ReplicaParams
from loom.storage.memory import MemoryStore


def host() -> ShardHost:
    return ShardHost(
        shard=ShardId(1),
        node=NodeId("n1"),
        incarnation=Incarnation(1),
        store=MemoryStore(),
        params=ReplicaParams(),
        now=Instant(0.0),
    )


def only_reply(h: ShardHost) -> ErrorReply:
    out = h.flush(Instant(1.0), WallMs(1))
    assert len(out.replies) == 1
    reply = out.replies[0][1]
    assert isinstance(reply, ErrorReply)
    return reply


PUT = Put(request=RequestId(ClientId("ab"), RequestSeq(1)), ushard=UShard(1), key=b"k", value=b"v")


@pytest.mark.parametrize(
    ("command", "durability"),
    [
        (b"\x00garbage", Durability.QUORUM),
        (encode_command(PUT).replace(b"ab", b"\xff\xfe"), Durability.QUORUM),  # not UTF-8
        (encode_command(Gc(tombstone_horizon=Seq(0), dedupe_before_wall_ms=0)), Durability.QUORUM),
        (encode_command(msgspec.structs.replace(PUT, if_absent=True)), Durability.FAST_ACK),
        (
            encode_command(Increment(request=PUT.request, ushard=PUT.ushard, key=b"c", delta=1)),
            Durability.FAST_ACK,
        ),
    ],
)
def test_malformed_or_forbidden_write_is_refused_as_invalid(
    command: bytes, durability: Durability
) -> None:
    h = host()
    h.submit(
        "client",
        WriteRequest(token=7, command=command, durability=durability),
        Instant(1.0),
        WallMs(1),
    )
    reply = only_reply(h)
    assert reply.token == 7
    assert reply.code is ErrorCode.INVALID


@pytest.mark.parametrize("bound", [None, 0.0, -5.0, math.nan, math.inf])
def test_bounded_read_without_a_finite_positive_bound_is_refused(bound: float | None) -> None:
    h = host()
    request = ReadRequest(
        token=3, ushard=UShard(1), key=b"k", consistency=Consistency.BOUNDED, bound_ms=bound
    )
    h.submit("client", request, Instant(1.0), WallMs(1))
    assert only_reply(h).code is ErrorCode.INVALID


def test_a_read_of_too_many_keys_is_refused() -> None:
    h = host()
    keys_max = h.p.limits.read_keys_max
    request = ReadRequest(token=3, ushard=UShard(1), key=b"k", also=(b"k",) * keys_max)
    h.submit("client", request, Instant(1.0), WallMs(1))
    reply = only_reply(h)
    assert reply.code is ErrorCode.INVALID and "at most" in reply.message
    long_key = b"x" * (h.p.limits.key_bytes_max + 1)
    h.submit(
        "client",
        ReadRequest(token=4, ushard=UShard(1), key=b"k", also=(long_key,)),
        Instant(1.0),
        WallMs(1),
    )
    assert only_reply(h).code is ErrorCode.INVALID
