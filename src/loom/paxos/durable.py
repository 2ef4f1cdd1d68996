"""The state an acceptor keeps on disk, as the replica is rebuilt from it after a restart."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.core.ids import ZERO_BALLOT, Ballot, Seq
from loom.paxos.messages import Entry
from loom.paxos.ready import PromiseRecord


@dataclass(slots=True, kw_only=True)
class DurableState:
    promise: PromiseRecord = field(
        default_factory=lambda: PromiseRecord(ballot=ZERO_BALLOT, config=None, prior_config=None)
    )
    entries: dict[Seq, Entry] = field(default_factory=dict)
    commit_seq: Seq = Seq(0)
    # Data and applied_seq are written in one atomic batch, so this is exact.
    applied_seq: Seq = Seq(0)
    # Entries at or below this are gone from the log (covered by the applied state).
    truncated_seq: Seq = Seq(0)
    truncated_ballot: Ballot = ZERO_BALLOT

    def is_empty(self) -> bool:
        """Nothing was ever stored for this shard on this disk."""
        return (
            self.promise.ballot == ZERO_BALLOT
            and not self.entries
            and self.applied_seq == 0
            and self.truncated_seq == 0
        )
