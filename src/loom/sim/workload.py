"""Simulated clients: what the client library does (routing, retries with the same
request id, timeouts) and the record of every operation for the checkers.

Each client runs one operation at a time; many clients give concurrency. Keys are
few so operations collide. Values written are unique in a run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from loom.core.hashing import ushard_of
from loom.core.ids import (
    ClientId,
    Generation,
    NodeId,
    RequestId,
    RequestSeq,
    ShardId,
    UShard,
    Version,
)
from loom.host.requests import (
    ClientReply,
    Consistency,
    Durability,
    ErrorCode,
    ErrorReply,
    ReadReply,
    ReadRequest,
    WriteReply,
    WriteRequest,
)
from loom.kvstate.commands import (
    Applied,
    Command,
    Delete,
    Increment,
    Put,
    Rejected,
    encode_command,
)
from loom.sim.history import ANY, Operation, _Any
from loom.sim.transactions import (
    ATTEMPTS_MAX as TXN_ATTEMPTS_MAX,
)
from loom.sim.transactions import (
    Transaction,
    audit_problem,
    commit_request,
    plan_transaction,
)

USHARDS = 64
ATTEMPT_TIMEOUT_MS = 400.0
OP_DEADLINE_MS = 3000.0
RETRY_DELAY_MS = 15.0
# Some clients learn of a new primary at once (a routing push), others keep a stale
# cache until a request fails: both must be safe.
ROUTING_PUSH_PROBABILITY = 0.3
REGISTER_KEYS = tuple(b"k%d" % i for i in range(6))
COUNTER_KEYS = tuple(b"c%d" % i for i in range(2))


def shard_of(ushard: UShard, shards: int) -> ShardId:
    return ShardId(ushard % shards)


@dataclass(slots=True, kw_only=True)
class ReadObservation:
    """A relaxed read as the bounded-staleness and read-your-writes checkers need it."""

    client: str
    key: bytes
    consistency: Consistency
    invoked_ms: float
    bound_ms: float | None
    record_version: Version | None
    # The serving replica's applied seq: a tombstone may be collected, so an absent
    # record proves freshness only through it (within the μshard's generation).
    applied_seq: int
    own_write_version: Version | None
    generation: Generation = Generation(0)


@dataclass(slots=True, kw_only=True)
class WriteAck:
    """An acknowledged QUORUM write: from `completed_ms` on it must never be lost."""

    key: bytes
    version: Version
    completed_ms: float
    shard: ShardId
    command: bytes
    ushard: UShard = UShard(0)


@dataclass(slots=True)
class Recorder:
    ops: list[Operation] = field(default_factory=list)
    reads: list[ReadObservation] = field(default_factory=list)
    acks: list[WriteAck] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    next_op_id: int = 0
    next_value: int = 0
    transactions: int = 0
    transactions_committed: int = 0

    def operations(self) -> int:
        return len(self.ops) + len(self.reads) + self.transactions

    def fresh_value(self, client: str) -> bytes:
        self.next_value += 1
        return f"{client}:{self.next_value}".encode()


@dataclass(slots=True, kw_only=True)
class Attempt:
    """One request of the current operation, with what the checkers must remember."""

    kind: str  # read | write | delete | increment | relaxed
    key: bytes
    shard: ShardId
    ushard: UShard
    request: WriteRequest | ReadRequest
    invoked_ms: float
    deadline_ms: float
    value: bytes | None = None
    expect: bytes | _Any | None = ANY
    delta: int = 0
    target: NodeId | None = None
    # Transactions read every key from one replica.
    fixed_target: NodeId | None = None
    sent_ms: float = 0.0
    token: int = 0


class Routing:
    """What a client knows of the cluster: shards' members and believed primaries, and
    the μshard → p-shard mapping as last fetched (stale after a move until a refresh)."""

    def __init__(
        self,
        lookup: Callable[[ShardId], tuple[NodeId | None, tuple[NodeId, ...]]],
        mapping: Callable[[UShard], ShardId],
    ):
        self.lookup = lookup
        self.mapping = mapping
        self.primary: dict[ShardId, NodeId] = {}
        self.shards: dict[UShard, ShardId] = {}

    def refresh(self) -> None:
        """A routing-table push reached this client: forget every cached primary."""
        self.primary.clear()
        self.shards.clear()

    def shard_of(self, ushard: UShard) -> ShardId:
        if ushard not in self.shards:
            self.shards[ushard] = self.mapping(ushard)
        return self.shards[ushard]

    def forget_mapping(self, ushard: UShard) -> None:
        """MOVED: the cached mapping is stale for this μshard."""
        self.shards.pop(ushard, None)

    def primary_of(self, shard: ShardId) -> NodeId | None:
        if shard not in self.primary:
            primary, _members = self.lookup(shard)
            if primary is not None:
                self.primary[shard] = primary
        return self.primary.get(shard)

    def members(self, shard: ShardId) -> tuple[NodeId, ...]:
        return self.lookup(shard)[1]

    def forget(self, shard: ShardId, hint: NodeId | None) -> None:
        if hint is not None:
            self.primary[shard] = hint
        else:
            self.primary.pop(shard, None)


class SimClient:
    def __init__(
        self,
        *,
        name: str,
        rng: random.Random,
        shards: int,
        recorder: Recorder,
        routing: Routing,
        fast_ack: bool,
        skip_absent_bug: bool = False,
    ) -> None:
        self.name = name
        self.client_id = ClientId(name)
        self.rng = rng
        self.shards = shards
        self.rec = recorder
        self.routing = routing
        self.fast_ack = fast_ack
        self.request_seq = 0
        self.token = 0
        self.current: Attempt | None = None
        self.txn: Transaction | None = None
        self.skip_absent_bug = skip_absent_bug
        # Per key: the version and value of this client's last acknowledged write.
        self.own_writes: dict[bytes, Version] = {}
        # READ_YOUR_WRITES: the highest version this client wrote, per p-shard (versions
        # of different p-shards do not compare).
        self.min_version: dict[ShardId, Version] = {}
        # Versions are per p-shard, so the value a version names is known per key.
        self.known_values: dict[tuple[bytes, Version], bytes | None] = {}

    # -- choosing work

    def next_request_id(self) -> RequestId:
        self.request_seq += 1
        return RequestId(self.client_id, RequestSeq(self.request_seq))

    def start_op(self, now: float) -> Attempt:
        if self.rng.random() < ROUTING_PUSH_PROBABILITY:
            self.routing.refresh()
        roll = self.rng.random()
        if roll < 0.12:
            return self._increment(now)
        if roll < 0.24:
            return self._start_txn(now, attempts=1)
        key = self.rng.choice(REGISTER_KEYS)
        if roll < 0.45:
            return self._write(key, now)
        if roll < 0.52:
            return self._delete(key, now)
        if roll < 0.80:
            return self._read(key, Consistency.STRONG, now)
        consistency = self.rng.choice(
            [Consistency.BOUNDED, Consistency.READ_YOUR_WRITES, Consistency.EVENTUAL]
        )
        return self._read(key, consistency, now)

    def _ushard(self, key: bytes) -> UShard:
        return ushard_of(key, USHARDS)

    def _attempt(
        self,
        kind: str,
        key: bytes,
        request: WriteRequest | ReadRequest,
        now: float,
        *,
        shard_key: bytes | None = None,
        **extra: object,
    ) -> Attempt:
        ushard = self._ushard(shard_key if shard_key is not None else key)
        attempt = Attempt(
            kind=kind,
            key=key,
            shard=self.routing.shard_of(ushard),
            ushard=ushard,
            request=request,
            invoked_ms=now,
            deadline_ms=now + OP_DEADLINE_MS,
            **extra,  # type: ignore[arg-type]
        )
        self.current = attempt
        return attempt

    def _floor(self) -> RequestSeq:
        return RequestSeq(self.request_seq)

    def _write(self, key: bytes, now: float) -> Attempt:
        """A put, unconditional or with one condition the model can check: `if_absent`
        (expects absent), `if_version` or `if_value` (expect the value this client last
        wrote there; values are unique, so a version names exactly one value)."""
        value = self.rec.fresh_value(self.name)
        put = Put(
            request=self.next_request_id(),
            ushard=self._ushard(key),
            key=key,
            value=value,
            client_floor=self._floor(),
        )
        expect: bytes | _Any | None = ANY
        own = self.own_writes.get(key)
        own_value = self.known_values.get((key, own)) if own is not None else None
        roll = self.rng.random()
        if roll < 0.15:
            put, expect = msgspec.structs.replace(put, if_absent=True), None
        elif roll < 0.25 and own is not None and own_value is not None:
            put, expect = msgspec.structs.replace(put, if_version=own), own_value
        elif roll < 0.35 and own_value is not None:
            put, expect = msgspec.structs.replace(put, if_value=own_value), own_value
        durability = Durability.QUORUM
        if expect is ANY and self.fast_ack and self.rng.random() < 0.1:
            durability = Durability.FAST_ACK
        return self._attempt(
            "write", key, self._write_request(put, durability), now, value=value, expect=expect
        )

    def _delete(self, key: bytes, now: float) -> Attempt:
        command = Delete(
            request=self.next_request_id(),
            ushard=self._ushard(key),
            key=key,
            client_floor=self._floor(),
        )
        expect: bytes | _Any | None = ANY
        own = self.own_writes.get(key)
        own_value = self.known_values.get((key, own)) if own is not None else None
        if own is not None and own_value is not None and self.rng.random() < 0.3:
            command, expect = msgspec.structs.replace(command, if_version=own), own_value
        return self._attempt(
            "delete",
            key,
            self._write_request(command, Durability.QUORUM),
            now,
            value=None,
            expect=expect,
        )

    def _increment(self, now: float) -> Attempt:
        key = self.rng.choice(COUNTER_KEYS)
        delta = self.rng.randint(1, 3)
        command = Increment(
            request=self.next_request_id(),
            ushard=self._ushard(key),
            key=key,
            delta=delta,
            client_floor=self._floor(),
        )
        return self._attempt(
            "increment", key, self._write_request(command, Durability.QUORUM), now, delta=delta
        )

    def _read(self, key: bytes, consistency: Consistency, now: float) -> Attempt:
        bound = (
            self.rng.choice([50.0, 200.0, 1000.0]) if consistency is Consistency.BOUNDED else None
        )
        request = ReadRequest(
            token=0,
            ushard=self._ushard(key),
            key=key,
            consistency=consistency,
            bound_ms=bound,
            min_version=(
                self.min_version.get(self.routing.shard_of(self._ushard(key)))
                if consistency is Consistency.READ_YOUR_WRITES
                else None
            ),
        )
        kind = "read" if consistency is Consistency.STRONG else "relaxed"
        return self._attempt(kind, key, request, now)

    def _write_request(self, command: Command, durability: Durability) -> WriteRequest:
        return WriteRequest(token=0, command=encode_command(command), durability=durability)

    # -- sending and replies

    def target_for(self, attempt: Attempt) -> NodeId | None:
        if attempt.fixed_target is not None:
            return attempt.fixed_target
        request = attempt.request
        if isinstance(request, ReadRequest) and request.consistency is not Consistency.STRONG:
            members = self.routing.members(attempt.shard)
            return self.rng.choice(members) if members else None
        return self.routing.primary_of(attempt.shard)

    def stamp(self, attempt: Attempt, now: float) -> WriteRequest | ReadRequest:
        self.token += 1
        attempt.token = self.token
        attempt.sent_ms = now
        request = attempt.request
        if isinstance(request, WriteRequest):
            return WriteRequest(
                token=self.token, command=request.command, durability=request.durability
            )
        return ReadRequest(
            token=self.token,
            ushard=request.ushard,
            key=request.key,
            consistency=request.consistency,
            bound_ms=request.bound_ms,
            min_version=request.min_version,
        )

    def on_reply(self, reply: ClientReply, now: float) -> str:
        """Returns "done", "retry" or "ignore" (a stale reply)."""
        attempt = self.current
        if attempt is None or reply.token != attempt.token:
            return "ignore"
        if attempt.kind.startswith("txn"):
            return self._on_txn_reply(attempt, reply, now)
        match reply:
            case ErrorReply():
                return self._on_error(attempt, reply)
            case WriteReply():
                self._on_write_reply(attempt, reply, now)
            case ReadReply():
                self._on_read_reply(attempt, reply, now)
        self.current = None
        return "done"

    # -- transactions (see loom.sim.transactions)

    def _start_txn(self, now: float, *, attempts: int) -> Attempt:
        txn = plan_transaction(self.rng)
        shard = self.routing.shard_of(ushard_of(txn.shard_key, USHARDS))
        members = self.routing.members(shard)
        if txn.consistency is Consistency.STRONG or not members:
            txn.consistency = Consistency.STRONG
            txn.target = self.routing.primary_of(shard)
        else:
            txn.target = self.rng.choice(members)
        txn.attempts = attempts
        self.txn = txn
        if attempts == 1:
            self.rec.transactions += 1
        return self._txn_read(txn, now)

    def _txn_read(self, txn: Transaction, now: float) -> Attempt:
        key = txn.next_key()
        assert key is not None
        attempt = self._attempt(
            "txn_read", key, txn.read_request(key), now, shard_key=txn.shard_key
        )
        attempt.fixed_target = txn.target
        return attempt

    def _restart_txn(self, now: float) -> str:
        txn = self.txn
        self.current = None
        self.txn = None
        if txn is None or txn.attempts >= TXN_ATTEMPTS_MAX:
            return "done"
        self._start_txn(now, attempts=txn.attempts + 1)
        return "continue" if self.current is not None else "done"

    def _on_txn_reply(self, attempt: Attempt, reply: ClientReply, now: float) -> str:
        txn = self.txn
        assert txn is not None
        if isinstance(reply, ErrorReply):
            if reply.code is ErrorCode.INVALID:
                self.rec.violations.append(f"{self.name}: transaction refused: {reply.message}")
                self.current, self.txn = None, None
                return "done"
            if attempt.kind == "txn_read" and reply.code is not ErrorCode.OVERLOADED:
                if reply.code is ErrorCode.MOVED:
                    self.routing.forget_mapping(attempt.ushard)
                return self._restart_txn(now)  # that replica cannot serve: start over
            return self._on_error(attempt, reply)
        if isinstance(reply, ReadReply):
            if not txn.on_read(attempt.key, reply):
                return self._restart_txn(now)
            if txn.next_key() is not None:
                self._txn_read(txn, now)
                return "continue"
            return self._finish_reads(txn, now)
        assert isinstance(reply, WriteReply)
        if isinstance(reply.result, Applied):
            self.rec.transactions_committed += 1
            self.current, self.txn = None, None
            return "done"
        if reply.result.reason == "invalid":
            self.rec.violations.append(f"{self.name}: commit refused: {reply.result.message}")
        return self._restart_txn(now)

    def _finish_reads(self, txn: Transaction, now: float) -> str:
        problem = audit_problem(txn)
        if problem is not None:
            self.rec.violations.append(problem)
        request = commit_request(
            txn, self.next_request_id(), self.rng, skip_absent_bug=self.skip_absent_bug
        )
        if request is None:
            self.current, self.txn = None, None
            return "done"
        txn.committing = True
        self._attempt("txn_commit", txn.keys[0], request, now, shard_key=txn.shard_key)
        return "continue"

    def _on_error(self, attempt: Attempt, reply: ErrorReply) -> str:
        if reply.code is ErrorCode.MOVED:
            # The μshard moved (or is moving): fetch the mapping again and retry there,
            # under the same request id (the dedupe table moved with the μshard).
            self.routing.forget_mapping(attempt.ushard)
            attempt.shard = self.routing.shard_of(attempt.ushard)
            return "retry"
        if reply.code in (ErrorCode.NOT_PRIMARY, ErrorCode.NOT_READY):
            self.routing.forget(
                attempt.shard, reply.primary_hint if reply.primary_hint != attempt.target else None
            )
        if reply.code is ErrorCode.INVALID:
            self.rec.violations.append(f"{self.name}: request refused as invalid: {reply.message}")
            self.current = None
            return "done"
        return "retry"

    def _on_write_reply(self, attempt: Attempt, reply: WriteReply, now: float) -> None:
        result = reply.result
        fast = reply.fast_ack_ballot is not None
        if isinstance(result, Applied):
            outcome = "unknown" if fast else "ok"
            if not fast:
                self._remember_write(attempt, result.version, now)
            output: bytes | int | None = result.counter
        else:
            assert isinstance(result, Rejected)
            if result.reason != "condition":
                self.rec.violations.append(f"{self.name}: write rejected: {result.message}")
                return
            outcome, output = "failed", None
        self._record(attempt, outcome, None if outcome == "unknown" else now, output=output)

    def _remember_write(self, attempt: Attempt, version: Version, now: float) -> None:
        request = attempt.request
        assert isinstance(request, WriteRequest)
        self.rec.acks.append(
            WriteAck(
                key=attempt.key,
                version=version,
                completed_ms=now,
                shard=attempt.shard,
                command=request.command,
                ushard=attempt.ushard,
            )
        )
        if attempt.kind in ("write", "delete"):
            self.own_writes[attempt.key] = version
            self.known_values[(attempt.key, version)] = attempt.value
        # A replica serves READ_YOUR_WRITES once its applied seq reaches min_version.seq:
        # keep the highest seq. Not the highest version: generations differ between the
        # μshards of one p-shard, so a version of a moved μshard would hide later seqs.
        known = self.min_version.get(attempt.shard)
        if known is None or version.seq > known.seq:
            self.min_version[attempt.shard] = version

    def _on_read_reply(self, attempt: Attempt, reply: ReadReply, now: float) -> None:
        request = attempt.request
        assert isinstance(request, ReadRequest)
        value = reply.item.value if reply.item is not None else None
        if reply.item is not None:
            self.known_values[(attempt.key, reply.item.version)] = value
        if attempt.kind == "read":
            self._record(attempt, "ok", now, output=value)
            return
        self.rec.reads.append(
            ReadObservation(
                client=self.name,
                key=attempt.key,
                consistency=request.consistency,
                invoked_ms=attempt.invoked_ms,
                bound_ms=request.bound_ms,
                record_version=reply.record_version,
                applied_seq=reply.applied_seq,
                own_write_version=self.own_writes.get(attempt.key),
                generation=reply.generation,
            )
        )

    def give_up(self) -> None:
        """The deadline passed without an answer: a write's effect is unknown."""
        attempt = self.current
        self.current = None
        self.txn = None
        if attempt is None or attempt.kind in ("read", "relaxed", "txn_read", "txn_commit"):
            return
        self._record(attempt, "unknown", None)

    def _record(
        self,
        attempt: Attempt,
        outcome: str,
        completed: float | None,
        *,
        output: bytes | int | None = None,
    ) -> None:
        kind = {"write": "write", "delete": "delete", "increment": "increment", "read": "read"}[
            attempt.kind
        ]
        self.rec.next_op_id += 1
        self.rec.ops.append(
            Operation(
                op_id=self.rec.next_op_id,
                client=self.name,
                key=attempt.key,
                kind=kind,  # type: ignore[arg-type]
                invoked_ms=attempt.invoked_ms,
                completed_ms=completed,
                outcome=outcome,  # type: ignore[arg-type]
                value=attempt.value,
                expect=attempt.expect,
                delta=attempt.delta,
                output=output,
            )
        )
