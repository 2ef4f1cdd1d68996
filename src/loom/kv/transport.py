"""The request machinery under `Client`: connections, routing, retries and writes.

How a request travels: key → μshard (stable hash of the shard key) → p-shard (the
keyspace's mapping in the cached routing table) → node (the primary, or the nearest
live replica for relaxed reads). Whatever goes wrong on the way is retried inside the
request's deadline: `NOT_PRIMARY` hints are followed, a failed node or an unknown
shard refreshes the routing table, overload backs off (exponential, full jitter).

A write keeps its request id (client id + sequence) across every retry, so the
replicated dedupe table applies it once however many times it is sent (PITFALLS 5);
the client's floor (every sequence below it is finished) travels with each write so
the table can forget. A write whose outcome stays unknown at its deadline raises
`OutcomeUnknown` (never re-run blindly a write that is not idempotent).

Rules: every request, retries included, ends by the client's `timeout_s`, and one
attempt waits at most `ATTEMPT_TIMEOUT_S`; one connection per address, opened once
however many tasks ask and dropped when it fails; a closed client sends nothing. The
retry rules themselves are in retries.py; the operator calls are in admin.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

import msgspec

from loom.core.errors import (
    ConnectionFailed,
    InvalidArgument,
    LoomError,
    OutcomeUnknown,
    PermissionDenied,
    QuotaExceeded,
    Throttled,
    Unavailable,
)
from loom.core.ids import NodeId, RequestId, RequestSeq, ShardId, UShard, Version
from loom.host.requests import (
    ClientReply,
    ClientRequest,
    Durability,
    ErrorCode,
    ErrorReply,
    WriteReply,
    WriteRequest,
)
from loom.kv.options import QUORUM
from loom.kv.retries import Target, _Attempts, _backoff_delay, _raise_failure, _RequestIds, _result
from loom.kv.router import Address, Router
from loom.kvstate.commands import Applied, WriteCommand, encode_command
from loom.runtime.codec import (
    AUTHENTICATED,
    ClientAnswer,
    ClientCall,
    Failure,
    NodeMessage,
    RoutingRequest,
    decode,
    encode,
)
from loom.runtime.latency import LatencyMatrix, client_links
from loom.runtime.rpc import CallTimedOut, ConnectionLost, Overloaded, RpcClient, RpcLimits
from loom.runtime.tls import TlsConfig
from loom.shardmgr.routing import RoutingTable
from loom.shardmgr.tenancy import TOKEN_CHARS_MAX

DEFAULT_TIMEOUT_S = 10.0
# One attempt waits at most this long before the client looks elsewhere (a paused
# primary must not hold a request for the whole deadline).
ATTEMPT_TIMEOUT_S = 1.5
ROUTING_TIMEOUT_S = 2.0
_CLIENT_LIMITS = RpcLimits(io_timeout_s=2.0)


class Transport:
    """The base of every `Client`: its connections, routing table and request ids, and
    the retrying `request` and `write` that `Keyspace` and `Transaction` use."""

    def __init__(
        self,
        seeds: Sequence[Address],
        *,
        token: str | None = None,
        region: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: TlsConfig | None = None,
        latency: str | LatencyMatrix | None = None,
    ) -> None:
        if not math.isfinite(timeout_s) or not 0 < timeout_s <= 3600:
            raise InvalidArgument(f"timeout_s must be in (0, 3600], not {timeout_s!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise InvalidArgument("token must be a non-empty str (or None)")
        if token is not None and len(token) > TOKEN_CHARS_MAX:
            raise InvalidArgument(f"token of {len(token)} characters is over {TOKEN_CHARS_MAX}")
        # Sent with every request; checked by the nodes and the manager when the cluster
        # runs with auth (ADR 0008).
        self.token = token
        self.timeout_s = timeout_s
        self.tls = tls  # ADR 0015: TLS to every node and manager, verified by tls.ca
        # Requests a keyspace's quota throttled at least once (even if a retry then
        # succeeded), per keyspace: back-pressure for whoever drives this client.
        self.throttled_requests: collections.Counter[str] = collections.Counter()
        self.router = Router(seeds, self._fetch_routing, region=region)
        # Injected inter-region latency (ADR 0013): `latency=`, else $LOOM_LATENCY.
        self.links = client_links(latency, region)
        self.router.on_install = self.links.learn
        # The node that answered this client's last successful request.
        self.answered_by: NodeId | None = None
        self.ids = _RequestIds()
        self._tokens = itertools.count(1)
        self._connections: dict[Address, RpcClient] = {}
        self._connecting: dict[Address, asyncio.Task[RpcClient]] = {}
        # The highest version this client wrote per p-shard (READ_YOUR_WRITES).
        self._written: dict[ShardId, Version] = {}
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for task in self._connecting.values():
            task.cancel()
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.close()

    # ---------------------------------------------------------------- plumbing

    async def _fetch_routing(self, address: Address) -> RoutingTable:
        reply = await self._call(address, RoutingRequest(), timeout_s=ROUTING_TIMEOUT_S)
        if isinstance(reply, Failure):
            _raise_failure(reply)
        if not isinstance(reply, RoutingTable):
            raise Unavailable(f"{address} answered {type(reply).__name__} to a routing request")
        return reply

    async def _connection(self, address: Address) -> RpcClient:
        connection = self._connections.get(address)
        if connection is not None:
            return connection
        task = self._connecting.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                RpcClient.connect(
                    *address,
                    limits=_CLIENT_LIMITS,
                    tls=self.tls,
                    delay=self.links.delay_for(address),
                )
            )
            self._connecting[address] = task
        try:
            connection = await asyncio.shield(task)
        finally:
            if self._connecting.get(address) is task and task.done():
                del self._connecting[address]
        if self._closed:
            await connection.close()
            raise Unavailable("the client is closed")
        self._connections.setdefault(address, connection)
        return self._connections[address]

    async def _call(
        self, address: Address, message: NodeMessage, *, timeout_s: float
    ) -> NodeMessage:
        if self._closed:
            raise Unavailable("the client is closed")
        if self.token is not None and isinstance(message, AUTHENTICATED):
            message = msgspec.structs.replace(message, auth=self.token)
        connection = await self._connection(address)
        try:
            body = await connection.call(encode(message), timeout_s=timeout_s)
        except (ConnectionLost, ConnectionFailed):
            if self._connections.get(address) is connection:
                del self._connections[address]
            await connection.close()
            raise
        return decode(body)

    async def request(
        self,
        keyspace: str,
        ushard: UShard,
        build: Callable[[int], ClientRequest],
        *,
        target: Target,
        is_write: bool,
    ) -> ClientReply:
        """Sends a request to the p-shard owning `ushard` until it gets a definite answer
        or the deadline passes. `build(token)` makes the request for one attempt."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = _Attempts(target=target, is_write=is_write)
        for attempt in itertools.count():
            if attempt:
                delay = _backoff_delay(attempt, state.retry_after_ms)
                if state.throttled and loop.time() + delay >= deadline:
                    break  # the retry would not fit in the deadline: the caller hears it now
                await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
                state.retry_after_ms = 0
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            was_throttled = state.throttled
            reply = await self._attempt(keyspace, ushard, build, state, remaining)
            if state.throttled and not was_throttled:
                self.throttled_requests[keyspace] += 1
            if reply is not None:
                return reply
        message = f"gave up after {self.timeout_s:g} s: {state.problem}"
        if state.uncertain:
            raise OutcomeUnknown(message + "; the write may or may not have been applied")
        if state.throttled:
            # The caller (e.g. the functions platform's back-pressure) needs this one.
            raise Throttled(state.problem, retry_after_ms=max(1, state.retry_after_ms))
        raise (Throttled if state.overloaded else Unavailable)(message)

    async def _attempt(
        self,
        keyspace: str,
        ushard: UShard,
        build: Callable[[int], ClientRequest],
        state: _Attempts,
        remaining: float,
    ) -> ClientReply | None:
        """One try; the reply, or None after noting in `state` what to do next."""
        shard, node = await self._route(keyspace, ushard, state.target, state.hint)
        state.hint = None
        address = self.router.address(node) if node is not None else None
        if shard is None or address is None:
            state.problem = f"no route to μshard {ushard} of {keyspace!r}"
            await self._refresh_quietly()
            return None
        state.overloaded = state.throttled = False
        try:
            answer = await self._call(
                address,
                ClientCall(
                    shard=shard,
                    request=build(next(self._tokens)),
                    region=self.router.region or "",
                    ushard=ushard,
                ),
                timeout_s=min(remaining, ATTEMPT_TIMEOUT_S),
            )
        except Overloaded as error:
            state.problem, state.overloaded = str(error), True
            state.retry_after_ms = error.retry_after_ms or 0
            return None
        except (ConnectionLost, CallTimedOut) as error:
            state.uncertain |= state.is_write
            state.problem = f"node {node}: {error}"
            state.target = "primary"
            await self._refresh_quietly()
            return None
        if isinstance(answer, Failure):
            _raise_failure(answer)
        if not isinstance(answer, ClientAnswer):
            raise Unavailable(f"node {node} answered {type(answer).__name__}")
        if not isinstance(answer.reply, ErrorReply):
            self.answered_by = node
            return answer.reply
        await self._on_refusal(answer.reply, node, state)
        return None

    async def _on_refusal(self, reply: ErrorReply, node: NodeId | None, state: _Attempts) -> None:
        state.problem = f"node {node}: {reply.code.value} {reply.message}".rstrip()
        state.retry_after_ms = reply.retry_after_ms
        match reply.code:
            case ErrorCode.INVALID:
                raise InvalidArgument(reply.message or "invalid request")
            case ErrorCode.NOT_PRIMARY:
                state.hint = reply.primary_hint if reply.primary_hint != node else None
                if state.hint is None:
                    await self._refresh_quietly()
            case ErrorCode.TOO_STALE:
                state.target = "primary"
            case ErrorCode.TIMEOUT:
                state.uncertain |= state.is_write
            case ErrorCode.OVERLOADED:
                state.overloaded = True
            case ErrorCode.MOVED:
                # The μshard moved or is moving (docs/protocols/resharding.md): fetch the
                # routing table again; the retry goes where its mapping points.
                state.hint = None
                await self._refresh_quietly()
            case ErrorCode.THROTTLED:
                state.throttled = True
            case ErrorCode.PERMISSION_DENIED:
                raise PermissionDenied(reply.message or "the token does not reach this keyspace")
            case ErrorCode.QUOTA_EXCEEDED:
                raise QuotaExceeded(reply.message or "over the keyspace's stored-bytes quota")
            case ErrorCode.NOT_READY | ErrorCode.NOT_APPLIED:
                pass

    async def _route(
        self, keyspace: str, ushard: UShard, target: Target, hint: NodeId | None
    ) -> tuple[ShardId | None, NodeId | None]:
        if not self.router.has_keyspace(keyspace):
            await self.router.refresh(force=True)
        info = self.router.keyspace(keyspace)  # NotFound if it does not exist
        if not 0 <= ushard < info.spec.ushards:
            raise InvalidArgument(f"μshard {ushard} out of range for {keyspace!r}")
        shard = info.shard_of(ushard)
        if hint is not None:
            return shard, hint
        node = self.router.primary(shard) if target == "primary" else self.router.nearest(shard)
        return shard, node

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(LoomError):
            await self.router.refresh()

    async def _backoff(self, attempt: int, deadline: float, retry_after_ms: int) -> None:
        delay = _backoff_delay(attempt, retry_after_ms)
        remaining = deadline - asyncio.get_running_loop().time()
        await asyncio.sleep(max(0.0, min(delay, remaining)))

    # ---------------------------------------------------------------- writes

    async def write(
        self,
        keyspace: str,
        ushard: UShard,
        make: Callable[[RequestId, RequestSeq], WriteCommand],
        durability: Durability = QUORUM,
    ) -> Applied:
        request = self.ids.open()
        try:
            command = encode_command(make(request, self.ids.floor()))
            reply = await self.request(
                keyspace,
                ushard,
                lambda token: WriteRequest(token=token, command=command, durability=durability),
                target="primary",
                is_write=True,
            )
        finally:
            self.ids.finish(request)
        if not isinstance(reply, WriteReply):
            raise Unavailable(f"a write was answered with {type(reply).__name__}")
        applied = _result(reply.result)
        self._note_written(keyspace, ushard, applied.version)
        return applied

    def _note_written(self, keyspace: str, ushard: UShard, version: Version) -> None:
        shard = self.router.keyspace(keyspace).shard_of(ushard)
        current = self._written.get(shard)
        # A replica serves READ_YOUR_WRITES from applied seq ≥ min_version.seq: keep the
        # highest seq. Not the highest version: μshards of one p-shard can be in
        # different generations after moves (docs/protocols/resharding.md).
        if current is None or version.seq > current.seq:
            self._written[shard] = version

    def written(self, keyspace: str, ushard: UShard) -> Version | None:
        return self._written.get(self.router.keyspace(keyspace).shard_of(ushard))
