"""The shard manager as a running program: the sans-IO `ShardManagerCore` behind the RPC
server, its epochs in a `Metastore` (a file for one machine). Work in progress for the
cluster issue: one manager (no etcd leader election yet), no routing table for clients.

Rules of this module:
- one task owns the core: reports, events, operator calls and ticks reach it through one
  bounded queue, so the core is never entered twice at once;
- an epoch is announced only after the metastore's compare-and-swap stored it (the core
  emits `PersistEpoch` first and announces from `epoch_persisted`); the metastore is
  called off the event loop;
- the manager is never on the data path: it only sends assignments; each node has one
  owned sender task and a bounded queue, and a lost assignment is re-announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from loom.core.ids import Epoch, NodeId, ShardId
from loom.core.time import Instant
from loom.paxos.replica import Assignment
from loom.runtime.codec import (
    AssignMessage,
    BadMessage,
    ClientAnswer,
    ClientCall,
    CreateShard,
    ManagerEvent,
    NodeReportMessage,
    NodeStatus,
    PeerAddress,
    PeerMessage,
    ShardStatus,
    StatusReply,
    StatusRequest,
    decode,
    encode,
)
from loom.runtime.metastore_file import FileMetastore
from loom.runtime.outbound import Outbound
from loom.runtime.rpc import RpcServer
from loom.shardmgr.core import Announce, PersistEpoch, ShardManagerCore, ShardRecord, SmParams

TICK_MS = 50.0
INPUTS_MAX = 10_000


class _Rng:
    """The core draws randomness only for chaos, which a real manager never enables."""

    def random(self) -> float:
        return 1.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return start


_ENCODER = msgspec.msgpack.Encoder()
_RECORD = msgspec.msgpack.Decoder(ShardRecord)


def epoch_key(shard: int) -> str:
    """Where a shard's record lives; its epoch is compare-and-swapped there."""
    return f"shards/{shard}/epoch"


def decode_record(value: bytes) -> ShardRecord:
    return _RECORD.decode(value)


