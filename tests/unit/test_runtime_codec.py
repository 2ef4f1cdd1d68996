"""The node codec: every message type round-trips; bad input is always `BadMessage`."""

from __future__ import annotations

import math
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core.errors import InvalidArgument
from loom.core.ids import (
    Ballot,
    ClientId,
    Epoch,
    Generation,
    Incarnation,
    MoveId,
    NodeId,
    RequestId,
    RequestSeq,
    Seq,
    ShardId,
    UShard,
    Version,
)
from loom.host.requests import (
    ClientReply,
    ClientRequest,
    Consistency,
    Durability,
    ErrorCode,
    ErrorReply,
    ExportReply,
    ExportRequest,
    HoldingReply,
    HoldingRequest,
    KeyRead,
    MoveRequest,
    ReadReply,
    ReadRequest,
    ScanReply,
    ScanRequest,
    WriteReply,
    WriteRequest,
)
from loom.kvstate.commands import Applied, Freeze, Put, Rejected, Result, encode_command
from loom.kvstate.reads import Item
from loom.paxos.messages import (
    Accept,
    Accepted,
    Config,
    Entry,
    Envelope,
    FreshnessProbe,
    FreshnessReply,
    Heartbeat,
    HeartbeatAck,
    Learn,
    LearnAck,
    LeaseRelease,
    Message,
    Nack,
    Prepare,
    Promise,
    SnapshotAck,
    SnapshotChunk,
)
from loom.paxos.ready import SmEvent, SmEventKind
from loom.paxos.replica import Assignment
from loom.runtime.codec import (
    MESSAGE_BYTES_MAX,
    AssignMessage,
    BadMessage,
    ClientAnswer,
    ClientCall,
    CreateKeyspace,
    CreateTenant,
    CreateToken,
    Done,
    DropKeyspace,
    DropShard,
    Failure,
    KeyspaceReply,
    ListTenants,
    ListTokens,
    ManagerEvent,
    MoverAnswer,
    MoverCall,
    NodeMessage,
    NodeReportMessage,
    NodeStatus,
    PeerMessage,
    PrimaryMoved,
    ReshardKeyspace,
    ReshardReport,
    ReshardStatus,
    RevokeToken,
    RoutingPush,
    RoutingRequest,
    SetKeyspaceTier,
    SetQuota,
    ShardStatus,
    StatusReply,
    StatusRequest,
    TenantsReply,
    TokenInfo,
    TokenReply,
    TokensReply,
    TransferPrimaryCall,
    decode,
    encode,
)
from loom.shardmgr.core import NodeReport, ShardProgress
from loom.shardmgr.routing import (
    Keyspace,
    KeyspaceSpec,
    NodeInfo,
    NodeRoute,
    Quota,
    RoutingTable,
    ShardPlacement,
    ShardRoute,
)
from loom.shardmgr.tenancy import Tenant, TokenGrant

BALLOT = Ballot(epoch=Epoch(7), node=NodeId("n2"), incarnation=Incarnation(3))
OLDER = Ballot(epoch=Epoch(6), node=NodeId("n1"), incarnation=Incarnation(1))
VERSION = Version(generation=Generation(2), seq=Seq(41), index=1)
CONFIG = Config(
    epoch=Epoch(7), acceptors=(NodeId("n1"), NodeId("n2"), NodeId("n3")), followers=(NodeId("f"),)
)
PUT = encode_command(
    Put(
        request=RequestId(client=ClientId("c"), seq=RequestSeq(9)),
        ushard=UShard(4),
        key=b"k",
        value=b"v",
    )
)
ENTRY = Entry(
    ballot=BALLOT, seq=Seq(41), wall_ms=1_700_000_000_000, epoch=Epoch(7), commands=(PUT,)
)
NOOP_ENTRY = Entry(ballot=OLDER, seq=Seq(42), wall_ms=0, epoch=Epoch(6), commands=())

