"""Timing and limits of one replica, and the deliberate bugs the simulator can switch on."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.core.limits import DEFAULT_LIMITS, Limits

# Each name breaks one rule of DESIGN §3 so the checkers can be seen to bite
# (docs/protocols/replication.md lists the invariant each one breaks).
KNOWN_BUGS = frozenset(
    {
        "skip-prepare",
        "reply-before-persist",
        "ignore-lease",
        "stale-epoch-accept",
        "promise-equal-ballot",
        "commit-stale-entry",
        "prev-config-unactivated",
        "noop-below-commit",
        "lease-from-reply",
        "shared-batch-version",
        "serve-before-catchup",
        "no-dedupe",
        "txn-skip-absent",
        "fast-ack-visible",
        "staleness-from-heartbeat",
        "amnesia",
        # The mover proposes Own after the first chunk instead of after the last.
        "move-own-before-catchup",
        # A replica serves reads of a μshard it froze or dropped (PITFALLS 10).
        "moved-source-serves-reads",
        # A primary told of a planned hand-off releases its lease but keeps leading
        # (and serving lease reads) until a Nack deposes it (ADR 0014).
        "release-while-leading",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaParams:
    lease_ms: float = 2000.0
    # Bound on clock-rate error: a local clock runs at a rate within [1-ρ, 1+ρ] of real time.
    drift_bound: float = 0.01
    heartbeat_interval_ms: float = 100.0
    probe_interval_ms: float = 100.0
    # A peer that has not advanced for this long is sent its entries again.
    resend_after_ms: float = 300.0
    read_wait_max_ms: float = 1000.0
    # Replicated garbage collection, proposed by the primary (kv.commands.Gc). Tombstones
    # and transaction snapshots older than this many entries are forgotten; the lag must
    # exceed what the longest transaction and the largest bounded read can fall behind.
    gc_interval_ms: float = 10_000.0
    gc_tombstone_lag_entries: int = 10_000
    # Dedupe entries are kept this long: a client retrying later than this may apply twice.
    dedupe_retention_ms: int = 15 * 60 * 1000
    limits: Limits = DEFAULT_LIMITS
    bugs: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        assert 0 <= self.drift_bound < 0.5
        assert self.bugs <= KNOWN_BUGS, sorted(self.bugs - KNOWN_BUGS)

    @property
    def promise_wait_ms(self) -> float:
        """W = L·(1+ρ)/(1−ρ): after its last lease grant an acceptor waits this long (its own
        clock) before promising a higher ballot, so the grantee's lease has surely ended."""
        return self.lease_ms * (1 + self.drift_bound) / (1 - self.drift_bound)

    def has_bug(self, name: str) -> bool:
        assert name in KNOWN_BUGS, name
        return name in self.bugs
