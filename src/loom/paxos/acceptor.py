"""The acceptor and follower halves of a replica, and the state every role shares.

`Replica` (paxos/replica.py) adds the inputs and the candidate and primary roles. Rules
kept here (DESIGN §3; PITFALLS numbers in brackets):
- a promise needs a ballot strictly above the one promised [13] and waits W after the
  last lease grant, and W after a restart [1, 16]; once a higher Prepare is seen, no more
  grants to lower ballots [1];
- every reply leaves only through `Ready.messages`, after the driver persisted [4];
- a commit notice from ballot b commits only entries held under b [14]; a follower
  commits only entries that arrived in Learn messages.
"""

from __future__ import annotations

import enum

from loom.core.ids import ZERO_BALLOT, Ballot, Incarnation, NodeId, Seq, ShardId
from loom.core.time import Instant
from loom.paxos.durable import DurableState
from loom.paxos.leadership import Leadership
from loom.paxos.messages import (
    Accept,
    Accepted,
    Config,
    Entry,
    Envelope,
    Heartbeat,
    HeartbeatAck,
    Learn,
    LearnAck,
    LeaseRelease,
    Message,
    Nack,
    Prepare,
    Promise,
)
from loom.paxos.params import ReplicaParams
from loom.paxos.reads import ReadQueue
from loom.paxos.ready import PromiseRecord, Ready, RefusalReason, SmEvent, SmEventKind


class Role(enum.Enum):
    ACCEPTOR = "acceptor"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    PRIMARY = "primary"


class AcceptorCore:
    """State of one replica and its acceptor and follower behaviour."""

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
        # The ballot of the last grant (this process's life only: after a restart we do
        # not know whom we granted, so a release is ignored and W is waited out), and the
        # highest ballot whose primary released its lease (no grants to it any more).
        self.last_granted_ballot: Ballot | None = None
        self.released_ballot: Ballot | None = None
        self.pending_prepare: Envelope | None = None
        self.higher_prepare_seen: Ballot | None = None
        self.lead: Leadership | None = None
        self.reads = ReadQueue(params)
        self.ready_out = Ready()
        self.dropped_messages = 0
        self.log_pin: Seq | None = None
        # Followers: every slot up to here arrived in a Learn message (or is committed).
        self.learned_seq = self.commit_seq

    def pin_log(self, seq: Seq | None) -> None:
        """While a snapshot at `seq` is being sent, keep every entry above it."""
        self.log_pin = seq

    def ready(self) -> Ready:
        out, self.ready_out = self.ready_out, Ready()
        return out

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
        released = self.released_ballot
        if released is not None and ballot <= released:
            return False  # a late round of a primary that handed its lease back
        self.last_grant_at = now
        self.last_granted_ballot = ballot
        return True

    def _on_lease_release(self, src: NodeId, msg: LeaseRelease, now: Instant) -> None:
        """The primary of `msg.ballot` stepped down in a planned hand-off and serves
        nothing under that ballot any more: the grants we gave it protect nobody, so a
        successor's Prepare need not wait `W` (DESIGN §3: a planned hand-off releases the
        lease instead of waiting it out). Only the ballot we granted last is released, by
        its own node: a grant to any later ballot keeps its full wait."""
        if src != msg.ballot.node or msg.ballot != self.last_granted_ballot:
            return
        if self.lead is not None and self.lead.ballot == msg.ballot:
            return  # our own ballot while we still lead: cannot be a real release
        self.released_ballot = msg.ballot
        self.last_grant_at = Instant(now - self.p.promise_wait_ms)
        if self.pending_prepare is not None and self._may_promise(now):
            env, self.pending_prepare = self.pending_prepare, None
            self._on_prepare(env, now)

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

    def _append(self, entry: Entry) -> None:
        self.log[entry.seq] = entry
        self.ready_out.entries.append(entry)
        self.last_seq = Seq(max(self.last_seq, entry.seq))

    def _step_down(self, now: Instant) -> None:
        lead = self.lead
        if lead is None:
            return
        self.lead = None
        self.role = Role.ACCEPTOR
        self.reads.fail_all(RefusalReason.NOT_PRIMARY, self.ready_out)
        self._emit_sm(SmEventKind.STEPPED_DOWN, lead.ballot, lead.config)
        del now

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
