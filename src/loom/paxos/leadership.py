"""The primary's view of its peers: replication progress, lease grants, confirmation rounds.

Lease arithmetic (DESIGN §3, PITFALLS 16): a grant in answer to round r counts from
when r was *sent*, on the primary's own clock; the lease holds while a majority of the
config's acceptors have grants younger than L. The primary's own acceptor is one of
them: it grants with every round it sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.core.ids import Ballot, NodeId, Seq
from loom.core.time import Instant
from loom.paxos.activation import Candidacy
from loom.paxos.messages import Config

ROUNDS_REMEMBERED_MAX = 4096


@dataclass(slots=True, kw_only=True)
class PeerProgress:
    next_seq: Seq
    match_seq: Seq = Seq(0)
    last_progress_at: Instant = Instant(0.0)
    lease_until: float = float("-inf")
    acked_round: int = -1


@dataclass(slots=True, kw_only=True)
class Leadership:
    ballot: Ballot
    config: Config
    candidacy: Candidacy | None
    activated: bool = False
    # Activation completes once every entry up to here is committed and applied.
    activation_target: Seq = Seq(0)
    peers: dict[NodeId, PeerProgress] = field(default_factory=dict)
    learners: dict[NodeId, PeerProgress] = field(default_factory=dict)
    round: int = 0
    round_sent_at: dict[int, Instant] = field(default_factory=dict)
    next_heartbeat_at: Instant = Instant(0.0)

    def start_round(self, now: Instant) -> int:
        self.round += 1
        self.round_sent_at[self.round] = now
        if len(self.round_sent_at) > ROUNDS_REMEMBERED_MAX:
            del self.round_sent_at[min(self.round_sent_at)]
        return self.round

    def credit(
        self,
        node: NodeId,
        *,
        round_: int,
        granted: bool,
        match_seq: Seq,
        now: Instant,
        lease_ms: float,
        lease_from_reply_bug: bool,
    ) -> None:
        peer = self.peers.get(node)
        if peer is None:
            return
        if match_seq > peer.match_seq:
            peer.match_seq = match_seq
            peer.last_progress_at = now
        peer.next_seq = Seq(max(peer.next_seq, peer.match_seq + 1))
        peer.acked_round = max(peer.acked_round, round_)
        sent_at = self.round_sent_at.get(round_)
        if granted and sent_at is not None:
            start = now if lease_from_reply_bug else sent_at
            peer.lease_until = max(peer.lease_until, start + lease_ms)

    def quorum_value(self, values: dict[NodeId, float]) -> float:
        """The highest value a majority of acceptors has reached."""
        ordered = sorted(
            (values.get(n, float("-inf")) for n in self.config.acceptors), reverse=True
        )
        return ordered[self.config.majority() - 1]

    def commit_point(self, own_match: Seq) -> Seq:
        values = {node: float(peer.match_seq) for node, peer in self.peers.items()}
        return Seq(int(self.quorum_value(values | {self.ballot.node: float(own_match)})))

    def lease_valid(self, now: Instant) -> bool:
        values = {node: peer.lease_until for node, peer in self.peers.items()}
        return self.quorum_value(values | {self.ballot.node: float("inf")}) > now

    def confirmed_round(self) -> int:
        values = {node: float(peer.acked_round) for node, peer in self.peers.items()}
        return int(self.quorum_value(values | {self.ballot.node: float(self.round)}))
