"""When a replica may serve a read, for every consistency level (DESIGN §3, §5).

- STRONG at a primary without a lease waits for a confirmation round sent *after* the
  read arrived, then for apply to reach the commit point it had on arrival.
- bounded(ms) needs a freshness proof: a probe answered by a lease-holding primary,
  timed from when the probe was *sent* on this replica's own monotonic clock (PITFALLS 6).
  The bound is shrunk by the drift bound so local time never overstates freshness.
- READ_YOUR_WRITES waits (bounded) until apply reaches the client's version.
Every wait has a deadline and a maximum count; past them the read is refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from loom.core.ids import Seq
from loom.core.time import Instant
from loom.paxos.messages import FreshnessProbe, FreshnessReply
from loom.paxos.params import ReplicaParams
from loom.paxos.ready import ReadDecision, ReadPending, Ready, RefusalReason, Refused, ServeNow

PROBES_OUTSTANDING_MAX = 64


class _Kind(enum.Enum):
    CONFIRM = "confirm"
    BOUNDED = "bounded"
    MIN_SEQ = "min_seq"


@dataclass(slots=True, kw_only=True)
class _PendingRead:
    kind: _Kind
    deadline: Instant
    round_needed: int = 0
    confirmed: bool = False
    read_index: Seq = Seq(0)
    bound_ms: float = 0.0


class ReadQueue:
    def __init__(self, params: ReplicaParams) -> None:
        self.p = params
        self.pending: dict[int, _PendingRead] = {}
        self.next_token = 1
        self.applied_seq = Seq(0)
        self.probes_sent: dict[int, Instant] = {}
        self.next_probe_id = 1
        self.next_probe_at = Instant(float("-inf"))
        # Freshness proof: state committed up to `fresh_commit` as of local time `fresh_at`.
        self.fresh_at = Instant(float("-inf"))
        self.fresh_commit = Seq(0)

    # -- decisions

    def wait_for_round(self, round_needed: int, read_index: Seq, now: Instant) -> ReadDecision:
        return self._park(
            _PendingRead(
                kind=_Kind.CONFIRM,
                deadline=Instant(now + self.p.read_wait_max_ms),
                round_needed=round_needed,
                read_index=read_index,
            )
        )

    def relaxed(
        self, *, applied_seq: Seq, now: Instant, bound_ms: float | None, min_seq: Seq | None
    ) -> ReadDecision:
        self.applied_seq = applied_seq
        if bound_ms is not None:
            if self._is_fresh(bound_ms, now):
                return ServeNow()
            self.next_probe_at = now  # ask for a proof at the next tick
            wait = min(self.p.read_wait_max_ms, bound_ms)
            return self._park(
                _PendingRead(kind=_Kind.BOUNDED, deadline=Instant(now + wait), bound_ms=bound_ms)
            )
        if min_seq is not None and applied_seq < min_seq:
            return self._park(
                _PendingRead(
                    kind=_Kind.MIN_SEQ,
                    deadline=Instant(now + self.p.read_wait_max_ms),
                    read_index=min_seq,
                )
            )
        return ServeNow()

    def _park(self, read: _PendingRead) -> ReadDecision:
        if len(self.pending) >= self.p.limits.pending_reads_max:
            return Refused(reason=RefusalReason.OVERLOADED, retry_after_ms=20)
        token = self.next_token
        self.next_token += 1
        self.pending[token] = read
        return ReadPending(token=token)

    def _is_fresh(self, bound_ms: float, now: Instant) -> bool:
        local_bound = bound_ms * (1 - self.p.drift_bound)
        return self.fresh_at >= now - local_bound and self.applied_seq >= self.fresh_commit

    # -- events

    def maybe_probe(self, now: Instant) -> FreshnessProbe | None:
        if now < self.next_probe_at:
            return None
        self.next_probe_at = Instant(now + self.p.probe_interval_ms)
        probe = self.next_probe_id
        self.next_probe_id += 1
        self.probes_sent[probe] = now
        if len(self.probes_sent) > PROBES_OUTSTANDING_MAX:
            del self.probes_sent[min(self.probes_sent)]
        return FreshnessProbe(probe)

    def on_probe_reply(self, msg: FreshnessReply, now: Instant) -> None:
        sent_at = self.probes_sent.pop(msg.probe, None)
        if sent_at is None or sent_at < self.fresh_at:
            return
        self.fresh_at = sent_at
        self.fresh_commit = msg.commit_seq
        del now

    def on_heartbeat_bug(self, commit_seq: Seq, now: Instant) -> None:
        """Deliberate bug `staleness-from-heartbeat`: a one-way message taken as proof."""
        self.fresh_at = now
        self.fresh_commit = commit_seq

    def on_round_confirmed(self, confirmed_round: int, out: Ready) -> None:
        for read in self.pending.values():
            if read.kind is _Kind.CONFIRM and read.round_needed <= confirmed_round:
                read.confirmed = True
        self._settle(out, None)

    def on_applied(self, applied_seq: Seq, out: Ready) -> None:
        self.applied_seq = applied_seq
        self._settle(out, None)

    def expire(self, now: Instant, out: Ready) -> None:
        self._settle(out, now)

    def fail_all(self, reason: RefusalReason, out: Ready) -> None:
        for token in sorted(self.pending):
            out.reads_done.append((token, Refused(reason=reason, retry_after_ms=50)))
        self.pending.clear()

    def _settle(self, out: Ready, now: Instant | None) -> None:
        for token in sorted(self.pending):
            read = self.pending[token]
            if self._is_ready(read, now):
                out.reads_done.append((token, ServeNow()))
                del self.pending[token]
            elif now is not None and now >= read.deadline:
                reason = RefusalReason.TOO_STALE
                if read.kind is _Kind.CONFIRM:
                    reason = RefusalReason.TIMEOUT
                out.reads_done.append((token, Refused(reason=reason, retry_after_ms=50)))
                del self.pending[token]

    def _is_ready(self, read: _PendingRead, now: Instant | None) -> bool:
        match read.kind:
            case _Kind.CONFIRM:
                return read.confirmed and self.applied_seq >= read.read_index
            case _Kind.MIN_SEQ:
                return self.applied_seq >= read.read_index
            case _Kind.BOUNDED:
                return now is not None and self._is_fresh(read.bound_ms, now)