# One example of every replication message; the completeness test keeps it complete.
REPLICATION: tuple[Message, ...] = (
    Prepare(ballot=BALLOT, config=CONFIG, commit_seq=Seq(40)),
    Promise(
        ballot=BALLOT,
        commit_seq=Seq(40),
        truncated_seq=Seq(10),
        prior_config=CONFIG,
        entries=(ENTRY, NOOP_ENTRY),
        incarnation=Incarnation(3),
    ),
    Promise(
        ballot=BALLOT,
        commit_seq=Seq(0),
        truncated_seq=Seq(0),
        prior_config=None,
        entries=(),
        incarnation=Incarnation(0),
    ),
    Nack(ballot=OLDER, promised=BALLOT),
    Accept(ballot=BALLOT, entries=(ENTRY, NOOP_ENTRY), commit_seq=Seq(40), round=5),
    Accepted(ballot=BALLOT, match_seq=Seq(42), round=5, lease_granted=True, commit_seq=Seq(40)),
    Heartbeat(ballot=BALLOT, commit_seq=Seq(42), round=6),
    HeartbeatAck(ballot=BALLOT, round=6, lease_granted=False, match_seq=Seq(42)),
    Learn(ballot=BALLOT, entries=(ENTRY,), commit_seq=Seq(41)),
    LearnAck(ballot=BALLOT, applied_seq=Seq(41), held_seq=Seq(41)),
    FreshnessProbe(probe=12),
    FreshnessReply(probe=12, commit_seq=Seq(42), ballot=BALLOT),
    LeaseRelease(ballot=BALLOT),
    SnapshotChunk(
        ballot=BALLOT,
        transfer=3,
        snapshot_seq=Seq(40),
        snapshot_ballot=OLDER,
        index=0,
        items=((b"key", b"value"), (b"", b"\x00\xff")),
        last=True,
    ),
    SnapshotAck(transfer=3, index=-1, installed=False),
)

REQUESTS: tuple[ClientRequest, ...] = (
    WriteRequest(token=1, command=PUT),
    WriteRequest(token=2**63 - 1, command=PUT, durability=Durability.FAST_ACK),
    ReadRequest(token=3, ushard=UShard(4), key=b"k"),
    ReadRequest(
        token=4,
        ushard=UShard(4),
        key=b"\x00k",
        consistency=Consistency.BOUNDED,
        bound_ms=250.5,
        min_version=VERSION,
    ),
    *(ReadRequest(token=5, ushard=UShard(0), key=b"k", consistency=c) for c in Consistency),
    ReadRequest(token=9, ushard=UShard(0), key=b"k", also=(b"", b"\x00k2")),
    ScanRequest(token=6, ushard=UShard(1)),
    ScanRequest(
        token=7,
        ushard=UShard(1),
        prefix=b"user:1/",
        start_after=b"user:1/a",
        limit=10,
        consistency=Consistency.READ_YOUR_WRITES,
        min_version=VERSION,
    ),
)

APPLIED: Result = Applied(version=VERSION, counter=-3, existed=False)
REJECTED: Result = Rejected(reason="condition", message="version moved", current=VERSION)
REPLIES: tuple[ClientReply, ...] = (
    WriteReply(token=1, result=APPLIED),
    WriteReply(token=2, result=REJECTED, fast_ack_ballot=BALLOT),
    WriteReply(token=3, result=Rejected(reason="epoch", message="")),
    ReadReply(
        token=4,
        item=Item(key=b"k", value=b"v" * 100, version=VERSION, expires_at_ms=5),
        record_version=VERSION,
        applied_seq=Seq(41),
        epoch=Epoch(7),
    ),
    ReadReply(token=5, item=None, record_version=None, applied_seq=Seq(0), epoch=Epoch(0)),
    ReadReply(
        token=9,
        item=None,
        record_version=VERSION,
        applied_seq=Seq(3),
        epoch=Epoch(1),
        also=(
            KeyRead(item=Item(key=b"b", value=b"2", version=VERSION), record_version=VERSION),
            KeyRead(item=None, record_version=None),
        ),
    ),
    ScanReply(
        token=8,
        items=(Item(key=b"a", value=b"1", version=VERSION),),
        cursor=b"a",
        applied_seq=Seq(3),
        epoch=Epoch(2),
    ),
    ScanReply(token=9, items=(), cursor=None, applied_seq=Seq(0), epoch=Epoch(0)),
    *(
        ErrorReply(token=6, code=code, message="ünïcode", primary_hint=NodeId("n1"))
        for code in ErrorCode
    ),
    ErrorReply(token=7, code=ErrorCode.OVERLOADED, retry_after_ms=10),
)

