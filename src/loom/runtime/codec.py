"""The node's message codec, version 1: Python values to bytes for the network and back.

Everything a node sends another node or a client (the body of a `loom.wire.envelope`
request or response) is one `NodeMessage`, encoded here and nowhere else.

Rules of this module:
- the top-level structs are tagged with their schema version (`"pm1"`, `"cc1"`, `"ca1"`);
  the payload types they wrap (`loom.paxos.messages`, `loom.host.requests`) are wire
  format v1 and carry their own tags. A changed meaning gets a new tag, never a reused one;
- msgspec MessagePack with typed decoding: the decoder validates every field's type
  (NewType ids decode as their base type, enums by value, unions by tag). Never pickle
  (STYLE rule 12);
- input from a peer or client is untrusted: its size is checked *before* decoding, and
  anything that is not a valid `NodeMessage` is `BadMessage` with a short reason, never
  a raw msgspec exception (nor the `UnicodeDecodeError` msgspec lets out for a string
  that is not UTF-8) and never an assert (STYLE rule 5). Semantic checks (ballots,
  seqs, limits on entries) are the receiving core's business;
- one Encoder and one Decoder, created at import: they are reusable and hold no
  per-message state.
"""

from __future__ import annotations

import typing
from typing import Final, Literal

import msgspec

from loom.core.errors import InvalidArgument
from loom.core.ids import NodeId, ShardId, UShard
from loom.host.requests import ClientReply, ClientRequest, MoverReply, MoverRequest
from loom.paxos.messages import Envelope
from loom.paxos.ready import SmEvent
from loom.paxos.replica import Assignment
from loom.shardmgr.access import UShardAccess
from loom.shardmgr.core import NodeReport
from loom.shardmgr.routing import Keyspace, KeyspaceSpec, NodeInfo, Quota, RoutingTable
from loom.shardmgr.tenancy import Tenant
from loom.wire.frames import FRAME_BYTES_MAX

CODEC_VERSION: Final = 1
# A message travels as the body of one RPC request/response inside one frame, so it can
# never usefully be larger than a frame.
MESSAGE_BYTES_MAX: Final = FRAME_BYTES_MAX
# Reasons quote at most this much of msgspec's error text: enough to debug, bounded.
_REASON_CHARS_MAX: Final = 200


class BadMessage(InvalidArgument):
    """Bytes that are not a valid `NodeMessage` (or a value too large to send)."""


class PeerMessage(msgspec.Struct, frozen=True, kw_only=True, tag="pm1"):
    """Replication between nodes: one Paxos message for one p-shard."""

    envelope: Envelope


class ClientCall(msgspec.Struct, frozen=True, kw_only=True, tag="cc1"):
    """A client's request to the replica of `shard` on the receiving node."""

    shard: ShardId
    request: ClientRequest
    auth: str = ""  # the caller's token (ADR 0008); "" when it has none
    # Where the call comes from, for the Akkio mapping's access counts (ADR 0013):
    # the client's region label ("" unknown) and the μshard (-1 unknown).
    region: str = ""
    ushard: int = -1


class ClientAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="ca1"):
    """The reply to one `ClientCall`; `reply.token` names the request."""

    reply: ClientReply


class MoverCall(msgspec.Struct, frozen=True, kw_only=True, tag="mv1"):
    """The shard manager's mover to the replica of `shard`: a move command or an export
    (docs/protocols/resharding.md)."""

    shard: ShardId
    request: MoverRequest


class MoverAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="mva1"):
    reply: MoverReply


class NodeReportMessage(msgspec.Struct, frozen=True, kw_only=True, tag="nr1"):
    """A node's heartbeat to the shard manager, with where to reach it and its labels."""

    report: NodeReport
    info: NodeInfo
    # The version of the routing table the node holds: the manager waits for it after
    # a change nodes must know before the caller goes on (a new token, a quota).
    routing_version: tuple[int, int] = (0, 0)
    # Client requests refused over a quota since the node started (for `loom status`).
    throttled: int = 0
    # Decayed accesses per μshard and client region (shardmgr/access.py, ADR 0013);
    # None: not in this heartbeat (they go out about once a second).
    access: tuple[UShardAccess, ...] | None = None


class ManagerEvent(msgspec.Struct, frozen=True, kw_only=True, tag="me1"):
    """Something a replica tells the shard manager (activated, stepped down, ...)."""

    shard: ShardId
    event: SmEvent


class PeerAddress(msgspec.Struct, frozen=True, array_like=True):
    node: NodeId
    host: str
    port: int


class AssignMessage(msgspec.Struct, frozen=True, kw_only=True, tag="as1"):
    """The shard manager's word to a member of `shard`, with where its peers listen."""

    shard: ShardId
    assignment: Assignment
    peers: tuple[PeerAddress, ...] = ()
    # The μshards the p-shard was created with ([first, end) ranges; None: all), kept by
    # a replica that has nothing yet (loom.kvstate.ownership).
    initial: tuple[tuple[int, int], ...] | None = None


