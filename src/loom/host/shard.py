"""One replica of one p-shard on a node: replica core + kv state machine + storage.

Per call (`submit`, `on_message`, `tick`), the host queues work; `flush` proposes the
queued writes as one entry (group commit), executes every Ready against the store
with unsynced writes, and returns what must be sent. The driver then makes the store
durable (`sync`) and only afterwards sends messages and replies (PITFALLS 4).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import msgspec

from loom.core.ids import (
    Ballot,
    Epoch,
    Generation,
    Incarnation,
    NodeId,
    RequestId,
    Seq,
    ShardId,
    UShard,
    Version,
)
from loom.core.limits import Limits
from loom.core.time import Instant, WallMs
from loom.host import layout
from loom.host.requests import (
    ClientReply,
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
    MoverReply,
    ReadLike,
    ReadReply,
    ReadRequest,
    ScanReply,
    ScanRequest,
    WriteReply,
    WriteRequest,
)
from loom.host.snapshots import SnapshotTransfers
from loom.kvstate import ownership
from loom.kvstate.apply import EntryContext, apply_entry
from loom.kvstate.commands import (
    Abort,
    Applied,
    Command,
    Delete,
    Freeze,
    Gc,
    Increment,
    MoveCommand,
    Own,
    Put,
    Rejected,
    Result,
    TxnCommit,
    WriteCommand,
    decode_command,
    encode_command,
)
from loom.kvstate.keys import is_valid_ushard
from loom.kvstate.reads import read_item_and_version, scan_ushard
from loom.paxos.messages import Config, Entry, Envelope, SnapshotAck, SnapshotChunk
from loom.paxos.params import ReplicaParams
from loom.paxos.ready import Ready, RefusalReason, Refused, Sequenced, ServeNow, SmEvent
from loom.paxos.replica import Assignment, Replica
from loom.storage.api import KVStore, WriteBatch
from loom.storage.prefixed import PrefixedStore

GENERATION_ZERO = Generation(0)
# A keyspace has at most this many μshards (shardmgr.routing.USHARDS_MAX).
HOLDING_USHARDS_MAX = 65_536
Origin = Hashable  # where a reply goes (a client connection); opaque to the host

_REFUSAL_CODES = {
    RefusalReason.NOT_PRIMARY: ErrorCode.NOT_PRIMARY,
    RefusalReason.NOT_READY: ErrorCode.NOT_READY,
    RefusalReason.OVERLOADED: ErrorCode.OVERLOADED,
    RefusalReason.TOO_STALE: ErrorCode.TOO_STALE,
    RefusalReason.TIMEOUT: ErrorCode.TIMEOUT,
}


def shard_prefix(shard: ShardId) -> bytes:
    return b"s" + shard.to_bytes(8, "big")


@dataclass(slots=True)
class HostOutput:
    messages: list[Envelope] = field(default_factory=list)
    replies: list[tuple[Origin, ClientReply]] = field(default_factory=list)
    sm_events: list[SmEvent] = field(default_factory=list)
    # For observers (the simulator's checkers): entries applied by this flush, and the
    # ballot of every lease read it served.
    applied: list[Entry] = field(default_factory=list)
    applied_results: list[list[Result]] = field(default_factory=list)
    lease_reads: list[tuple[Ballot, Config]] = field(default_factory=list)
    # Answers to the shard manager's mover (moves of μshards, docs/protocols/resharding.md).
    mover_replies: list[tuple[Origin, MoverReply]] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Queued:
    origin: Origin
    token: int
    command: bytes
    durability: Durability
    # The μshard's generation when submitted (it is owned then, so it cannot change
    # before this command applies): a FAST_ACK reply's version carries it.
    generation: Generation = GENERATION_ZERO
    from_mover: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class _Awaiting:
    origin: Origin
    token: int
    command: bytes
    index: int
    durability: Durability
    from_mover: bool = False


class ShardHost:
    def __init__(
        self,
        *,
        shard: ShardId,
        node: NodeId,
        incarnation: Incarnation,
        store: KVStore,
        params: ReplicaParams,
        now: Instant,
        generation: Generation = GENERATION_ZERO,
        initial: frozenset[UShard] | None = None,
    ) -> None:
        self.shard = shard
        self.node = node
        self.p = params
        self.generation = generation
        self.store = store
        self.view = PrefixedStore(store, shard_prefix(shard))
        # The μshards this p-shard was created with (None: all), the same on every
        # replica; μshards moved in or out since are in the replicated state.
        self.initial = initial if initial is not None else layout.load_initial(self.view)
        # μshards whose Freeze this primary has queued, under its ballot: writes
        # submitted after it are answered MOVED at once instead of being sequenced
        # after the Freeze (a FAST_ACK reply must never name a write apply refuses).
        self.fencing: dict[UShard, Ballot] = {}
        self.state = PrefixedStore(store, shard_prefix(shard) + layout.STATE)
        durable = layout.load(self.view)
        self.is_member = not durable.is_empty() or params.has_bug("amnesia")
        self.replica = Replica(
            shard=shard,
            node=node,
            incarnation=incarnation,
            durable=durable,
            now=now,
            params=params,
        )
        self.applied_epoch = Epoch(0)
        self.applied_seq = durable.applied_seq
        self.queue: list[_Queued] = []
        self.awaiting: dict[Seq, list[_Awaiting]] = {}
        self.reads: dict[int, tuple[Origin, ReadLike]] = {}
        self.snapshots = SnapshotTransfers(node=node, shard=shard)
        self.out = HostOutput()
        self.renamed_requests = 0
        self.applied_commands = 0
        self.reads_served = 0  # reads and scans answered (for the load figure)
        self.next_gc_at = Instant(now + params.gc_interval_ms)

    # ------------------------------------------------------------------ inputs

    def assign(
        self,
        assignment: Assignment,
        now: Instant,
        initial: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        """`initial`: the μshards the p-shard was created with (from the manager), kept
        by a replica that has nothing yet, before it applies anything."""
        named = assignment.incarnation_of(self.node)
        if (
            named is not None
            and named != self.replica.incarnation
            and not self.p.has_bug("amnesia")
        ):
            return  # for an earlier incarnation of this node (a wiped disk): not us
        if initial is not None and not self.is_member and self.initial is None:
            # Written before any entry applies, in store order: durable with them.
            self.initial = frozenset(UShard(u) for first, end in initial for u in range(first, end))
            batch = WriteBatch()
            layout.put_initial(batch, initial)
            self._write(batch)
        self.is_member = True
        self.replica.assign(assignment, now)

    def on_message(self, env: Envelope, now: Instant) -> None:
        if not self.is_member:
            # A replica with nothing on disk is nobody until the manager names this
            # incarnation: a wiped node must not answer as the member it was (PITFALLS 19).
            return
        msg = env.message
        if isinstance(msg, SnapshotChunk | SnapshotAck):
            self.snapshots.on_message(env, self, now)
            return
        self.replica.step(env, now)

    def tick(self, now: Instant) -> None:
        self.replica.tick(now)
        self.snapshots.tick(self, now)

    def submit(
        self,
        origin: Origin,
        request: WriteRequest
        | ReadRequest
        | ScanRequest
        | MoveRequest
        | ExportRequest
        | HoldingRequest,
        now: Instant,
        wall_ms: WallMs,
    ) -> None:
        match request:
            case WriteRequest():
                self._submit_write(origin, request)
            case MoveRequest():
                self._submit_move(origin, request)
            case ExportRequest():
                self._export(origin, request)
            case HoldingRequest():
                self._holding(origin, request)
            case _:
                self._submit_read(origin, request, now, wall_ms)

    def _submit_write(self, origin: Origin, request: WriteRequest) -> None:
        try:
            command = decode_command(request.command)
        except msgspec.DecodeError:
            self._error(origin, request.token, ErrorCode.INVALID, "undecodable command")
            return
        problem = _write_problem(command, request.durability)
        if problem is not None:
            self._error(origin, request.token, ErrorCode.INVALID, problem)
            return
        assert isinstance(command, Put | Delete | Increment | TxnCommit)
        if len(self.queue) >= self.p.limits.pending_proposals_max:
            self._error(
                origin, request.token, ErrorCode.OVERLOADED, "write queue full", retry_after_ms=20
            )
            return
        if not self._serves(command.ushard) or self._is_fenced(command.ushard):
            self._moved(origin, request.token, command.ushard)
            return
        data = request.command
        if self.p.has_bug("no-dedupe"):
            data = self._rename_request(command)
        self.queue.append(
            _Queued(
                origin=origin,
                token=request.token,
                command=data,
                durability=request.durability,
                generation=ownership.generation(self.state, command.ushard, self.generation),
            )
        )

    # ------------------------------------------------------------------ moves

    def _serves(self, ushard: UShard) -> bool:
        """Whether this replica's applied state owns the μshard (DESIGN §6)."""
        return ownership.is_owned(self.state, ushard, self.initial)

    def _is_fenced(self, ushard: UShard) -> bool:
        fenced_by = self.fencing.get(ushard)
        lead = self.replica.lead
        return fenced_by is not None and lead is not None and lead.ballot == fenced_by

    def _moved(self, origin: Origin, token: int, ushard: UShard) -> None:
        message = f"μshard {ushard} is not served by p-shard {self.shard}"
        self._error(origin, token, ErrorCode.MOVED, message, retry_after_ms=10)

    def _submit_move(self, origin: Origin, request: MoveRequest) -> None:
        """A mover's command, proposed in log order with the writes around it."""
        try:
            command = decode_command(request.command)
        except msgspec.DecodeError:
            command = None
        if not isinstance(command, MoveCommand) or not is_valid_ushard(command.ushard):
            self._mover_error(origin, request.token, ErrorCode.INVALID, "not a move command")
            return
        if len(self.queue) >= self.p.limits.pending_proposals_max:
            self._mover_error(origin, request.token, ErrorCode.OVERLOADED, "write queue full")
            return
        lead = self.replica.lead
        if isinstance(command, Freeze) and lead is not None:
            self.fencing[command.ushard] = lead.ballot
        elif isinstance(command, Abort | Own):
            # An Own here means the μshard comes (back) to this p-shard, maybe under
            # the ballot that froze it when it left: the old fence must not outlive
            # it. Writes still answer MOVED until the Own is applied (`_serves`).
            self.fencing.pop(command.ushard, None)
        self.queue.append(
            _Queued(
                origin=origin,
                token=request.token,
                command=request.command,
                durability=Durability.QUORUM,
                from_mover=True,
            )
        )

    def _export(self, origin: Origin, request: ExportRequest) -> None:
        """A chunk of a frozen μshard. Any replica that applied the Freeze has the same
        bytes (a frozen μshard never changes), so no lease or quorum round is needed."""
        if not is_valid_ushard(request.ushard) or not request.limit > 0:
            self._mover_error(origin, request.token, ErrorCode.INVALID, "bad export request")
            return
        held = ownership.ownership(self.state, request.ushard, self.initial)
        if held.state is not ownership.Owner.FROZEN or held.move_id != request.move_id:
            message = f"μshard {request.ushard} is {held.state.value}({held.move_id}) here"
            self._mover_error(origin, request.token, ErrorCode.NOT_READY, message)
            return
        limit = min(request.limit, self.p.limits.snapshot_chunk_items_max)
        records, cursor = ownership.export_chunk(self.state, request.ushard, request.after, limit)
        reply = ExportReply(
            token=request.token,
            records=tuple(records),
            cursor=cursor,
            generation=ownership.generation(self.state, request.ushard, self.generation),
            total=(
                ownership.movable_records(self.state, request.ushard)
                if request.after is None
                else None
            ),
        )
        self.out.mover_replies.append((origin, reply))

    def _holding(self, origin: Origin, request: HoldingRequest) -> None:
        """The μshards this p-shard still holds, from an activated primary's applied
        state (it has applied every entry of earlier epochs, PITFALLS 2). On a p-shard
        being retired nothing moves in, so a lagging answer can only hold more."""
        if not 0 < request.ushards <= HOLDING_USHARDS_MAX:
            self._mover_error(origin, request.token, ErrorCode.INVALID, "bad holding request")
            return
        lead = self.replica.lead
        if lead is None or not lead.activated:
            code = ErrorCode.NOT_PRIMARY if lead is None else ErrorCode.NOT_READY
            self._mover_error(origin, request.token, code, "not an activated primary")
            return
        held = tuple(
            UShard(u)
            for u in range(request.ushards)
            if ownership.ownership(self.state, UShard(u), self.initial).state in ownership.HELD
        )
        self.out.mover_replies.append((origin, HoldingReply(token=request.token, ushards=held)))

    def _mover_error(self, origin: Origin, token: int, code: ErrorCode, message: str) -> None:
        reply = ErrorReply(token=token, code=code, message=message, retry_after_ms=20)
        self.out.mover_replies.append((origin, reply))

    def _rename_request(self, command: WriteCommand) -> bytes:
        """Deliberate bug `no-dedupe`: every attempt looks new to apply's dedupe table."""
        self.renamed_requests += 1
        client = f"{command.request.client}#{self.node}#{self.renamed_requests}"
        request = RequestId(client=client, seq=command.request.seq)  # type: ignore[arg-type]
        return encode_command(msgspec.structs.replace(command, request=request))

    def _submit_read(
        self, origin: Origin, request: ReadLike, now: Instant, wall_ms: WallMs
    ) -> None:
        problem = _read_problem(request, self.p.limits)
        if problem is not None:
            self._error(origin, request.token, ErrorCode.INVALID, problem)
            return
        bound = request.bound_ms
        if request.consistency is Consistency.BOUNDED and (
            bound is None or not math.isfinite(bound) or bound <= 0
        ):
            self._error(origin, request.token, ErrorCode.INVALID, "bounded reads need ms > 0")
            return
        consistency = request.consistency
        min_seq = request.min_version.seq if request.min_version is not None else None
        decision = self.replica.read(
            strong=consistency is Consistency.STRONG,
            now=now,
            bound_ms=request.bound_ms if consistency is Consistency.BOUNDED else None,
            min_seq=min_seq if consistency is Consistency.READ_YOUR_WRITES else None,
        )
        match decision:
            case ServeNow():
                self._serve_read(origin, request, decision, now, wall_ms)
            case Refused():
                self._refuse(origin, request.token, decision)
            case _:
                self.reads[decision.token] = (origin, request)

    # ------------------------------------------------------------------ flush

    def flush(self, now: Instant, wall_ms: WallMs) -> HostOutput:
        """Propose queued writes, execute every Ready; the caller syncs, then sends."""
        self._propose_queued(now, wall_ms)
        while True:
            ready = self.replica.ready()
            if ready.is_empty():
                break
            self._execute(ready, now, wall_ms)
        out, self.out = self.out, HostOutput()
        return out

    def _propose_gc(self, now: Instant, wall_ms: WallMs) -> None:
        """The primary proposes garbage collection as a replicated command, so every
        replica forgets the same tombstones and dedupe entries at the same slot."""
        lead = self.replica.lead
        if lead is None or not lead.activated or now < self.next_gc_at:
            return
        self.next_gc_at = Instant(now + self.p.gc_interval_ms)
        horizon = Seq(max(0, self.replica.applied_seq - self.p.gc_tombstone_lag_entries))
        command = Gc(
            tombstone_horizon=horizon,
            dedupe_before_wall_ms=max(0, wall_ms - self.p.dedupe_retention_ms),
        )
        self.replica.propose((encode_command(command),), wall_ms, now)

    def _propose_queued(self, now: Instant, wall_ms: WallMs) -> None:
        self._propose_gc(now, wall_ms)
        per_entry = self.p.limits.commands_per_entry_max
        while self.queue:
            batch, self.queue = self.queue[:per_entry], self.queue[per_entry:]
            outcome = self.replica.propose(tuple(q.command for q in batch), wall_ms, now)
            if isinstance(outcome, Refused):
                for queued in batch:
                    self._refuse(queued.origin, queued.token, outcome, queued.from_mover)
                continue
            self._await(outcome, batch)

    def _await(self, outcome: Sequenced, batch: list[_Queued]) -> None:
        waiting = self.awaiting.setdefault(outcome.seq, [])
        for index, queued in enumerate(batch):
            if queued.durability is Durability.FAST_ACK:
                shared = self.p.has_bug("shared-batch-version")
                version = Version(queued.generation, outcome.seq, 0 if shared else index)
                reply = WriteReply(
                    token=queued.token,
                    result=Applied(version=version),
                    fast_ack_ballot=outcome.ballot,
                )
                self.out.replies.append((queued.origin, reply))
                continue
            waiting.append(
                _Awaiting(
                    origin=queued.origin,
                    token=queued.token,
                    command=queued.command,
                    index=index,
                    durability=queued.durability,
                    from_mover=queued.from_mover,
                )
            )

    def _execute(self, ready: Ready, now: Instant, wall_ms: WallMs) -> None:
        batch = WriteBatch()
        if ready.promise is not None:
            layout.put_promise(batch, ready.promise)
        for entry in ready.entries:
            layout.put_entry(batch, entry)
        if ready.commit_seq is not None:
            layout.put_commit(batch, ready.commit_seq)
        if ready.truncate_through is not None:
            layout.truncate(batch, ready.truncate_through)
        if len(batch):
            self._write(batch)
        self.out.messages.extend(ready.messages)
        for entry in ready.committed:
            self._apply(entry)
        for token, decision in ready.reads_done:
            origin, request = self.reads.pop(token)
            if isinstance(decision, ServeNow):
                self._serve_read(origin, request, decision, now, wall_ms)
            else:
                self._refuse(origin, request.token, decision)
        self.out.sm_events.extend(ready.sm_events)
        self.replica.advance(ready, now)
        # After advance: a snapshot is labelled with the applied seq its content has.
        for peer in sorted(set(ready.snapshot_needed)):
            self.snapshots.start(peer, self, now)

    def _write(self, batch: WriteBatch) -> None:
        absolute = WriteBatch()
        self.view.add_to(absolute, batch)
        self.store.write(absolute, sync=False)

    def _apply(self, entry: Entry) -> None:
        # Apply is strictly in order, exactly once per slot (a snapshot moves the point).
        assert entry.seq == self.applied_seq + 1, (entry.seq, self.applied_seq)
        self.applied_seq = entry.seq
        ctx = EntryContext(
            seq=entry.seq,
            epoch=entry.epoch,
            wall_ms=WallMs(entry.wall_ms),
            generation=self.generation,
            initial=self.initial,
        )
        state_batch = WriteBatch()
        results = apply_entry(
            self.state,
            ctx,
            entry.commands,
            state_batch,
            self.p.limits,
            shared_version_bug=self.p.has_bug("shared-batch-version"),
        )
        # Data and applied_seq in one atomic batch (DESIGN §3).
        absolute = WriteBatch()
        self.state.add_to(absolute, state_batch)
        applied = WriteBatch()
        layout.put_applied(applied, entry.seq)
        self.view.add_to(absolute, applied)
        self.store.write(absolute, sync=False)
        self.applied_epoch = entry.epoch
        self.applied_commands += len(entry.commands)
        self.out.applied.append(entry)
        self.out.applied_results.append(results)
        for waiting in self.awaiting.pop(entry.seq, []):
            index = waiting.index
            if index < len(entry.commands) and entry.commands[index] == waiting.command:
                result = results[index]
                reply: WriteReply | ErrorReply = WriteReply(token=waiting.token, result=result)
                if isinstance(result, Rejected) and result.reason == "moved":
                    reply = ErrorReply(
                        token=waiting.token,
                        code=ErrorCode.MOVED,
                        message=result.message,
                        retry_after_ms=10,
                    )
            else:
                reply = ErrorReply(
                    token=waiting.token,
                    code=ErrorCode.NOT_APPLIED,
                    message="the primary lost this write in a failover; it was not applied",
                    retry_after_ms=10,
                )
            if waiting.from_mover:
                self.out.mover_replies.append((waiting.origin, reply))
            else:
                self.out.replies.append((waiting.origin, reply))

    # ------------------------------------------------------------------ reads

    def _serve_read(
        self,
        origin: Origin,
        request: ReadLike,
        decision: ServeNow,
        now: Instant,
        wall_ms: WallMs,
    ) -> None:
        reply: ClientReply
        if not self._serves(request.ushard) and not self.p.has_bug("moved-source-serves-reads"):
            # At every consistency level: a reader with an old mapping must never get
            # stale data from a source that froze or dropped the μshard (PITFALLS 10).
            self._moved(origin, request.token, request.ushard)
            return
        if isinstance(request, ScanRequest):
            items, cursor = scan_ushard(
                self.state,
                request.ushard,
                request.prefix,
                start_after=request.start_after,
                limit=request.limit,
                wall_ms=wall_ms,
                limits=self.p.limits,
            )
            reply = ScanReply(
                token=request.token,
                items=tuple(items),
                cursor=cursor,
                applied_seq=self.replica.applied_seq,
                epoch=self.applied_epoch,
            )
        else:
            item, version = read_item_and_version(self.state, request.ushard, request.key, wall_ms)
            also = tuple(
                KeyRead(*read_item_and_version(self.state, request.ushard, key, wall_ms))
                for key in request.also
            )
            reply = ReadReply(
                token=request.token,
                item=item,
                record_version=version,
                applied_seq=self.replica.applied_seq,
                epoch=self.applied_epoch,
                generation=ownership.generation(self.state, request.ushard, self.generation),
                also=also,
            )
        # A lease read reads first and checks the lease after (PITFALLS 16).
        if decision.lease_read and not self.replica.lease_valid(now):
            self._error(
                origin, request.token, ErrorCode.NOT_PRIMARY, "lease expired", retry_after_ms=10
            )
            return
        lead = self.replica.lead
        if decision.lease_read and lead is not None:
            # For the simulator's lease checker (World._check_lease).
            self.out.lease_reads.append((lead.ballot, lead.config))
        self.reads_served += 1
        self.out.replies.append((origin, reply))

    # ------------------------------------------------------------------ helpers

    def _refuse(
        self, origin: Origin, token: int, refused: Refused, from_mover: bool = False
    ) -> None:
        reply = ErrorReply(
            token=token,
            code=_REFUSAL_CODES[refused.reason],
            primary_hint=refused.primary_hint,
            retry_after_ms=refused.retry_after_ms,
        )
        if from_mover:
            self.out.mover_replies.append((origin, reply))
        else:
            self.out.replies.append((origin, reply))

    def _error(
        self, origin: Origin, token: int, code: ErrorCode, message: str, retry_after_ms: int = 0
    ) -> None:
        reply = ErrorReply(token=token, code=code, message=message, retry_after_ms=retry_after_ms)
        self.out.replies.append((origin, reply))

    def send(self, env: Envelope) -> None:
        self.out.messages.append(env)


