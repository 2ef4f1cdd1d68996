"""One replica of one p-shard: acceptor always, primary when the shard manager says so and
Phase 1 succeeds, follower (learner) when its config lists it as one.

Rules this module keeps (DESIGN §3; PITFALLS numbers in brackets):
- a promise needs a ballot strictly above the one promised [13] and waits W after the
  last lease grant, and W after a restart [1, 16]; once a higher Prepare is seen, no more
  grants to lower ballots [1];
- every reply leaves only through `Ready.messages`, after the driver persisted [4];
- a commit notice from ballot b commits only entries held under b [14];
- a new primary serves nothing until its adopted entries are committed and applied [2];
- a replica never resumes an old ballot of its own after a restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from loom.core.ids import ZERO_BALLOT, Ballot, Epoch, Incarnation, NodeId, Seq, ShardId
from loom.core.time import Instant
from loom.paxos.activation import Candidacy, choose_log
from loom.paxos.durable import DurableState
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
    Message,
    Nack,
    Prepare,
    Promise,
)
from loom.paxos.params import ReplicaParams
from loom.paxos.reads import ReadQueue
from loom.paxos.ready import (
    PromiseRecord,
    ProposeOutcome,
    ReadDecision,
    Ready,
    RefusalReason,
    Refused,
    Sequenced,
    ServeNow,
    SmEvent,
    SmEventKind,
)


class Role(enum.Enum):
    ACCEPTOR = "acceptor"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    PRIMARY = "primary"


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

    @property
    def ballot(self) -> Ballot:
        return Ballot(self.epoch, self.primary, self.primary_incarnation)


class Replica:
    def __init__(
        self,
        *,
        shard: ShardId,
        node: NodeId,
        incarnation: Incarnation,
        durable: DurableState,
        now: Instant,
        params: ReplicaParams,
    ) -> None:
        self.shard = shard
        self.node = node
        self.incarnation = incarnation
        self.p = params
        self.promise = durable.promise
        self.log: dict[Seq, Entry] = dict(durable.entries)
        self.commit_seq = max(durable.commit_seq, durable.truncated_seq)
        self.applied_seq = durable.applied_seq
        self.truncated_seq = durable.truncated_seq
        assert self.applied_seq >= self.truncated_seq
        self.last_seq = Seq(max([self.truncated_seq, self.applied_seq, *self.log]))
        self.role = Role.ACCEPTOR
        self.config: Config | None = durable.promise.config
        self.primary_hint: NodeId | None = None
        self.match_ballot = ZERO_BALLOT
        self.match_seq = Seq(0)
        # A restarted acceptor may have granted a lease it no longer remembers [16].
        self.last_grant_at = now
        self.pending_prepare: Envelope | None = None
        self.higher_prepare_seen: Ballot | None = None
        self.lead: Leadership | None = None
        self.reads = ReadQueue(params)
        self.ready_out = Ready()
        self.dropped_messages = 0
        self.log_pin: Seq | None = None
        # Followers: every slot up to here arrived in a Learn message (or is committed).
        self.learned_seq = self.commit_seq

    # ------------------------------------------------------------------ inputs

    def assign(self, assignment: Assignment, now: Instant) -> None:
        config = assignment.config
        self.config = config
        self.primary_hint = assignment.primary
        if assignment.primary != self.node:
            if self.lead is not None and self.lead.ballot < assignment.ballot:
                self._step_down(now)
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

    def pin_log(self, seq: Seq | None) -> None:
        """While a snapshot at `seq` is being sent, keep every entry above it."""
        self.log_pin = seq

    def ready(self) -> Ready:
        out, self.ready_out = self.ready_out, Ready()
        return out

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

    # ------------------------------------------------------------------ acceptor

    def _may_promise(self, now: Instant) -> bool:
        if self.p.has_bug("ignore-lease"):
            return True
        return now >= self.last_grant_at + self.p.promise_wait_ms

    def _outranks_promise(self, ballot: Ballot) -> bool:
        if self.p.has_bug("promise-equal-ballot"):
            return ballot.epoch >= self.promise.ballot.epoch and ballot != self.promise.ballot
        return ballot > self.promise.ballot

    def _on_prepare(self, env: Envelope, now: Instant) -> None:
        msg = env.message
        assert isinstance(msg, Prepare)
        if msg.ballot == self.promise.ballot:
            self._send_promise(env.src, msg)  # a retransmitted Prepare: same answer
            return
        if not self._outranks_promise(msg.ballot):
            self._send(env.src, Nack(msg.ballot, self.promise.ballot))
            return
        if self.higher_prepare_seen is None or msg.ballot > self.higher_prepare_seen:
            self.higher_prepare_seen = msg.ballot
        if not self._may_promise(now):
            pending = self.pending_prepare
            if pending is None or _ballot_of(pending) < msg.ballot:
                self.pending_prepare = env
            return
        prior = self.promise.config
        self._set_promise(PromiseRecord(ballot=msg.ballot, config=msg.config, prior_config=prior))
        if self.lead is not None and self.lead.ballot < msg.ballot:
            self._step_down(now)
        self.primary_hint = msg.ballot.node
        self._send_promise(env.src, msg)

    def _send_promise(self, dst: NodeId, msg: Prepare) -> None:
        floor = max(msg.commit_seq, self.truncated_seq)
        entries = tuple(self.log[s] for s in sorted(self.log) if s > floor)
        promise = Promise(
            msg.ballot,
            self.commit_seq,
            self.truncated_seq,
            self.promise.prior_config,
            entries,
            self.incarnation,
        )
        self._send(dst, promise)

    def _set_promise(self, record: PromiseRecord) -> None:
        self.promise = record
        self.ready_out.promise = record
        if record.config is not None:
            self.config = record.config

    def _adopt_ballot(self, ballot: Ballot, now: Instant) -> bool:
        """An Accept or Heartbeat from `ballot`: refuse it if below the promise, else
        promise it too (its sender already holds a majority of promises)."""
        if ballot < self.promise.ballot and not self.p.has_bug("stale-epoch-accept"):
            return False
        if ballot > self.promise.ballot:
            # An Accept carries no config: keep what we know, so a later Promise still
            # reveals the configs this acceptor saw (PITFALLS 15).
            self._set_promise(
                PromiseRecord(
                    ballot=ballot,
                    config=self.promise.config,
                    prior_config=self.promise.prior_config,
                )
            )
            if self.lead is not None and self.lead.ballot < ballot:
                self._step_down(now)
        if self.lead is None:
            self.primary_hint = ballot.node
        if self.match_ballot != ballot:
            self.match_ballot = ballot
            self.match_seq = self.commit_seq
        return True

    def _grant(self, ballot: Ballot, now: Instant) -> bool:
        seen = self.higher_prepare_seen
        if seen is not None and seen > ballot:
            return False  # stop extending leases of lower ballots [1]
        self.last_grant_at = now
        return True

    def _on_accept(self, src: NodeId, msg: Accept, now: Instant) -> None:
        if not self._adopt_ballot(msg.ballot, now):
            self._send(src, Nack(msg.ballot, self.promise.ballot))
            return
        for entry in msg.entries:
            if entry.seq <= self.commit_seq or entry.seq <= self.truncated_seq:
                continue  # already chosen here; the value cannot differ
            held = self.log.get(entry.seq)
            if held is None or held.ballot != entry.ballot or held != entry:
                self._append(entry)
        self._extend_match()
        self._learn_commit(msg.ballot, msg.commit_seq)
        granted = self._grant(msg.ballot, now)
        reply = Accepted(msg.ballot, self.match_seq, msg.round, granted, self.commit_seq)
        self._send(src, reply)

    def _on_heartbeat(self, src: NodeId, msg: Heartbeat, now: Instant) -> None:
        if not self._adopt_ballot(msg.ballot, now):
            self._send(src, Nack(msg.ballot, self.promise.ballot))
            return
        self._extend_match()
        self._learn_commit(msg.ballot, msg.commit_seq)
        if self.p.has_bug("staleness-from-heartbeat"):
            self.reads.on_heartbeat_bug(self.commit_seq, now)
        granted = self._grant(msg.ballot, now)
        self._send(src, HeartbeatAck(msg.ballot, msg.round, granted, self.match_seq))

    def _extend_match(self) -> None:
        # Committed slots hold chosen values, whatever ballot they arrived under.
        self.match_seq = Seq(max(self.match_seq, self.commit_seq))
        while True:
            nxt = self.log.get(Seq(self.match_seq + 1))
            if nxt is None or nxt.ballot != self.match_ballot:
                return
            self.match_seq = nxt.seq

    def _learn_commit(self, ballot: Ballot, commit_seq: Seq) -> None:
        """Commit only entries held under the sender's ballot [14]."""
        if self.p.has_bug("commit-stale-entry"):
            held = self.commit_seq
            while held < commit_seq and Seq(held + 1) in self.log:
                held = Seq(held + 1)
            self._commit_to(held)
            return
        if ballot == self.match_ballot:
            self._commit_to(Seq(min(commit_seq, self.match_seq)))

    def _commit_to(self, seq: Seq) -> None:
        if seq > self.commit_seq:
            self.commit_seq = seq
            self.ready_out.commit_seq = seq

    # ------------------------------------------------------------------ candidate

    def _become_candidate(self, assignment: Assignment, now: Instant) -> None:
        if self.lead is not None:
            self._step_down(now)
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

    def _append(self, entry: Entry) -> None:
        self.log[entry.seq] = entry
        self.ready_out.entries.append(entry)
        self.last_seq = Seq(max(self.last_seq, entry.seq))

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

    def _step_down(self, now: Instant) -> None:
        lead = self.lead
        if lead is None:
            return
        self.lead = None
        self.role = Role.ACCEPTOR
        self.reads.fail_all(RefusalReason.NOT_PRIMARY, self.ready_out)
        self._emit_sm(SmEventKind.STEPPED_DOWN, lead.ballot, lead.config)
        del now

    # ------------------------------------------------------------------ followers

    def _on_learn(self, src: NodeId, msg: Learn, now: Instant) -> None:
        """Committed entries from a primary, taken strictly in order. Only entries that
        arrived in Learn messages are committed: a stale value this replica accepted
        long ago as an acceptor must never be committed by a bare commit point [14]."""
        if self.lead is None:
            self.primary_hint = msg.ballot.node
        self.learned_seq = Seq(max(self.learned_seq, self.commit_seq))
        for entry in msg.entries:
            if entry.seq != self.learned_seq + 1 or entry.seq > msg.commit_seq:
                continue
            if self.log.get(entry.seq) != entry:
                self._append(entry)
            self.learned_seq = entry.seq
        self._commit_to(Seq(min(self.learned_seq, msg.commit_seq)))
        if self.p.has_bug("staleness-from-heartbeat"):
            self.reads.on_heartbeat_bug(msg.commit_seq, now)
        self._send(src, LearnAck(msg.ballot, self.applied_seq, self.learned_seq))

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

    # ------------------------------------------------------------------ plumbing

    def _after_input(self, now: Instant) -> None:
        """Queue the committed entries not yet handed to the driver for apply."""
        applied_or_queued = self.applied_seq
        if self.ready_out.committed:
            applied_or_queued = self.ready_out.committed[-1].seq
        limit = self.commit_seq
        lead = self.lead
        if lead is not None and self.p.has_bug("fast-ack-visible"):
            limit = self.last_seq  # deliberate bug: the primary applies before commit
        seq = applied_or_queued + 1
        while seq <= limit:
            entry = self.log.get(Seq(seq))
            if entry is None:
                break
            self.ready_out.committed.append(entry)
            seq += 1
        self._maybe_truncate()
        del now

    def _maybe_truncate(self) -> None:
        retain = self.p.limits.log_retained_entries_max
        target = self.applied_seq - retain
        if self.log_pin is not None:
            target = min(target, self.log_pin)
        if target > self.truncated_seq + retain // 4:
            for slot in [s for s in self.log if s <= target]:
                del self.log[slot]
            # At once, not at advance(): more input may arrive before the next Ready, and
            # what is gone from memory must be streamed by snapshot from now on.
            self.truncated_seq = Seq(target)
            self.ready_out.truncate_through = Seq(target)

    def _send(self, dst: NodeId, message: Message) -> None:
        self.ready_out.messages.append(Envelope(self.shard, self.node, dst, message))

    def _emit_sm(self, kind: SmEventKind, ballot: Ballot, config: Config | None) -> None:
        self.ready_out.sm_events.append(SmEvent(kind=kind, ballot=ballot, config=config))


def _ballot_of(env: Envelope) -> Ballot:
    msg = env.message
    assert isinstance(msg, Prepare)
    return msg.ballot


def _under(entry: Entry, ballot: Ballot) -> Entry:
    if entry.ballot == ballot:
        return entry
    return Entry(ballot, entry.seq, entry.wall_ms, entry.epoch, entry.commands)