class DropShard(msgspec.Struct, frozen=True, kw_only=True, tag="ds1"):
    """The shard manager tells a node to delete its replica of a dropped p-shard."""

    shard: ShardId


class CreateKeyspace(msgspec.Struct, frozen=True, kw_only=True, tag="ck1"):
    """Create a keyspace (idempotent: the same spec again answers the existing one).
    `tenant`: the owner an admin names; "" means the caller's own tenant."""

    spec: KeyspaceSpec
    tenant: str = ""
    auth: str = ""


class DropKeyspace(msgspec.Struct, frozen=True, kw_only=True, tag="dk1"):
    name: str
    auth: str = ""


class SetQuota(msgspec.Struct, frozen=True, kw_only=True, tag="qs1"):
    """Replace a keyspace's quota (every limit not given is unlimited); answers
    `KeyspaceReply`."""

    name: str
    quota: Quota
    auth: str = ""


class TransferPrimaryCall(msgspec.Struct, frozen=True, kw_only=True, tag="tp1"):
    """Hand the primary of p-shard `shard` to its acceptor `to` (graceful: `to` catches
    up first, the old primary releases its lease; answered once `to` has activated)."""

    shard: int
    to: str
    auth: str = ""


class PrimaryMoved(msgspec.Struct, frozen=True, kw_only=True, tag="pmv1"):
    shard: int
    primary: str
    epoch: int


class SetKeyspaceTier(msgspec.Struct, frozen=True, kw_only=True, tag="st1"):
    """Move keyspace `name` to the nodes of `tier` (answered at once with the keyspace;
    the manager replaces the members one at a time, resumable after a restart)."""

    name: str
    tier: str
    auth: str = ""


class ReshardKeyspace(msgspec.Struct, frozen=True, kw_only=True, tag="rs1"):
    """Grow a keyspace to `shards` p-shards by moving μshards (answered at once with the
    keyspace; the moves go on in the manager, visible in its mapping version)."""

    name: str
    shards: int
    auth: str = ""


class ReshardStatus(msgspec.Struct, frozen=True, kw_only=True, tag="rst1"):
    """How a keyspace's reshard goes (admin); answers `ReshardReport`."""

    name: str
    auth: str = ""


class ReshardReport(msgspec.Struct, frozen=True, kw_only=True, tag="rr1"):
    """`moves_left`: planned or under way; `retiring`: p-shards a shrink still retires;
    `pauses`: (μshard, ms) — each moved μshard's longest write pause in the current or
    last reshard (from its Freeze to its new mapping being usable), longest first."""

    name: str
    moves_left: int
    retiring: tuple[ShardId, ...]
    pauses: tuple[tuple[UShard, float], ...]


class KeyspaceReply(msgspec.Struct, frozen=True, kw_only=True, tag="kr1"):
    keyspace: Keyspace


class CreateTenant(msgspec.Struct, frozen=True, kw_only=True, tag="ct1"):
    """Create a tenant (admin; the same again is a no-op); answers `TenantsReply`."""

    tenant: Tenant
    auth: str = ""


class ListTenants(msgspec.Struct, frozen=True, kw_only=True, tag="lt1"):
    auth: str = ""


class TenantsReply(msgspec.Struct, frozen=True, kw_only=True, tag="tl1"):
    tenants: tuple[Tenant, ...]


class CreateToken(msgspec.Struct, frozen=True, kw_only=True, tag="tc1"):
    """Make a token for `tenant` (admin only); answers `TokenReply` with the secret,
    which nobody can see again."""

    tenant: str
    admin: bool = False
    auth: str = ""


class TokenReply(msgspec.Struct, frozen=True, kw_only=True, tag="tr1"):
    secret: str
    token_id: str
    tenant: str
    admin: bool


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    token_id: str
    tenant: str
    admin: bool


class ListTokens(msgspec.Struct, frozen=True, kw_only=True, tag="lk1"):
    auth: str = ""


class TokensReply(msgspec.Struct, frozen=True, kw_only=True, tag="tl2"):
    tokens: tuple[TokenInfo, ...]


class RevokeToken(msgspec.Struct, frozen=True, kw_only=True, tag="rk1"):
    """Delete a token (admin); nodes stop taking it with the next routing push."""

    token_id: str
    auth: str = ""


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="ok1"):
    """An operation without a result succeeded."""


class RoutingRequest(msgspec.Struct, frozen=True, kw_only=True, tag="rq1"):
    """Asks the shard manager, or any node (its last pushed copy), for the routing table."""

    auth: str = ""


