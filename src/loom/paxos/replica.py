"""One replica of one p-shard: acceptor always (see paxos/acceptor.py), primary when the
shard manager says so and Phase 1 succeeds, follower when its config lists it as one.

Rules this module keeps (DESIGN §3; PITFALLS numbers in brackets):
- activation reaches a majority of every config since the last activated one [15] and
  adopts with `choose_log` [3]; chosen entries are re-proposed under the new ballot;
- a new primary serves nothing until its adopted entries are committed and applied [2];
- a lease counts from when a round was sent [16]; lease reads read, then re-check;
- a replica never resumes an old ballot of its own after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.ids import Ballot, Epoch, Incarnation, NodeId, Seq
from loom.core.time import Instant
from loom.paxos.acceptor import AcceptorCore, Role
from loom.paxos.activation import Candidacy, choose_log
from loom.paxos.leadership import Leadership, PeerProgress
from loom.paxos.messages import (
    Accept,
    Accepted,
    Config,
    Entry,
    Envelope,
    FreshnessProbe,
    FreshnessReply,
    Heartbeat,
    HeartbeatAck,
    Learn,
    LearnAck,
    LeaseRelease,
    Nack,
    Prepare,
    Promise,
)
from loom.paxos.ready import (
    ProposeOutcome,
    ReadDecision,
    Ready,
    RefusalReason,
    Refused,
    Sequenced,
    ServeNow,
    SmEventKind,
)

__all__ = ["Assignment", "Replica", "Role"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """The shard manager's word: who is primary in which epoch, with which members.

    `prior_configs` are the configs since the last activated one (the candidate must
    reach a majority of each); `activated_epoch` is that last activated epoch.
    """

    epoch: Epoch
    primary: NodeId
    primary_incarnation: Incarnation
    config: Config
    prior_configs: tuple[Config, ...] = ()
    activated_epoch: Epoch = Epoch(0)
    # The incarnation of each member's data directory when it joined: a node whose disk
    # was wiped since is not that member and must ignore this (PITFALLS 19).
    incarnations: tuple[tuple[NodeId, Incarnation], ...] = ()
    # A planned hand-off (balancing, tier move, operator): the primary it replaces is
    # alive and caught up the new one first, and releases its lease on stepping down.
    handoff: bool = False

    @property
    def ballot(self) -> Ballot:
        return Ballot(self.epoch, self.primary, self.primary_incarnation)

    def incarnation_of(self, node: NodeId) -> Incarnation | None:
        return next((i for n, i in self.incarnations if n == node), None)


class Replica(AcceptorCore):
    # ------------------------------------------------------------------ inputs

    def assign(self, assignment: Assignment, now: Instant) -> None:
        config = assignment.config
        self.config = config
        self.primary_hint = assignment.primary
        if assignment.primary != self.node:
            if self.lead is not None and self.lead.ballot < assignment.ballot:
                lead = self.lead
                if assignment.handoff and self.p.has_bug("release-while-leading"):
                    self._release_lease(lead, now)  # still leading: the bug
                    return
                self._step_down(now)
                if assignment.handoff:
                    self._release_lease(lead, now)
            if self.lead is None:
                is_acceptor = self.node in config.acceptors
                self.role = Role.ACCEPTOR if is_acceptor else Role.FOLLOWER
            return
        ballot = assignment.ballot
        if self.lead is not None and self.lead.ballot == ballot:
            return  # a repeated assignment
        stale = not self._outranks_promise(ballot)
        if stale or assignment.primary_incarnation != self.incarnation:
            self._emit_sm(SmEventKind.BALLOT_STALE, ballot, config)
            return
        self._become_candidate(assignment, now)

    def step(self, env: Envelope, now: Instant) -> None:
        msg, src = env.message, env.src
        match msg:
            case Prepare():
                self._on_prepare(env, now)
            case Promise():
                self._on_promise(src, msg, now)
            case Nack():
                self._on_nack(msg, now)
            case Accept():
                self._on_accept(src, msg, now)
            case Accepted():
                self._on_accepted(src, msg, now)
            case Heartbeat():
                self._on_heartbeat(src, msg, now)
            case HeartbeatAck():
                self._on_heartbeat_ack(src, msg, now)
            case Learn():
                self._on_learn(src, msg, now)
            case LearnAck():
                self._on_learn_ack(src, msg, now)
            case FreshnessProbe():
                self._on_probe(src, msg, now)
            case FreshnessReply():
                self.reads.on_probe_reply(msg, now)
            case LeaseRelease():
                self._on_lease_release(src, msg, now)
            case _:
                # Snapshot messages are handled by the host, which owns the state.
                self.dropped_messages += 1
        self._after_input(now)

    def tick(self, now: Instant) -> None:
        if self.pending_prepare is not None and self._may_promise(now):
            env, self.pending_prepare = self.pending_prepare, None
            self._on_prepare(env, now)
        lead = self.lead
        if lead is not None and now >= lead.next_heartbeat_at:
            if lead.candidacy is None:
                self._send_heartbeats(lead, now)
                self._resend_stalled(lead, now)
            else:
                self._prepare(lead, lead.candidacy, now)
        if self.role is not Role.PRIMARY and self.primary_hint is not None:
            probe = self.reads.maybe_probe(now)
            if probe is not None:
                self._send(self.primary_hint, probe)
        self.reads.expire(now, self.ready_out)
        self._after_input(now)

    def propose(self, commands: tuple[bytes, ...], wall_ms: int, now: Instant) -> ProposeOutcome:
        """Sequences one entry. QUORUM writes are acknowledged once it is applied; FAST_ACK
        writes once this Ready has been persisted."""
        lead = self.lead
        if lead is None:
            return Refused(reason=RefusalReason.NOT_PRIMARY, primary_hint=self.primary_hint)
        if not lead.activated:
            return Refused(reason=RefusalReason.NOT_READY, retry_after_ms=50)
        inflight = self.last_seq - self.commit_seq
        if inflight >= self.p.limits.inflight_entries_max:
            return Refused(reason=RefusalReason.OVERLOADED, retry_after_ms=20)
        assert len(commands) <= self.p.limits.commands_per_entry_max
        seq = Seq(self.last_seq + 1)
        self._append(Entry(lead.ballot, seq, wall_ms, lead.ballot.epoch, commands))
        self._replicate(lead, now)
        return Sequenced(seq=seq, ballot=lead.ballot)

    def read(
        self,
        *,
        strong: bool,
        now: Instant,
        bound_ms: float | None = None,
        min_seq: Seq | None = None,
    ) -> ReadDecision:
        """Whether a read may be served now; see ReadQueue for each consistency level."""
        lead = self.lead
        if strong:
            if lead is None or not lead.activated:
                reason = RefusalReason.NOT_PRIMARY if lead is None else RefusalReason.NOT_READY
                return Refused(reason=reason, primary_hint=self.primary_hint, retry_after_ms=50)
            if self.lease_valid(now):
                return ServeNow(lease_read=True)
            decision = self.reads.wait_for_round(lead.round + 1, self.commit_seq, now)
            self._send_heartbeats(lead, now)
            return decision
        if lead is not None and lead.activated and self.lease_valid(now):
            return ServeNow()
        return self.reads.relaxed(
            applied_seq=self.applied_seq, now=now, bound_ms=bound_ms, min_seq=min_seq
        )

    def lease_valid(self, now: Instant) -> bool:
        lead = self.lead
        if lead is None or not lead.activated:
            return False
        seen = self.higher_prepare_seen
        if seen is not None and seen > lead.ballot:
            return False  # our own acceptor no longer grants to us [1]
        return lead.lease_valid(now)

    def advance(self, ready: Ready, now: Instant) -> None:
        """The driver executed `ready`: its entries are durable and `committed` is applied."""
        if ready.committed:
            self.applied_seq = Seq(max(self.applied_seq, ready.committed[-1].seq))
        if ready.truncate_through is not None:
            self.truncated_seq = Seq(max(self.truncated_seq, ready.truncate_through))
        lead = self.lead
        if lead is not None:
            self._advance_commit(lead, now)  # own entries now count; activation may finish
        self.reads.on_applied(self.applied_seq, self.ready_out)
        self._after_input(now)

    def snapshot_installed(self, seq: Seq, ballot: Ballot, now: Instant) -> None:
        """The host installed a snapshot at `seq` (data, dedupe, applied_seq atomically)."""
        # Entries queued for apply but covered by the snapshot must never be applied on top.
        self.ready_out.committed = [e for e in self.ready_out.committed if e.seq > seq]
        for slot in [s for s in self.log if s <= seq]:
            del self.log[slot]
        self.truncated_seq = Seq(max(self.truncated_seq, seq))
        self.applied_seq = Seq(max(self.applied_seq, seq))
        self.commit_seq = Seq(max(self.commit_seq, seq))
        self.last_seq = Seq(max(self.last_seq, seq))
        self.match_seq = Seq(max(self.match_seq, seq))
        del ballot  # recorded by the host with the snapshot
        self.reads.on_applied(self.applied_seq, self.ready_out)
        self._after_input(now)

    # ------------------------------------------------------------------ candidate

    def _become_candidate(self, assignment: Assignment, now: Instant) -> None:
        lead = self.lead
        if lead is not None:
            self._step_down(now)
            if assignment.handoff:
                # A planned change that keeps us primary (a member added or swapped): the
                # old ballot serves nothing from now on, so its lease need not be waited out.
                self._release_lease(lead, now)
        ballot = assignment.ballot
        required = [assignment.config]
        if not self.p.has_bug("prev-config-unactivated"):
            required = [*assignment.prior_configs, assignment.config]
        candidacy = Candidacy(
            ballot=ballot,
            config=assignment.config,
            activated_epoch=assignment.activated_epoch,
            required=required,
            own_commit_seq=self.commit_seq,
        )
        self.lead = Leadership(ballot=ballot, config=assignment.config, candidacy=candidacy)
        self.role = Role.CANDIDATE
        if self.p.has_bug("skip-prepare"):
            self.lead.candidacy = None
            self._start_primary(self.lead, [], now)
            return
        self._prepare(self.lead, candidacy, now)

    def _release_lease(self, lead: Leadership, now: Instant) -> None:
        """After stepping down (so no lease read or freshness answer can use it any
        more): hand the lease of `lead.ballot` back to its acceptors, ourselves included."""
        assert self.lead is None or self.p.has_bug("release-while-leading")
        for node in lead.config.acceptors:
            if node == self.node:
                self._on_lease_release(self.node, LeaseRelease(lead.ballot), now)
            else:
                self._send(node, LeaseRelease(lead.ballot))

    def _prepare(self, lead: Leadership, candidacy: Candidacy, now: Instant) -> None:
        """(Re)sends Prepare to every required acceptor that has not promised yet."""
        for node in candidacy.targets():
            if node not in candidacy.promises:
                self._send(node, Prepare(lead.ballot, lead.config, candidacy.own_commit_seq))
        lead.next_heartbeat_at = Instant(now + self.p.resend_after_ms)

    def _on_promise(self, src: NodeId, msg: Promise, now: Instant) -> None:
        lead = self.lead
        if lead is None or lead.candidacy is None or msg.ballot != lead.ballot:
            return
        candidacy = lead.candidacy
        follow = not self.p.has_bug("prev-config-unactivated")
        for node in candidacy.add(src, msg, follow_prior_configs=follow):
            self._send(node, Prepare(lead.ballot, lead.config, candidacy.own_commit_seq))
        if not candidacy.has_quorum():
            return
        chosen = choose_log(
            candidacy,
            own_entries=self.log,
            noop_below_commit_bug=self.p.has_bug("noop-below-commit"),
        )
        if chosen is None:
            self._emit_sm(SmEventKind.ACTIVATION_FAILED, lead.ballot, lead.config)
            self._step_down(now)
            return
        lead.candidacy = None
        self._start_primary(lead, chosen, now)

    def _start_primary(self, lead: Leadership, chosen: list[Entry], now: Instant) -> None:
        if not self._adopt_ballot(lead.ballot, now):
            self._step_down(now)  # we promised a higher ballot meanwhile
            return
        for entry in chosen:
            self._append(entry)
        for slot in [s for s in self.log if s > (chosen[-1].seq if chosen else self.commit_seq)]:
            del self.log[slot]  # unchosen leftovers beyond the adopted log
        self.last_seq = Seq(max([self.truncated_seq, self.commit_seq, *self.log]))
        # A no-op in our own ballot: committing it commits everything before it.
        seq = Seq(self.last_seq + 1)
        self._append(Entry(lead.ballot, seq, 0, lead.ballot.epoch, ()))
        lead.activation_target = seq
        self.role = Role.PRIMARY
        self.primary_hint = self.node
        self.match_ballot = lead.ballot
        self.match_seq = self.commit_seq
        for node in lead.config.acceptors:
            if node != self.node:
                lead.peers[node] = PeerProgress(
                    next_seq=Seq(self.commit_seq + 1), last_progress_at=now
                )
        for node in lead.config.followers:
            lead.learners[node] = PeerProgress(
                next_seq=Seq(self.applied_seq + 1), last_progress_at=now
            )
        if self.p.has_bug("serve-before-catchup"):
            lead.activated = True
        self._send_heartbeats(lead, now)
        self._replicate(lead, now)

    # ------------------------------------------------------------------ primary

    def _replicate(self, lead: Leadership, now: Instant) -> None:
        if lead.candidacy is not None:
            return
        batch_max = self.p.limits.accept_entries_per_message_max
        window = self.p.limits.inflight_entries_max
        for node, peer in sorted(lead.peers.items()):
            while peer.next_seq <= self.last_seq and peer.next_seq <= peer.match_seq + window:
                if peer.next_seq <= self.truncated_seq:
                    self.ready_out.snapshot_needed.append(node)
                    break
                end = min(self.last_seq, peer.next_seq + batch_max - 1)
                # Entries at or below our activation point are chosen but may carry older
                # ballots here; sending them under ours is a proposal of the chosen value.
                entries = tuple(
                    _under(self.log[Seq(s)], lead.ballot) for s in range(peer.next_seq, end + 1)
                )
                round_ = lead.start_round(now)
                self._grant(lead.ballot, now)  # our own acceptor grants with every round
                self._send(node, Accept(lead.ballot, entries, self.commit_seq, round_))
                peer.next_seq = Seq(end + 1)
        self._stream_to_learners(lead)

    def _stream_to_learners(self, lead: Leadership) -> None:
        batch_max = self.p.limits.accept_entries_per_message_max
        for node, learner in sorted(lead.learners.items()):
            if learner.next_seq > self.commit_seq:
                continue
            if learner.next_seq <= self.truncated_seq:
                self.ready_out.snapshot_needed.append(node)
                continue
            end = min(self.commit_seq, learner.next_seq + batch_max - 1)
            entries = tuple(self.log[Seq(s)] for s in range(learner.next_seq, end + 1))
            self._send(node, Learn(lead.ballot, entries, self.commit_seq))
            learner.next_seq = Seq(end + 1)

    def _send_heartbeats(self, lead: Leadership, now: Instant) -> None:
        if lead.candidacy is not None:
            return
        round_ = lead.start_round(now)
        self._grant(lead.ballot, now)
        for node in sorted(lead.peers):
            self._send(node, Heartbeat(lead.ballot, self.commit_seq, round_))
        for node in sorted(lead.learners):
            self._send(node, Learn(lead.ballot, (), self.commit_seq))
        lead.next_heartbeat_at = Instant(now + self.p.heartbeat_interval_ms)

    def _resend_stalled(self, lead: Leadership, now: Instant) -> None:
        for peer in lead.peers.values():
            stalled = now - peer.last_progress_at >= self.p.resend_after_ms
            if peer.match_seq < self.last_seq and stalled:
                peer.next_seq = Seq(peer.match_seq + 1)
                peer.last_progress_at = now
        for learner in lead.learners.values():
            if now - learner.last_progress_at >= self.p.resend_after_ms:
                learner.next_seq = Seq(min(learner.next_seq, learner.match_seq + 1))
                learner.last_progress_at = now
        self._replicate(lead, now)

    def _credit(self, src: NodeId, reply: Accepted | HeartbeatAck, now: Instant) -> None:
        lead = self.lead
        if lead is None or reply.ballot != lead.ballot or lead.candidacy is not None:
            return
        match = reply.match_seq
        lead.credit(
            src,
            round_=reply.round,
            granted=reply.lease_granted,
            match_seq=match,
            now=now,
            lease_ms=self.p.lease_ms,
            lease_from_reply_bug=self.p.has_bug("lease-from-reply"),
        )
        peer = lead.peers.get(src)
        lagging = peer is not None and match < peer.next_seq - 1 and match < self.last_seq
        # The peer misses entries (lost, or it restarted): send from its match point.
        if (
            peer is not None
            and lagging
            and now - peer.last_progress_at >= self.p.resend_after_ms / 4
        ):
            peer.next_seq = Seq(match + 1)
            peer.last_progress_at = now
        self._advance_commit(lead, now)
        self.reads.on_round_confirmed(lead.confirmed_round(), self.ready_out)
        self._replicate(lead, now)

    def _on_accepted(self, src: NodeId, msg: Accepted, now: Instant) -> None:
        self._credit(src, msg, now)

    def _on_heartbeat_ack(self, src: NodeId, msg: HeartbeatAck, now: Instant) -> None:
        self._credit(src, msg, now)

    def _advance_commit(self, lead: Leadership, now: Instant) -> None:
        if lead.candidacy is not None:
            return
        # Our own entries count once the driver persisted them (advance() was called).
        own_match = self.last_seq if not self.ready_out.entries else self._persisted_match()
        point = lead.commit_point(own_match)
        entry = self.log.get(point)
        if point > self.commit_seq and entry is not None and entry.ballot == lead.ballot:
            self._commit_to(point)
            self._stream_to_learners(lead)
        target = lead.activation_target
        if not lead.activated and self.applied_seq >= target and self.commit_seq >= target:
            lead.activated = True
            self._emit_sm(SmEventKind.ACTIVATED, lead.ballot, lead.config)
        del now

    def _persisted_match(self) -> Seq:
        unpersisted = min(e.seq for e in self.ready_out.entries)
        return Seq(unpersisted - 1)

    def _on_nack(self, msg: Nack, now: Instant) -> None:
        lead = self.lead
        if lead is not None and msg.ballot == lead.ballot and msg.promised > lead.ballot:
            self._step_down(now)

    def _on_learn_ack(self, src: NodeId, msg: LearnAck, now: Instant) -> None:
        lead = self.lead
        if lead is None or msg.ballot != lead.ballot:
            return
        learner = lead.learners.get(src)
        if learner is None:
            return
        if msg.held_seq > learner.match_seq:
            learner.match_seq = msg.held_seq
            learner.last_progress_at = now
        if msg.held_seq < learner.next_seq - 1 and now - learner.last_progress_at > 100:
            learner.next_seq = Seq(msg.held_seq + 1)
        self._stream_to_learners(lead)

    def _on_probe(self, src: NodeId, msg: FreshnessProbe, now: Instant) -> None:
        lead = self.lead
        if lead is not None and self.lease_valid(now):
            self._send(src, FreshnessReply(msg.probe, self.commit_seq, lead.ballot))


def _under(entry: Entry, ballot: Ballot) -> Entry:
    if entry.ballot == ballot:
        return entry
    return Entry(ballot, entry.seq, entry.wall_ms, entry.epoch, entry.commands)
