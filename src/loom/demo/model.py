"""What the demo measures and reports: the data the live view, the summary, the HTML
report and `--json` are made from. Plain data (msgspec structs), so a run's report can
be saved and rendered again."""

from __future__ import annotations

import msgspec


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """One second of the run (rates over the second before `t_s`)."""

    t_s: float  # seconds since the launch started
    signups_per_s: float
    kv_ops_per_s: float  # the app's kv requests that succeeded
    calls_completed_per_s: float  # function calls that finished
    queue_depth: int  # calls queued or running
    throttled_per_s: float  # kv requests throttled by a quota
    p50_ms: float | None  # the app's kv request latency
    p99_ms: float | None
    other_p99_ms: float | None  # the other product's kv request latency
    controller_rates: dict[str, float] = {}  # downstream → AIMD dispatch rate (calls/s)


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Something done to the system during the run (a marker on every plot)."""

    t_s: float
    label: str  # e.g. "reshard threads_graph 2 → 8", "SIGKILL n2", "restart n2"


class Check(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # e.g. "every follow edge copied exactly once"
    passed: bool
    detail: str  # what was counted, e.g. "41,230 edges, 0 missing, 0 duplicated"


class DemoReport(msgspec.Struct, frozen=True, kw_only=True):
    title: str
    started_at: str  # ISO 8601, UTC
    duration_s: float
    settings: dict[str, object]  # users, regions, nodes, …
    samples: list[Sample]
    events: list[Event]
    checks: list[Check]
    totals: dict[str, float]  # signups, kv_ops, calls, failed_requests, lost_writes, …

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)