_ASSIGNMENT = Assignment(
    epoch=Epoch(4),
    primary=NodeId("n2"),
    primary_incarnation=Incarnation(9),
    config=Config(Epoch(4), (NodeId("n1"), NodeId("n2"), NodeId("n3")), (NodeId("n4"),)),
    prior_configs=(Config(Epoch(3), (NodeId("n1"), NodeId("n2"), NodeId("n3")), ()),),
    activated_epoch=Epoch(3),
)
_SPEC = KeyspaceSpec(name="ks", shards=2, replication=3, ushards=64, regions=("a", "b"))
_KEYSPACE = Keyspace(
    spec=_SPEC,
    placements=(
        ShardPlacement(ShardId(3), (NodeId("n1"), NodeId("n2"), NodeId("n3"))),
        ShardPlacement(ShardId(4), (NodeId("n2"), NodeId("n1"), NodeId("n3"))),
    ),
    ranges=((0, ShardId(3)), (32, ShardId(4))),
    tenant="acme",
    quota=Quota(writes_per_s=250.0),
)
_TABLE = RoutingTable(
    version=(1_700_000_000_000, 5),
    keyspaces=(_KEYSPACE,),
    shards=(
        ShardRoute(
            shard=ShardId(3),
            keyspace="ks",
            epoch=4,
            primary=NodeId("n2"),
            acceptors=(NodeId("n1"), NodeId("n2"), NodeId("n3")),
            ready=True,
        ),
    ),
    nodes=(NodeRoute(info=NodeInfo(node=NodeId("n1"), host="h", port=1), alive=False),),
    manager="127.0.0.1:7300",
    auth=True,
    tenants=(Tenant(name="acme", weight=2),),
    tokens=(TokenGrant(digest="ab" * 32, tenant="acme", admin=True),),
)
CONTROL: tuple[NodeMessage, ...] = (
    NodeReportMessage(
        report=NodeReport(
            node=NodeId("n1"),
            incarnation=Incarnation(7),
            shards=(
                ShardProgress(
                    shard=ShardId(3),
                    last_seq=Seq(9),
                    commit_seq=Seq(8),
                    applied_seq=Seq(8),
                    is_primary=False,
                ),
            ),
        ),
        info=NodeInfo(node=NodeId("n1"), host="127.0.0.1", port=7401, region="a", pid=12),
    ),
    ManagerEvent(
        shard=ShardId(3),
        event=SmEvent(kind=SmEventKind.ACTIVATED, ballot=_ASSIGNMENT.ballot, config=None),
    ),
    AssignMessage(shard=ShardId(3), assignment=_ASSIGNMENT),
    AssignMessage(shard=ShardId(3), assignment=_ASSIGNMENT, initial=((0, 16), (40, 41))),
    DropShard(shard=ShardId(3)),
    CreateKeyspace(spec=_SPEC),
    DropKeyspace(name="ks"),
    ReshardKeyspace(name="ks", shards=4),
    TransferPrimaryCall(shard=3, to="n2", auth="tok"),
    PrimaryMoved(shard=3, primary="n2", epoch=7),
    SetKeyspaceTier(name="ks", tier="gold"),
    ReshardStatus(name="ks", auth="loom_x"),
    ReshardReport(
        name="ks",
        moves_left=2,
        retiring=(ShardId(4), ShardId(5)),
        pauses=((UShard(3), 812.5), (UShard(1), 40.0)),
    ),
    MoverCall(shard=ShardId(3), request=HoldingRequest(token=7, ushards=64)),
    MoverAnswer(reply=HoldingReply(token=7, ushards=(UShard(2), UShard(9)))),
    MoverCall(
        shard=ShardId(3),
        request=MoveRequest(
            token=5, command=encode_command(Freeze(ushard=UShard(2), move_id=MoveId(1)))
        ),
    ),
    MoverCall(
        shard=ShardId(3),
        request=ExportRequest(token=6, ushard=UShard(2), move_id=MoveId(1), after=b"d", limit=9),
    ),
    MoverAnswer(
        reply=ExportReply(
            token=6, records=((b"k", b"v"),), cursor=b"k", generation=Generation(1), total=3
        )
    ),
    MoverAnswer(
        reply=WriteReply(token=5, result=Applied(version=Version(Generation(1), Seq(2), 0)))
    ),
    MoverAnswer(reply=ErrorReply(token=5, code=ErrorCode.MOVED, message="moved")),
    SetQuota(name="ks", quota=Quota(reads_per_s=10.0, bytes_max=1 << 20)),
    KeyspaceReply(keyspace=_KEYSPACE),
    KeyspaceReply(keyspace=msgspec.structs.replace(_KEYSPACE, retiring=(ShardId(9),))),
    CreateTenant(tenant=Tenant(name="acme", weight=3), auth="loom_x"),
    ListTenants(auth="loom_x"),
    TenantsReply(tenants=(Tenant(name="acme"), Tenant(name="globex", weight=2))),
    CreateToken(tenant="acme", admin=True, auth="loom_x"),
    TokenReply(secret="loom_s", token_id="0123456789ab", tenant="acme", admin=False),
    ListTokens(auth="loom_x"),
    TokensReply(tokens=(TokenInfo(token_id="0123456789ab", tenant="acme", admin=True),)),
    RevokeToken(token_id="0123456789ab", auth="loom_x"),
    Done(),
    RoutingRequest(),
    RoutingPush(table=_TABLE),
    _TABLE,
    Failure(kind="not_found", message="no keyspace 'x'", retry_after_ms=3),
    StatusRequest(),
    StatusReply(
        nodes=(NodeStatus(node=NodeId("n1"), address="127.0.0.1:7400", alive=True, incarnation=3),),
        shards=(
            ShardStatus(
                shard=ShardId(3),
                keyspace="ks",
                epoch=4,
                primary=NodeId("n2"),
                activated=True,
                acceptors=(NodeId("n1"), NodeId("n2"), NodeId("n3")),
                followers=(),
                progress={"n1": (8, 9)},
            ),
        ),
    ),
)

