"""Replication messages, log entries and configs. Wire/disk format v1 (msgspec, never pickle).

A message from a peer is untrusted input: the replica validates it and drops what is
malformed (counted), it never asserts on it.
"""

from __future__ import annotations

from msgspec import Struct

from loom.core.ids import Ballot, Epoch, Incarnation, NodeId, Seq, ShardId


class Entry(Struct, frozen=True, array_like=True):
    """One log slot: the ballot that accepted it, and the slot's value: what the primary
    stamped when it sequenced the entry (wall clock, its epoch) and the commands.

    Re-proposals change `ballot` only; `wall_ms`, `epoch` and `commands` are the value,
    so apply (which reads them) is identical on every replica. No commands = no-op.
    """

    ballot: Ballot
    seq: Seq
    wall_ms: int
    epoch: Epoch
    commands: tuple[bytes, ...]

    def same_value(self, other: Entry) -> bool:
        return (self.wall_ms, self.epoch, self.commands) == (
            other.wall_ms,
            other.epoch,
            other.commands,
        )


class Config(Struct, frozen=True, array_like=True):
    """The member set of one epoch. Acceptors vote; followers only learn."""

    epoch: Epoch
    acceptors: tuple[NodeId, ...]
    followers: tuple[NodeId, ...] = ()

    def majority(self) -> int:
        return len(self.acceptors) // 2 + 1

    def members(self) -> tuple[NodeId, ...]:
        return self.acceptors + self.followers


class Prepare(Struct, frozen=True, tag="prepare"):
    ballot: Ballot
    config: Config
    # Entries at or below the candidate's commit point need not be returned.
    commit_seq: Seq


class Promise(Struct, frozen=True, tag="promise"):
    ballot: Ballot
    commit_seq: Seq
    truncated_seq: Seq
    # The config this acceptor promised before this ballot (PITFALLS 15).
    prior_config: Config | None
    entries: tuple[Entry, ...]
    incarnation: Incarnation


class Nack(Struct, frozen=True, tag="nack"):
    """The receiver has promised `promised`, which is higher than the sender's ballot."""

    ballot: Ballot
    promised: Ballot


class Accept(Struct, frozen=True, tag="accept"):
    ballot: Ballot
    entries: tuple[Entry, ...]
    commit_seq: Seq
    round: int  # the primary's request number, to credit the lease from when it was sent


class Accepted(Struct, frozen=True, tag="accepted"):
    ballot: Ballot
    # Every slot up to `match_seq` is held under `ballot` or known committed.
    match_seq: Seq
    round: int
    lease_granted: bool
    commit_seq: Seq


class Heartbeat(Struct, frozen=True, tag="hb"):
    ballot: Ballot
    commit_seq: Seq
    round: int


class HeartbeatAck(Struct, frozen=True, tag="hback"):
    ballot: Ballot
    round: int
    lease_granted: bool
    match_seq: Seq


class Learn(Struct, frozen=True, tag="learn"):
    """Committed entries streamed to a follower (or a lagging acceptor)."""

    ballot: Ballot
    entries: tuple[Entry, ...]
    commit_seq: Seq


class LearnAck(Struct, frozen=True, tag="learnack"):
    ballot: Ballot
    applied_seq: Seq
    # The follower holds no entry beyond this and needs the stream from here.
    held_seq: Seq


class FreshnessProbe(Struct, frozen=True, tag="probe"):
    probe: int


class FreshnessReply(Struct, frozen=True, tag="probereply"):
    """Sent only by a primary holding a valid lease: everything acknowledged before the
    probe arrived is at or below `commit_seq`."""

    probe: int
    commit_seq: Seq
    ballot: Ballot


class SnapshotChunk(Struct, frozen=True, tag="snapchunk"):
    ballot: Ballot
    transfer: int
    snapshot_seq: Seq
    snapshot_ballot: Ballot
    index: int
    items: tuple[tuple[bytes, bytes], ...]
    last: bool


class SnapshotAck(Struct, frozen=True, tag="snapack"):
    transfer: int
    # Chunks up to and including `index` are staged; -1 asks to restart.
    index: int
    installed: bool


class LeaseRelease(Struct, frozen=True, tag="release"):
    """A primary that stepped down in a planned hand-off gives up the lease its acceptors
    granted to `ballot`: it serves nothing under it any more, so they need not wait `W`
    before promising its successor."""

    ballot: Ballot


Message = (
    Prepare
    | Promise
    | Nack
    | Accept
    | Accepted
    | Heartbeat
    | HeartbeatAck
    | Learn
    | LearnAck
    | FreshnessProbe
    | FreshnessReply
    | SnapshotChunk
    | SnapshotAck
    | LeaseRelease
)


class Envelope(Struct, frozen=True, array_like=True):
    shard: ShardId
    src: NodeId
    dst: NodeId
    message: Message
