"""Snapshot transfer of one shard replica's state: chunked, acknowledged, resumable.

The sender materialises the state at its applied seq when the transfer starts (so
the chunks are one consistent cut) and pins its log above that seq until the
receiver reports the snapshot installed (PITFALLS 8). The receiver stages chunks
and installs them in one atomic batch with applied_seq and the truncation point;
a lost chunk or ack is resent, a gap makes the receiver ask from where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loom.core.ids import Ballot, NodeId, Seq, ShardId
from loom.core.time import Instant
from loom.host import layout
from loom.paxos.messages import Envelope, SnapshotAck, SnapshotChunk
from loom.storage.api import WriteBatch

if TYPE_CHECKING:
    from loom.host.shard import ShardHost

RESEND_AFTER_MS = 200.0
ATTEMPTS_MAX = 50


@dataclass(slots=True, kw_only=True)
class _Outgoing:
    transfer: int
    peer: NodeId
    snapshot_seq: Seq
    ballot: Ballot
    chunks: list[tuple[tuple[bytes, bytes], ...]]
    next_index: int = 0
    sent_at: Instant = Instant(float("-inf"))
    attempts: int = 0


@dataclass(slots=True, kw_only=True)
class _Incoming:
    transfer: int
    source: NodeId
    snapshot_seq: Seq
    expected: int = 0
    items: list[tuple[bytes, bytes]] = field(default_factory=list)


class SnapshotTransfers:
    def __init__(self, *, node: NodeId, shard: ShardId) -> None:
        self.node = node
        self.shard = shard
        self.outgoing: dict[NodeId, _Outgoing] = {}
        self.incoming: _Incoming | None = None
        self.next_transfer = 1
        self.installed = 0

    # -- sender

    def start(self, peer: NodeId, host: ShardHost, now: Instant) -> None:
        if peer in self.outgoing:
            return
        replica = host.replica
        chunk_items = replica.p.limits.snapshot_chunk_items_max
        items = list(host.state.scan(b"", b""))
        chunks = [tuple(items[i : i + chunk_items]) for i in range(0, len(items), chunk_items)]
        transfer = self.next_transfer
        self.next_transfer += 1
        ballot = replica.promise.ballot
        self.outgoing[peer] = _Outgoing(
            transfer=transfer,
            peer=peer,
            snapshot_seq=replica.applied_seq,
            ballot=ballot,
            chunks=chunks or [()],
        )
        self._pin(host)
        self._send_next(self.outgoing[peer], host, now)

    def _send_next(self, out: _Outgoing, host: ShardHost, now: Instant) -> None:
        index = out.next_index
        chunk = SnapshotChunk(
            host.replica.promise.ballot,
            out.transfer,
            out.snapshot_seq,
            out.ballot,
            index,
            out.chunks[index],
            index == len(out.chunks) - 1,
        )
        out.sent_at = now
        out.attempts += 1
        host.send(Envelope(self.shard, self.node, out.peer, chunk))

    def _on_ack(self, src: NodeId, ack: SnapshotAck, host: ShardHost, now: Instant) -> None:
        out = self.outgoing.get(src)
        if out is None or ack.transfer != out.transfer:
            return
        if ack.installed:
            del self.outgoing[src]
            self._pin(host)
            return
        out.next_index = min(max(ack.index + 1, 0), len(out.chunks) - 1)
        out.attempts = 0
        self._send_next(out, host, now)

    def _pin(self, host: ShardHost) -> None:
        seqs = [o.snapshot_seq for o in self.outgoing.values()]
        host.replica.pin_log(Seq(min(seqs)) if seqs else None)

    def tick(self, host: ShardHost, now: Instant) -> None:
        if host.replica.lead is None and self.outgoing:
            self.outgoing.clear()  # only a primary streams snapshots
            self._pin(host)
        for peer in sorted(self.outgoing):
            out = self.outgoing[peer]
            if now - out.sent_at < RESEND_AFTER_MS:
                continue
            if out.attempts >= ATTEMPTS_MAX:
                del self.outgoing[peer]  # the peer is gone; a later lag check restarts
                self._pin(host)
                continue
            self._send_next(out, host, now)

    # -- receiver

    def on_message(self, env: Envelope, host: ShardHost, now: Instant) -> None:
        msg = env.message
        if isinstance(msg, SnapshotAck):
            self._on_ack(env.src, msg, host, now)
        elif isinstance(msg, SnapshotChunk):
            self._on_chunk(env.src, msg, host, now)

    def _on_chunk(self, src: NodeId, chunk: SnapshotChunk, host: ShardHost, now: Instant) -> None:
        if chunk.snapshot_seq <= host.replica.applied_seq:
            # Nothing to gain (already there): report it installed so the sender unpins.
            self._ack(src, chunk.transfer, chunk.index, host, installed=True)
            return
        incoming = self.incoming
        # A restarted sender numbers its transfers from 1 again: the snapshot's seq tells
        # two transfers with one number apart (equal seqs have equal content).
        identity = (src, chunk.transfer, chunk.snapshot_seq)
        if (
            incoming is None
            or (incoming.source, incoming.transfer, incoming.snapshot_seq) != identity
        ):
            if chunk.index != 0:
                if incoming is None:
                    self._ack(src, chunk.transfer, -1, host, installed=False)  # start over
                return  # another transfer is in progress: its sender gives up in time
            if incoming is not None and chunk.snapshot_seq < incoming.snapshot_seq:
                return
            incoming = self.incoming = _Incoming(
                transfer=chunk.transfer, source=src, snapshot_seq=chunk.snapshot_seq
            )
        if chunk.index != incoming.expected:
            self._ack(src, chunk.transfer, incoming.expected - 1, host, installed=False)
            return
        incoming.items.extend(chunk.items)
        incoming.expected += 1
        if not chunk.last:
            self._ack(src, chunk.transfer, chunk.index, host, installed=False)
            return
        self._install(incoming, chunk, host, now)
        self.incoming = None
        self._ack(src, chunk.transfer, chunk.index, host, installed=True)

    def _install(
        self, incoming: _Incoming, chunk: SnapshotChunk, host: ShardHost, now: Instant
    ) -> None:
        """Replace the whole state in one atomic batch with applied and truncation points."""
        seq = chunk.snapshot_seq
        batch = WriteBatch()
        batch.delete_range(layout.STATE, layout.STATE_END)
        for key, value in incoming.items:
            batch.put(layout.STATE + key, value)
        layout.put_applied(batch, seq)
        layout.put_commit(batch, Seq(max(seq, host.replica.commit_seq)))
        layout.truncate(batch, seq, chunk.snapshot_ballot)
        host._write(batch)
        host.applied_seq = seq
        self.installed += 1
        host.replica.snapshot_installed(seq, chunk.snapshot_ballot, now)

    def _ack(
        self, dst: NodeId, transfer: int, index: int, host: ShardHost, *, installed: bool
    ) -> None:
        host.send(Envelope(self.shard, self.node, dst, SnapshotAck(transfer, index, installed)))