class ManagerRuntime:
    def __init__(
        self,
        *,
        metastore_path: Path,
        params: SmParams | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.core = ShardManagerCore(params=params or SmParams(), rng=_Rng())
        self.metastore = FileMetastore(metastore_path)
        self.server = RpcServer(self._handle, host, port)
        self.inputs: asyncio.Queue[Callable[[Instant], None]] = asyncio.Queue(INPUTS_MAX)
        self.addresses: dict[NodeId, tuple[str, int]] = {}
        self.outboxes: dict[NodeId, Outbound] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.stored_activation: dict[ShardId, Assignment] = {}

    async def start(self) -> None:
        now = Instant(time.monotonic() * 1000)
        for shard, record in await asyncio.to_thread(self._load):
            self.core.restore(shard, record, now)
            if record.activated:
                self.stored_activation[shard] = record.assignment
        await self.server.start()
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._run_core()))
        self.tasks.append(loop.create_task(self._ticker()))

    @property
    def port(self) -> int:
        return self.server.port

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.close()

    # ---------------------------------------------------------------- inputs

    async def _handle(self, body: bytes) -> bytes:
        message = decode(body)
        match message:
            case NodeReportMessage():
                self._note_address(message)
                self.inputs.put_nowait(lambda now: self.core.on_report(message.report, now))
            case ManagerEvent():
                self.inputs.put_nowait(
                    lambda now: self.core.on_event(message.shard, message.event, now)
                )
            case CreateShard():
                if len(message.acceptors) not in (1, 3, 5):
                    raise BadMessage("a p-shard has 1, 3 or 5 acceptors")
                unknown = [n for n in message.acceptors if n not in self.addresses]
                if unknown or message.shard in self.core.shards:
                    raise BadMessage(f"unknown nodes {unknown} or existing shard")
                self.inputs.put_nowait(
                    lambda now: self.core.create_shard(message.shard, message.acceptors, now)
                )
            case StatusRequest():
                return encode(self.status())
            case PeerMessage() | ClientCall() | ClientAnswer() | AssignMessage() | StatusReply():
                raise BadMessage(f"the shard manager does not take {type(message).__name__}")
        return b""

    def status(self) -> StatusReply:
        now = Instant(time.monotonic() * 1000)
        nodes = tuple(
            NodeStatus(
                node=node,
                address=f"{host}:{port}",
                alive=self.core.is_alive(node, now),
                incarnation=self.core.nodes[node].incarnation if node in self.core.nodes else 0,
            )
            for node, (host, port) in sorted(self.addresses.items())
        )
        shards = []
        for shard in sorted(self.core.shards):
            state = self.core.shards[shard]
            config = state.current.config
            progress = {}
            for member in config.members():
                report = self.core.nodes.get(member)
                seen = report.progress.get(shard) if report is not None else None
                if seen is not None:
                    progress[str(member)] = (int(seen.applied_seq), int(seen.commit_seq))
            shards.append(
                ShardStatus(
                    shard=shard,
                    epoch=int(state.current.epoch),
                    primary=state.current.primary,
                    activated=state.activated,
                    acceptors=config.acceptors,
                    followers=config.followers,
                    progress=progress,
                )
            )
        return StatusReply(nodes=nodes, shards=tuple(shards))

    def _note_address(self, message: NodeReportMessage) -> None:
        node = message.report.node
        self.addresses[node] = (message.host, message.port)
        if node not in self.outboxes:
            outbound = self.outboxes[node] = Outbound(lambda: self.addresses[node])
            self.tasks.append(asyncio.get_running_loop().create_task(outbound.run()))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_MS / 1000)
            with contextlib.suppress(asyncio.QueueFull):
                self.inputs.put_nowait(self.core.tick)

    # ---------------------------------------------------------------- the core

    async def _run_core(self) -> None:
        while True:
            apply = await self.inputs.get()
            apply(Instant(time.monotonic() * 1000))
            await self._drain_outputs()
            await self._persist_activations()

    async def _persist_activations(self) -> None:
        for shard in sorted(self.core.shards):
            record = self.core.record(shard)
            if record.activated and self.stored_activation.get(shard) != record.assignment:
                await asyncio.to_thread(self._store_activation, shard, record)
                self.stored_activation[shard] = record.assignment

    async def _drain_outputs(self) -> None:
        while outputs := self.core.outputs():
            for output in outputs:
                if isinstance(output, PersistEpoch):
                    record = self.core.record(output.shard, output.assignment)
                    stored = await asyncio.to_thread(self._compare_and_swap_epoch, output, record)
                    now = Instant(time.monotonic() * 1000)
                    self.core.epoch_persisted(
                        output.shard, output.assignment, stored_epoch=stored, now=now
                    )
                elif isinstance(output, Announce):
                    self._announce(output)

    def _compare_and_swap_epoch(self, output: PersistEpoch, record: ShardRecord) -> Epoch:
        """Stores the new epoch only over the expected one; returns what is stored after.
        The CAS makes two managers unable to hand out the same epoch (PITFALLS 13)."""
        key = epoch_key(output.shard)
        current = self.metastore.get(key)
        stored = _RECORD.decode(current[0]).assignment.epoch if current else Epoch(0)
        if stored != output.expected:
            return stored
        revision = current[1] if current is not None else None
        result = self.metastore.compare_and_swap(key, revision, _ENCODER.encode(record))
        if result.current is None:
            return Epoch(0)
        return _RECORD.decode(result.current[0]).assignment.epoch

    def _store_activation(self, shard: ShardId, record: ShardRecord) -> None:
        """Records that the stored epoch activated, unless the epoch moved on meanwhile."""
        key = epoch_key(shard)
        current = self.metastore.get(key)
        if current is None:
            return
        if _RECORD.decode(current[0]).assignment != record.assignment:
            return
        self.metastore.compare_and_swap(key, current[1], _ENCODER.encode(record))

    def _load(self) -> list[tuple[ShardId, ShardRecord]]:
        records = []
        for key, value, _revision in self.metastore.list("shards/"):
            shard = ShardId(int(key.split("/")[1]))
            records.append((shard, _RECORD.decode(value)))
        return records

    def _announce(self, announce: Announce) -> None:
        members = announce.assignment.config.members()
        peers = tuple(
            PeerAddress(node=n, host=self.addresses[n][0], port=self.addresses[n][1])
            for n in members
            if n in self.addresses
        )
        message = AssignMessage(shard=announce.shard, assignment=announce.assignment, peers=peers)
        body = encode(message)
        for node in announce.to:
            outbound = self.outboxes.get(node)
            if outbound is not None:
                outbound.put(body)