EXAMPLES: tuple[NodeMessage, ...] = (
    *(
        PeerMessage(
            envelope=Envelope(shard=ShardId(3), src=NodeId("n2"), dst=NodeId("n1"), message=m)
        )
        for m in REPLICATION
    ),
    *(ClientCall(shard=ShardId(3), request=r) for r in REQUESTS),
    *(ClientAnswer(reply=r) for r in REPLIES),
    *CONTROL,
)


def _union_members(union: object) -> set[type]:
    return set(typing.get_args(union))


def test_the_examples_cover_every_message_request_reply_and_result_type() -> None:
    assert {type(m) for m in REPLICATION} == _union_members(Message)
    assert {type(r) for r in REQUESTS} == _union_members(ClientRequest)
    assert {type(r) for r in REPLIES} == _union_members(ClientReply)
    results = {type(r.result) for r in REPLIES if isinstance(r, WriteReply)}
    assert results == _union_members(Result)
    assert {type(m) for m in EXAMPLES} == _union_members(NodeMessage)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips_exactly(message: NodeMessage) -> None:
    decoded = decode(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_enums_decode_as_enum_members_not_strings() -> None:
    call = decode(encode(ClientCall(shard=ShardId(1), request=REQUESTS[3])))
    assert isinstance(call, ClientCall)
    assert isinstance(call.request, ReadRequest)
    assert call.request.consistency is Consistency.BOUNDED


def test_the_top_level_tag_names_the_codec_version() -> None:
    data = encode(ClientAnswer(reply=REPLIES[0]))
    assert b"ca1" in data


def test_a_message_of_another_kind_or_version_is_refused() -> None:
    data = encode(ClientAnswer(reply=REPLIES[0])).replace(b"ca1", b"ca2")
    with pytest.raises(BadMessage, match="ca2"):
        decode(data)


def test_a_field_of_the_wrong_type_is_refused() -> None:
    data = encode(ClientCall(shard=ShardId(1), request=REQUESTS[0])).replace(b"quorum", b"QUORUM")
    with pytest.raises(BadMessage):
        decode(data)


def test_bad_message_is_an_invalid_argument() -> None:
    assert issubclass(BadMessage, InvalidArgument)


def test_an_int_msgpack_cannot_hold_is_refused_on_encode() -> None:
    with pytest.raises(BadMessage, match="cannot encode"):
        encode(ClientAnswer(reply=ErrorReply(token=2**64, code=ErrorCode.INVALID)))


def test_nan_bound_survives_the_round_trip() -> None:
    # NaN != NaN, so the table above cannot hold it; a client may still send one.
    request = ReadRequest(token=1, ushard=UShard(0), key=b"", bound_ms=math.nan)
    call = decode(encode(ClientCall(shard=ShardId(0), request=request)))
    assert isinstance(call, ClientCall)
    assert isinstance(call.request, ReadRequest)
    assert call.request.bound_ms is not None
    assert math.isnan(call.request.bound_ms)


def test_oversize_input_is_refused_before_decoding() -> None:
    # Valid msgpack (a nil) padded to one byte over the limit: only the size check fires.
    with pytest.raises(BadMessage, match="over"):
        decode(b"\xc0" * (MESSAGE_BYTES_MAX + 1))
    data = encode(ClientAnswer(reply=REPLIES[0]))
    with pytest.raises(BadMessage, match="over"):
        decode(data, bytes_max=len(data) - 1)
    assert decode(data, bytes_max=len(data)) == ClientAnswer(reply=REPLIES[0])


def test_a_message_too_large_to_receive_is_refused_on_encode() -> None:
    big = ClientCall(shard=ShardId(0), request=WriteRequest(token=1, command=b"x" * 100))
    with pytest.raises(BadMessage, match="over"):
        encode(big, bytes_max=50)


# --- properties ---------------------------------------------------------------------

_U63 = st.integers(min_value=0, max_value=2**63 - 1)
_NODES = st.text(max_size=8).map(NodeId)
_BALLOTS = st.builds(Ballot, epoch=_U63.map(Epoch), node=_NODES, incarnation=_U63.map(Incarnation))
_ENTRIES = st.builds(
    Entry,
    ballot=_BALLOTS,
    seq=_U63.map(Seq),
    wall_ms=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    epoch=_U63.map(Epoch),
    commands=st.lists(st.binary(max_size=64), max_size=4).map(tuple),
)
_ACCEPTS = st.builds(
    Accept,
    ballot=_BALLOTS,
    entries=st.lists(_ENTRIES, max_size=8).map(tuple),
    commit_seq=_U63.map(Seq),
    round=_U63,
)


@settings(max_examples=150, deadline=None)
@given(accept=_ACCEPTS, shard=_U63.map(ShardId), src=_NODES, dst=_NODES)
def test_random_accepts_round_trip_exactly(
    accept: Accept, shard: ShardId, src: NodeId, dst: NodeId
) -> None:
    message = PeerMessage(envelope=Envelope(shard=shard, src=src, dst=dst, message=accept))
    assert decode(encode(message)) == message


def _decodes_or_is_refused(data: bytes) -> None:
    try:
        message = decode(data)
    except BadMessage:
        return
    assert isinstance(message, typing.get_args(NodeMessage))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_decode_or_raise_bad_message(data: bytes) -> None:
    _decodes_or_is_refused(data)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_truncated_encodings_always_raise_bad_message(data: st.DataObject) -> None:
    message = data.draw(st.sampled_from(EXAMPLES))
    encoded = encode(message)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(BadMessage):
        decode(encoded[:cut])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_encodings_decode_or_raise_bad_message(data: st.DataObject) -> None:
    encoded = bytearray(encode(data.draw(st.sampled_from(EXAMPLES))))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
        encoded[at] = data.draw(st.integers(min_value=0, max_value=255))
    _decodes_or_is_refused(bytes(encoded))


def test_a_string_that_is_not_utf8_is_a_bad_message() -> None:
    # Regression: msgspec raises UnicodeDecodeError (not DecodeError) for these.
    data = encode(ClientAnswer(reply=ErrorReply(token=1, code=ErrorCode.INVALID, message="ab")))
    with pytest.raises(BadMessage, match="UTF-8"):
        decode(data.replace(b"\xa2ab", b"\xa2\xffb"))