class RoutingPush(msgspec.Struct, frozen=True, kw_only=True, tag="rp1"):
    """The shard manager's routing table, pushed to nodes so they can serve it to clients
    while the manager is down."""

    table: RoutingTable


FailureKind = Literal["invalid", "not_found", "unavailable", "permission"]


class Failure(msgspec.Struct, frozen=True, kw_only=True, tag="er1"):
    """A typed refusal of an operator or routing call (a client maps `kind` to its error)."""

    kind: FailureKind
    message: str
    retry_after_ms: int = 0


class StatusRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sq1"):
    """Asks the shard manager for the cluster's state (`loom status`)."""

    auth: str = ""


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    node: NodeId
    address: str
    alive: bool
    incarnation: int
    region: str = ""
    zone: str = ""
    pid: int = 0
    stored_bytes: int = 0
    # Client requests this node refused over a keyspace quota, per second, lately.
    throttled_per_s: float = 0.0
    tier: str = ""


class ShardStatus(msgspec.Struct, frozen=True, kw_only=True):
    shard: ShardId
    keyspace: str
    epoch: int
    primary: NodeId
    activated: bool
    acceptors: tuple[NodeId, ...]
    followers: tuple[NodeId, ...]
    # Per member: (applied seq, commit seq) from its last report; absent if none yet.
    progress: dict[str, tuple[int, int]]
    # Commands the primary applied per second, over the last reports.
    ops_per_s: float = 0.0
    # What the rebalancer balances by: its busiest replica's decayed ops/s (ADR 0014).
    load_per_s: float = 0.0


class StatusReply(msgspec.Struct, frozen=True, kw_only=True, tag="sr1"):
    nodes: tuple[NodeStatus, ...]
    shards: tuple[ShardStatus, ...]


NodeMessage = (
    PeerMessage
    | ClientCall
    | ClientAnswer
    | MoverCall
    | MoverAnswer
    | ReshardKeyspace
    | TransferPrimaryCall
    | PrimaryMoved
    | SetKeyspaceTier
    | ReshardStatus
    | ReshardReport
    | NodeReportMessage
    | ManagerEvent
    | AssignMessage
    | DropShard
    | CreateKeyspace
    | DropKeyspace
    | SetQuota
    | KeyspaceReply
    | CreateTenant
    | ListTenants
    | TenantsReply
    | CreateToken
    | TokenReply
    | ListTokens
    | TokensReply
    | RevokeToken
    | Done
    | RoutingRequest
    | RoutingPush
    | RoutingTable
    | Failure
    | StatusRequest
    | StatusReply
)

# The messages a client sends with its token in `auth`.
Authenticated = (
    ClientCall
    | CreateKeyspace
    | DropKeyspace
    | SetQuota
    | ReshardKeyspace
    | TransferPrimaryCall
    | SetKeyspaceTier
    | ReshardStatus
    | RoutingRequest
    | StatusRequest
    | CreateTenant
    | ListTenants
    | CreateToken
    | ListTokens
    | RevokeToken
)
AUTHENTICATED: Final = typing.get_args(Authenticated)

_ENCODER: Final = msgspec.msgpack.Encoder()
# Annotated: mypy cannot infer a union's Decoder type from the call.
_DECODER: Final[msgspec.msgpack.Decoder[NodeMessage]] = msgspec.msgpack.Decoder(NodeMessage)


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= _REASON_CHARS_MAX else text[:_REASON_CHARS_MAX] + "…"


def encode(message: NodeMessage, *, bytes_max: int = MESSAGE_BYTES_MAX) -> bytes:
    """The message as bytes. `BadMessage` if a value cannot be represented in MessagePack
    (an int outside 64 bits) or the result is over `bytes_max`: it could not be received."""
    try:
        data = _ENCODER.encode(message)
    except (msgspec.EncodeError, OverflowError) as error:
        raise BadMessage(f"cannot encode {type(message).__name__}: {_short(error)}") from None
    if len(data) > bytes_max:
        raise BadMessage(f"{type(message).__name__} of {len(data)} bytes is over {bytes_max}")
    return data


def decode(data: bytes, *, bytes_max: int = MESSAGE_BYTES_MAX) -> NodeMessage:
    """The message `data` holds. `BadMessage` if `data` is over `bytes_max` (checked before
    any decoding), malformed, truncated, has trailing bytes or does not match the schema."""
    if len(data) > bytes_max:
        raise BadMessage(f"message of {len(data)} bytes is over {bytes_max}")
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as error:  # ValidationError is a DecodeError
        raise BadMessage(f"bad message: {_short(error)}") from None
    except UnicodeDecodeError as error:
        # msgspec (0.22) raises this, not DecodeError, for a str that is not UTF-8.
        raise BadMessage(f"bad message: a string is not UTF-8 ({error.reason})") from None
