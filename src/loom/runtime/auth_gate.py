"""The node's token check on a client request (ADR 0008). Runs on the event loop
before the quota check; costs a dict lookup per request once a token was seen.

Rules of this module:
- auth is on when this node was started with it (`loom node --auth`) or the routing
  table says so. A node started with auth refuses every client request until a table
  with auth arrives, and ignores tables without auth: a node that has not heard from
  the manager yet must not be the open door;
- a request without a valid token, or for a keyspace of another tenant (unless the
  token is an admin's), is answered PERMISSION_DENIED;
- a p-shard the node's table does not name yet (a keyspace created a moment ago) is
  answered NOT_READY, retryable: the owner is unknown, so it is not served.
"""

from __future__ import annotations

import logging

from loom.core.ids import ShardId
from loom.host.requests import ClientRequest, ErrorCode, ErrorReply
from loom.shardmgr.routing import RoutingTable
from loom.shardmgr.tenancy import Verifier, may_reach

log = logging.getLogger("loom.node")
UNKNOWN_SHARD_RETRY_MS = 50


class AuthGate:
    def __init__(self, *, required: bool) -> None:
        self.required = required
        self.enabled = required
        self.ready = not required  # with `required`: once a table with auth arrived
        self.verifier = Verifier()
        self.owner_of: dict[ShardId, str] = {}
        self._grants: object = None
        self.denied = 0

    def accepts(self, table: RoutingTable) -> bool:
        """May this node install `table`? (Not a table without auth, if auth is required.)"""
        if self.required and not table.auth:
            log.error(
                "routing table %s says auth is off, but this node runs with --auth: ignored "
                "(start the shard manager with --auth)",
                table.version,
            )
            return False
        return True

    def on_routing(self, table: RoutingTable) -> None:
        self.enabled = self.required or table.auth
        self.ready = True
        self.owner_of = {s: k.tenant for k in table.keyspaces for s in k.shards()}
        if table.tokens != self._grants:  # new or revoked tokens: verify afresh
            self._grants = table.tokens
            self.verifier = Verifier(table.tokens)

    def may_read_routing(self, secret: str) -> bool:
        """Clients need a valid token for the routing table too, once auth is on."""
        if not self.enabled:
            return True
        return self.ready and self.verifier.grant(secret) is not None

    def check(self, shard: ShardId, request: ClientRequest, secret: str) -> ErrorReply | None:
        """None to go on with `request`; else the refusal to send back."""
        if not self.enabled:
            return None
        if not self.ready:
            return ErrorReply(
                token=request.token,
                code=ErrorCode.NOT_READY,
                message="this node has no routing table yet",
                retry_after_ms=UNKNOWN_SHARD_RETRY_MS,
            )
        grant = self.verifier.grant(secret)
        if grant is None:
            return self._denied(request, "a valid token is needed (kv.connect(..., token=...))")
        owner = self.owner_of.get(shard)
        if owner is None:
            return ErrorReply(
                token=request.token,
                code=ErrorCode.NOT_READY,
                message=f"p-shard {shard} is not in this node's routing table yet",
                retry_after_ms=UNKNOWN_SHARD_RETRY_MS,
            )
        if not may_reach(grant, owner):
            message = f"this keyspace does not belong to tenant {grant.tenant!r}"
            return self._denied(request, message)
        return None

    def _denied(self, request: ClientRequest, message: str) -> ErrorReply:
        self.denied += 1
        return ErrorReply(token=request.token, code=ErrorCode.PERMISSION_DENIED, message=message)