def _read_problem(request: ReadLike, limits: Limits) -> str | None:
    """Why a client may not send this read, or None."""
    if not is_valid_ushard(request.ushard):
        return "ushard out of range"
    if isinstance(request, ScanRequest):
        keys: tuple[bytes, ...] = (request.prefix, request.start_after or b"")
        if not 1 <= request.limit <= limits.scan_items_max:
            return f"scan limit must be 1..{limits.scan_items_max}"
    else:
        if len(request.also) >= limits.read_keys_max:
            return f"a read request reads at most {limits.read_keys_max} keys"
        keys = (request.key, *request.also)
    if any(len(key) > limits.key_bytes_max for key in keys):
        return f"key over {limits.key_bytes_max} bytes"
    return None


def _write_problem(command: Command, durability: Durability) -> str | None:
    """Why a client may not send this command, or None. FAST_ACK is allowed only for
    unconditional put/delete (DESIGN §3): nothing conditional is answered unapplied."""
    if not isinstance(command, Put | Delete | Increment | TxnCommit):
        return "not a client write command"
    if durability is not Durability.FAST_ACK:
        return None
    unconditional = (
        isinstance(command, Put)
        and not command.if_absent
        and command.if_version is None
        and command.if_value is None
    ) or (isinstance(command, Delete) and not command.if_exists and command.if_version is None)
    return None if unconditional else "FAST_ACK is for unconditional put and delete only"
