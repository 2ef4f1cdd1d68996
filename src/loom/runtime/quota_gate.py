"""The node's quota check on a client request, before it reaches the storage thread
(ADR 0008). Runs on the event loop: a dict lookup and a token bucket per request.

Rules of this module:
- the routing table says which keyspace owns a p-shard and what its quota is; this node
  enforces its share (`loom.shardmgr.quotas`), recomputed on every new table;
- a p-shard the table does not name (a table older than the keyspace) is admitted: the
  quota is advisory until the table arrives, and the request is still checked by the
  replica itself (NOT_PRIMARY, not hosted);
- over reads/s or writes/s → THROTTLED with the bucket's retry hint; a write that would
  grow a keyspace over its stored-bytes share → QUOTA_EXCEEDED. Deletes pass the bytes
  check; a transaction commit counts as one write that adds data.
"""

from __future__ import annotations

from collections.abc import Mapping

from loom.core.ids import NodeId, ShardId
from loom.host.admission import Admission, KeyspaceLimits
from loom.host.requests import ClientRequest, ErrorCode, ErrorReply, ReadRequest, WriteRequest
from loom.kvstate.commands import Delete, decode_command
from loom.shardmgr.quotas import node_shares
from loom.shardmgr.routing import RoutingTable


class QuotaGate:
    def __init__(self, node: NodeId) -> None:
        self.node = node
        self.admission = Admission()
        self.keyspace_of: dict[ShardId, str] = {}
        # Local p-shards of keyspaces with a bytes quota: only these are measured.
        self.measured_shards: frozenset[ShardId] = frozenset()
        self.throttled = 0  # requests refused, for status and tests
        self.refused_bytes = 0

    def on_routing(self, table: RoutingTable, now: float) -> None:
        """A newer routing table arrived: recompute this node's shares."""
        self.keyspace_of = {
            shard: keyspace.name for keyspace in table.keyspaces for shard in keyspace.shards()
        }
        shares = node_shares(table, self.node)
        limits = {
            name: KeyspaceLimits(
                reads_per_s=share.reads_per_s,
                writes_per_s=share.writes_per_s,
                bytes_max=share.bytes_max,
            )
            for name, share in shares.items()
        }
        self.admission.configure(limits, now)
        self.measured_shards = frozenset(
            shard
            for share in shares.values()
            if share.bytes_max is not None
            for shard in share.shards
        )

    def on_sizes(self, shard_bytes: Mapping[ShardId, int]) -> None:
        """What each local p-shard stores, summed per keyspace."""
        stored: dict[str, int] = {}
        for shard, size in shard_bytes.items():
            name = self.keyspace_of.get(shard)
            if name is not None:
                stored[name] = stored.get(name, 0) + size
        self.admission.set_stored_bytes(stored)

    def check(self, shard: ShardId, request: ClientRequest, now: float) -> ErrorReply | None:
        """None to admit `request`; else the refusal to send back."""
        keyspace = self.keyspace_of.get(shard)
        if keyspace is None or self.admission.limits(keyspace) is None:
            return None
        if isinstance(request, WriteRequest):
            adds_data = True
            if self.admission.is_over_bytes(keyspace):  # decode only when it matters
                adds_data = not _is_delete(request.command)
            refusal = self.admission.admit_write(keyspace, now, adds_data=adds_data)
        else:
            keys = 1 + len(request.also) if isinstance(request, ReadRequest) else 1
            refusal = self.admission.admit_read(keyspace, now, keys)
        if refusal is None:
            return None
        if refusal.retry_after_ms is None:
            self.refused_bytes += 1
            return ErrorReply(
                token=request.token, code=ErrorCode.QUOTA_EXCEEDED, message=refusal.message
            )
        self.throttled += 1
        return ErrorReply(
            token=request.token,
            code=ErrorCode.THROTTLED,
            message=refusal.message,
            retry_after_ms=refusal.retry_after_ms,
        )


def _is_delete(command: bytes) -> bool:
    try:
        return isinstance(decode_command(command), Delete)
    except ValueError:  # undecodable: the replica answers INVALID for it
        return False
