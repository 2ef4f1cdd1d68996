"""The shard manager's resharding driver: runs one `Mover` per keyspace being resharded
against the real nodes (docs/protocols/resharding.md, ADR 0009).

Rules of this module:
- one task owns the movers (`run`): plans, ticks, replies and mapping installs all
  reach them from that task, so a mover is never entered twice at once;
- each request to a node is its own task, bounded by `CALL_TIMEOUT_S`, owned here and
  cancelled on `close`; its answer comes back through a bounded queue (a full queue
  drops the answer: the mover resends after `resend_after_ms`);
- a mapping version is installed through the manager's `install_mapping` (a
  compare-and-swap of the keyspace record) before the mover is told, so the source
  drops the μshard only once the new mapping is stored;
- a mover's unfinished work (`Mover.record`) is stored at `reshard/{keyspace}` before
  the outputs that follow a change are sent, so a manager that restarts (or a new
  leader) resumes every move where it was (`restore`), and a move that may have sent
  Own is never aborted. Move ids come from the metastore (`Catalog.allocate_move_ids`);
- a keyspace marked with `finish_when_idle` (a shrink) gets `finish(name)` called from
  the same task once its mover has nothing left, until `finish` says it is done (the
  manager retires the emptied p-shards then, runtime/retirement.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from loom.core.errors import LoomError
from loom.core.ids import ShardId, UShard
from loom.core.time import Instant
from loom.host.requests import (
    ErrorReply,
    ExportReply,
    ExportRequest,
    HoldingReply,
    HoldingRequest,
    MoveRequest,
    MoverReply,
    MoverRequest,
    WriteReply,
)
from loom.runtime.codec import MoverAnswer, MoverCall, decode, encode
from loom.runtime.rpc import RpcClient
from loom.runtime.tls import TlsConfig
from loom.shardmgr.metastore import Metastore
from loom.shardmgr.moves import (
    ExportChunk,
    Exported,
    InstallMapping,
    Mover,
    MoverInput,
    MoverParams,
    MoverRecord,
    Proposed,
    ProposeMove,
    Unanswered,
)
from loom.shardmgr.routing import Keyspace

log = logging.getLogger("loom.sm.reshard")
RESHARD = "reshard/"
_ENCODER = msgspec.msgpack.Encoder()
_RECORD = msgspec.msgpack.Decoder(MoverRecord)
TICK_S = 0.05
CALL_TIMEOUT_S = 2.0
RETRY_S = 0.05  # between two tries of one call (no primary yet, not ready, refused)
RESEND_AFTER_MS = CALL_TIMEOUT_S * 1000 + 500
ANSWERS_MAX = 4096

AddressOf = Callable[[ShardId], tuple[str, int] | None]
InstallMapping_ = Callable[[str, UShard, ShardId], Awaitable[None]]
Finish = Callable[[str], Awaitable[bool]]
FINISH_EVERY_S = 0.5  # a finish that could not complete is tried again after this


class Resharder:
    def __init__(
        self,
        *,
        metastore: Metastore,
        keyspace_of: Callable[[str], Keyspace | None],
        primary_address: AddressOf,
        install_mapping: InstallMapping_,
        params: MoverParams | None = None,
        finish: Finish | None = None,
        tls: TlsConfig | None = None,
        delay_for: Callable[[tuple[str, int]], Callable[[], float] | None] | None = None,
        is_ready: Callable[[ShardId], bool] | None = None,
    ) -> None:
        # Injected latency of a connection to an address (runtime/latency.py).
        self.delay_for = delay_for
        self.metastore = metastore
        self.tls = tls
        # What is stored of each mover: (record, revision).
        self.stored: dict[str, tuple[MoverRecord, int]] = {}
        self.keyspace_of = keyspace_of
        self.primary_address = primary_address
        self.install_mapping = install_mapping
        # No resend while a call may still answer (`_ask` keeps trying until its
        # deadline): a resend would turn the slow answer stale.
        given = params or MoverParams()
        self.params = dataclasses.replace(
            given, resend_after_ms=max(given.resend_after_ms, RESEND_AFTER_MS)
        )
        self.movers: dict[str, Mover] = {}
        self.answers: asyncio.Queue[tuple[str, int, MoverInput]] = asyncio.Queue(ANSWERS_MAX)
        self.calls: set[asyncio.Task[None]] = set()
        self.connections: dict[tuple[str, int], RpcClient] = {}
        self.connecting: dict[tuple[str, int], asyncio.Lock] = {}
        self.finish = finish
        self.is_ready = is_ready  # a p-shard has an active primary: moves wait for it
        # Keyspaces to `finish` once their movers are idle, with when it was last tried.
        self.finishing: dict[str, float] = {}

    def finish_when_idle(self, name: str) -> None:
        self.finishing.setdefault(name, 0.0)

    def pauses(self, name: str) -> dict[UShard, float]:
        """The longest write pause (ms) of each μshard moved in the keyspace's current
        or last reshard (Mover.pauses)."""
        mover = self.movers.get(name)
        return dict(mover.pauses) if mover is not None else {}

    def plan(self, name: str, moves: list[tuple[UShard, ShardId]], first_move_id: int) -> None:
        """Queue a keyspace's moves (μshard numbers are per keyspace: one mover each).
        `first_move_id` starts `ids_needed(name, moves)` ids allocated in the metastore."""
        mover = self.movers.setdefault(name, Mover(self.params))
        if not mover.planned and not mover.in_flight():
            mover.pauses.clear()  # a new reshard: its own pauses
        mover.plan(moves, first_move_id)

    def ids_needed(self, name: str, moves: list[tuple[UShard, ShardId]]) -> int:
        mover = self.movers.get(name)
        return len(moves) + (len(mover.planned) if mover is not None else 0)

    def is_moving(self, name: str, ushard: UShard) -> bool:
        """A move of this μshard is planned or under way (or stuck)."""
        mover = self.movers.get(name)
        if mover is None:
            return False
        return mover.is_moving(ushard) or any(u == ushard for u, _ in mover.planned)

    def pending(self, name: str) -> int:
        mover = self.movers.get(name)
        return 0 if mover is None else len(mover.planned) + mover.in_flight()

    async def run(self) -> None:
        while True:
            # A turn as soon as an answer comes (each step of a move waits for the
            # previous one: this is most of a μshard's write pause), else every TICK_S.
            answers = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    answers.append(await self.answers.get())
            while not self.answers.empty():
                answers.append(self.answers.get_nowait())
            now = Instant(time.monotonic() * 1000)
            for name, token, answer in answers:
                if name in self.movers:
                    self.movers[name].on_reply(token, answer, now)
            for name in sorted(self.movers):
                keyspace = self.keyspace_of(name)
                mover = self.movers[name]
                if keyspace is None:
                    del self.movers[name]  # dropped meanwhile
                    continue
                mover.start_planned(keyspace.shard_of, now, self.is_ready)
                mover.tick(now)
                await self._execute(name, mover, now)
            await self._finish_idle()

    async def _finish_idle(self) -> None:
        if self.finish is None:
            return
        for name in sorted(self.finishing):
            tried = self.finishing[name]
            if self.pending(name) or time.monotonic() - tried < FINISH_EVERY_S:
                continue
            self.finishing[name] = time.monotonic()
            try:
                done = await self.finish(name)
            except LoomError as error:
                log.warning("keyspace %s: reshard not finished yet: %s", name, error)
                continue
            if done:
                del self.finishing[name]

    def load(self) -> list[tuple[str, MoverRecord, int]]:
        """The stored movers (blocking: call off the event loop)."""
        return [
            (key.removeprefix(RESHARD), _RECORD.decode(value), revision)
            for key, value, revision in self.metastore.list(RESHARD)
        ]

    def restore(self, stored: list[tuple[str, MoverRecord, int]], now: Instant) -> None:
        """Takes over the stored movers (call after the keyspaces are loaded)."""
        for name, record, revision in stored:
            self.stored[name] = (record, revision)
            if record.moves or record.planned:
                mover = self.movers.setdefault(name, Mover(self.params))
                mover.restore(record, now)
                log.info(
                    "keyspace %s: resuming %d moves, %d planned",
                    name, len(record.moves), len(record.planned),
                )  # fmt: skip

    async def _store(self, name: str, mover: Mover) -> bool:
        """Stores the mover's work if it changed; False if the metastore failed."""
        record = mover.record()
        stored = self.stored.get(name)
        if stored is not None and stored[0] == record:
            return True
        key = RESHARD + name
        revision = stored[1] if stored is not None else None
        try:
            result = await asyncio.to_thread(
                self.metastore.compare_and_swap, key, revision, _ENCODER.encode(record)
            )
        except LoomError as error:
            log.warning("moves of %s not stored: %s", name, error)
            return False
        if result.current is not None:
            # Another manager wrote it (a deposed leader): take its revision; the
            # next turn writes ours over it.
            self.stored[name] = (_RECORD.decode(result.current[0]), result.current[1])
        return result.ok

    async def _execute(self, name: str, mover: Mover, now: Instant) -> None:
        for _ in range(16):  # an install leads to the Drop: drain both
            outputs = mover.outputs()
            if not outputs:
                return
            if not await self._store(name, mover):
                # Nothing leaves before it is stored; installs wait, the rest is resent.
                mover.pending.extend(o for o in outputs if isinstance(o, InstallMapping))
                return
            for output in outputs:
                match output:
                    case ProposeMove():
                        request: MoverRequest = MoveRequest(
                            token=output.token, command=output.command
                        )
                        self._call(name, output.shard, request)
                    case ExportChunk():
                        request = ExportRequest(
                            token=output.token,
                            ushard=output.ushard,
                            move_id=output.move_id,
                            after=output.after,
                            limit=output.limit,
                        )
                        self._call(name, output.shard, request)
                    case InstallMapping():
                        try:
                            await self.install_mapping(name, output.ushard, output.shard)
                        except LoomError as error:
                            # Not stored: the move waits in INSTALL; tried again below.
                            log.warning("mapping of %s not stored: %s", name, error)
                            mover.pending.append(output)
                            return
                        log.info(
                            "keyspace %s: μshard %d moved to p-shard %d",
                            name, output.ushard, output.shard,
                        )  # fmt: skip
                        # The pause ends now that the mapping is usable: a fresh clock.
                        installed = Instant(time.monotonic() * 1000)
                        mover.mapping_installed(output.move_id, installed)

    def _call(self, name: str, shard: ShardId, request: MoverRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._ask(name, shard, request))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _ask(self, name: str, shard: ShardId, request: MoverRequest) -> None:
        """One request, tried at the p-shard's current primary until it answers or
        `CALL_TIMEOUT_S` passes (not primary, not ready, overloaded, unreachable: again
        after `RETRY_S`). Only then does the mover hear `Unanswered` and resend: a slow
        answer is never overtaken by a resend whose token would make it stale."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT_S
        answer: MoverInput = Unanswered()
        while isinstance(answer, Unanswered) and loop.time() < deadline:
            address = self.primary_address(shard)
            if address is not None:
                answer = await self._ask_once(address, shard, request, deadline - loop.time())
            if isinstance(answer, Unanswered):
                await asyncio.sleep(min(RETRY_S, max(0.0, deadline - loop.time())))
        with contextlib.suppress(asyncio.QueueFull):
            self.answers.put_nowait((name, request.token, answer))

    async def _ask_once(
        self, address: tuple[str, int], shard: ShardId, request: MoverRequest, timeout_s: float
    ) -> MoverInput:
        try:
            client = await self._connection(address)
            body = await client.call(
                encode(MoverCall(shard=shard, request=request)), timeout_s=max(0.05, timeout_s)
            )
            message = decode(body)
        except (LoomError, OSError) as error:
            log.debug("mover call to %s failed: %s", address, error)
            stale = self.connections.pop(address, None)
            if stale is not None:
                await stale.close()
            return Unanswered()
        return _answer(message.reply) if isinstance(message, MoverAnswer) else Unanswered()

    async def holding(self, shard: ShardId, ushards: int) -> tuple[UShard, ...] | None:
        """The μshards p-shard `shard`'s primary says it holds; None if it did not
        answer (no primary known, not activated, unreachable)."""
        address = self.primary_address(shard)
        if address is None:
            return None
        request = HoldingRequest(token=0, ushards=ushards)
        try:
            client = await self._connection(address)
            body = await client.call(
                encode(MoverCall(shard=shard, request=request)), timeout_s=CALL_TIMEOUT_S
            )
        except (LoomError, OSError) as error:
            log.debug("holding call to %s failed: %s", address, error)
            return None
        message = decode(body)
        if isinstance(message, MoverAnswer) and isinstance(message.reply, HoldingReply):
            return message.reply.ushards
        return None

    async def _connection(self, address: tuple[str, int]) -> RpcClient:
        """One connection per node; concurrent calls wait for the same connect."""
        lock = self.connecting.setdefault(address, asyncio.Lock())
        async with lock:
            client = self.connections.get(address)
            if client is None:
                delay = self.delay_for(address) if self.delay_for is not None else None
                client = await RpcClient.connect(*address, tls=self.tls, delay=delay)
                self.connections[address] = client
            return client

    async def close(self) -> None:
        for task in list(self.calls):
            task.cancel()
        for task in list(self.calls):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in self.connections.values():
            await client.close()
        self.connections.clear()


def _answer(reply: MoverReply) -> MoverInput:
    match reply:
        case ExportReply():
            return Exported(
                records=reply.records,
                cursor=reply.cursor,
                generation=reply.generation,
                total=reply.total,
            )
        case WriteReply():
            return Proposed(result=reply.result)
        case ErrorReply() | HoldingReply():
            return Unanswered()
