"""The figures of `loom bench functions`, one set per system (loom, and the peer).

Both sides compute them with `CallsFigures.from_times`, from the same kind of samples,
so the definitions below hold for loom and for the peer alike:

- submitted_per_s = calls / submit phase, the time from the first submit call starting
  to the last one acknowledged (by the broker, or by loom's QUORUM write).
- completed_per_s = calls completed / run, the time from the first submit call starting
  to the last completion.
- latency of one call = its completion time − its submit time, where the submit time is
  when its submit call started and the completion time is when the no-op finished in
  the worker, as the worker recorded it. p50_ms and p99_ms are nearest-rank percentiles
  of the completed calls' latencies (None when no call completed).
- lost = submitted calls not completed within the run's timeout.

Rules of this module:
- Pure arithmetic on the samples it is given: no clock, no IO. The caller reads the
  clocks; submit and completion times of one call must come from the same clock (on
  one machine: the wall clock, as the worker runs in another process).
- Inconsistent samples (a completion before its submit, a negative duration) are the
  measurer's own bug: they fail an assertion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MS_PER_S = 1000.0
PERCENT = 100.0


def nearest_rank(sorted_values: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile: the smallest value with at least `percent` % of the
    values at or below it."""
    assert sorted_values
    assert 0.0 < percent <= PERCENT
    rank = math.ceil(percent / PERCENT * len(sorted_values))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class CallsFigures:
    """What one system did with `calls` no-op calls (definitions: module docstring)."""

    calls: int
    submitted_per_s: float
    completed_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    lost: int

    @property
    def completed(self) -> int:
        return self.calls - self.lost

    @classmethod
    def from_times(
        cls,
        *,
        submitted_at_s: Sequence[float],
        completed_at_s: Sequence[float | None],
        submit_s: float,
        run_s: float | None = None,
    ) -> CallsFigures:
        """Figures from per-call times in seconds on one clock: `submitted_at_s[i]` when
        call i's submit started, `completed_at_s[i]` when it finished in a worker (None:
        not completed in time, so lost); `submit_s` the submit phase. `run_s` (first
        submit to last completion) defaults to what the samples say."""
        calls = len(submitted_at_s)
        assert calls > 0
        assert len(completed_at_s) == calls
        assert submit_s > 0.0
        latencies_s: list[float] = []
        for submitted, completed in zip(submitted_at_s, completed_at_s, strict=True):
            if completed is not None:
                # The worker's stamp and the submitter's are read from the same clock in
                # different processes; a completion before its submit is a broken clock.
                assert completed >= submitted, (submitted, completed)
                latencies_s.append(completed - submitted)
        latencies_s.sort()
        if run_s is None and latencies_s:
            last = max(c for c in completed_at_s if c is not None)
            run_s = last - min(submitted_at_s)
        if not latencies_s:
            return cls(
                calls=calls,
                submitted_per_s=calls / submit_s,
                completed_per_s=0.0,
                p50_ms=None,
                p99_ms=None,
                lost=calls,
            )
        assert run_s is not None
        assert run_s > 0.0
        return cls(
            calls=calls,
            submitted_per_s=calls / submit_s,
            completed_per_s=len(latencies_s) / run_s,
            p50_ms=nearest_rank(latencies_s, 50.0) * MS_PER_S,
            p99_ms=nearest_rank(latencies_s, 99.0) * MS_PER_S,
            lost=calls - len(latencies_s),
        )

    def to_json(self) -> dict[str, object]:
        """The per-system object of `loom bench functions --json` (`calls` is reported
        once, beside the two systems)."""
        return {
            "submitted_per_s": round(self.submitted_per_s, 1),
            "completed_per_s": round(self.completed_per_s, 1),
            "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 3),
            "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 3),
            "lost": self.lost,
        }
