"""What the core asks its driver to do, and the outcomes it reports.

The driver executes a `Ready` strictly in this order (STYLE: etcd-style Ready):
1. persist `promise`, `entries`, `commit_seq`, `truncate_through` and fsync;
2. send `messages`;
3. apply `committed` in order (data + applied_seq in one atomic batch);
then calls `replica.advance(ready)`. No other input (`step`, `tick`, `propose`) may reach
the replica between `ready()` and `advance()`: apply progress moves only in `advance`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from msgspec import Struct

from loom.core.ids import Ballot, NodeId, Seq
from loom.paxos.messages import Config, Entry, Envelope


class PromiseRecord(Struct, frozen=True, array_like=True):
    """The acceptor's durable promise: the ballot, its config and the config before it."""

    ballot: Ballot
    config: Config | None
    prior_config: Config | None


class RefusalReason(enum.Enum):
    NOT_PRIMARY = "not_primary"
    NOT_READY = "not_ready"  # primary still activating
    OVERLOADED = "overloaded"
    TOO_STALE = "too_stale"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sequenced:
    seq: Seq
    ballot: Ballot


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    reason: RefusalReason
    primary_hint: NodeId | None = None
    retry_after_ms: int = 0


ProposeOutcome = Sequenced | Refused


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeNow:
    """The read may be served from the applied state now (lease reads re-check the lease
    after reading, see `Replica.lease_valid`)."""

    lease_read: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadPending:
    token: int


ReadDecision = ServeNow | ReadPending | Refused


class SmEventKind(enum.Enum):
    ACTIVATED = "activated"
    STEPPED_DOWN = "stepped_down"
    BALLOT_STALE = "ballot_stale"  # assigned a ballot not above what this acceptor promised
    ACTIVATION_FAILED = "activation_failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class SmEvent:
    """Something the shard manager should hear about."""

    kind: SmEventKind
    ballot: Ballot
    config: Config | None = None


@dataclass(slots=True)
class Ready:
    promise: PromiseRecord | None = None
    entries: list[Entry] = field(default_factory=list)
    commit_seq: Seq | None = None
    truncate_through: Seq | None = None
    messages: list[Envelope] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    reads_done: list[tuple[int, ServeNow | Refused]] = field(default_factory=list)
    # (peer, up to seq): this replica cannot stream entries a peer needs; send a snapshot.
    snapshot_needed: list[NodeId] = field(default_factory=list)
    sm_events: list[SmEvent] = field(default_factory=list)

    def needs_sync(self) -> bool:
        return bool(self.promise or self.entries or self.truncate_through is not None)

    def is_empty(self) -> bool:
        return not (
            self.needs_sync()
            or self.commit_seq is not None
            or self.messages
            or self.committed
            or self.reads_done
            or self.snapshot_needed
            or self.sm_events
        )
