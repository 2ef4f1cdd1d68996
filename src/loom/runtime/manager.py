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

from loom.core.ids import Epoch, NodeId
from loom.core.time import Instant
from loom.runtime.codec import (
    AssignMessage,
    BadMessage,
    ClientAnswer,
    ClientCall,
    CreateShard,
    ManagerEvent,
    NodeReportMessage,
    PeerAddress,
    PeerMessage,
    decode,
    encode,
)
from loom.runtime.metastore_file import FileMetastore
from loom.runtime.outbound import Outbound
from loom.runtime.rpc import RpcServer
from loom.shardmgr.core import Announce, PersistEpoch, ShardManagerCore, SmParams

TICK_MS = 50.0
INPUTS_MAX = 10_000


class _Rng:
    """The core draws randomness only for chaos, which a real manager never enables."""

    def random(self) -> float:
        return 1.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return start


def epoch_key(shard: int) -> str:
    return f"shards/{shard}/epoch"


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

    async def start(self) -> None:
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
            case PeerMessage() | ClientCall() | ClientAnswer() | AssignMessage():
                raise BadMessage(f"the shard manager does not take {type(message).__name__}")
        return b""

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

    async def _drain_outputs(self) -> None:
        while outputs := self.core.outputs():
            for output in outputs:
                if isinstance(output, PersistEpoch):
                    stored = await asyncio.to_thread(self._compare_and_swap_epoch, output)
                    now = Instant(time.monotonic() * 1000)
                    self.core.epoch_persisted(
                        output.shard, output.assignment, stored_epoch=stored, now=now
                    )
                elif isinstance(output, Announce):
                    self._announce(output)

    def _compare_and_swap_epoch(self, output: PersistEpoch) -> Epoch:
        """Stores the new epoch only over the expected one; returns what is stored after.
        The CAS makes two managers unable to hand out the same epoch (PITFALLS 13)."""
        key = epoch_key(output.shard)
        current = self.metastore.get(key)
        stored = Epoch(int(current[0])) if current is not None else Epoch(0)
        if stored != output.expected:
            return stored
        revision = current[1] if current is not None else None
        new = str(output.assignment.epoch).encode()
        result = self.metastore.compare_and_swap(key, revision, new)
        if result.current is None:
            return Epoch(0)
        return Epoch(int(result.current[0]))

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
