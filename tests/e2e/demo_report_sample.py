"""A realistic `DemoReport` for the report's tests and the README screenshot.

Five minutes of a launch, one sample a second, from a seeded `random.Random`: sign-ups
ramp up steeply, the follow-graph keyspace reshards at 90 s, a node is SIGKILLed at 150 s
(a latency spike, a few seconds with no latency sample, a queue backlog) and restarted
at 200 s; the AIMD controllers saw-tooth against the graph keyspace's quota.

`python -m e2e.demo_report_sample OUT.html [OUT.png]` (from tests/) writes the sample
report, and with a PNG path a screenshot of its top: docs/demo-report.png is made so
(`cd tests && ../.venv/bin/python -m e2e.demo_report_sample report.html ../docs/demo-report.png`).
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from loom.demo.model import Check, DemoReport, Event, Sample
from loom.demo.report import write_html

DURATION_S = 300
RESHARD_S = 90.0
KILL_S = 150.0
RESTART_S = 200.0
FAILOVER_S = 3.0  # no latency sample while the killed node's primaries move
CHROMIUM_TIMEOUT_S = 90.0
SCREENSHOT_WINDOW = "--window-size=1080,1500"


def sample_report(*, passed: bool = True, seed: int = 6) -> DemoReport:
    rng = random.Random(seed)
    samples = []
    queue = 0.0
    rates = {"kv:threads_graph": 200.0, "kv:notifications": 400.0}
    totals = {"signups": 0.0, "kv_ops": 0.0, "calls": 0.0}
    for second in range(1, DURATION_S + 1):
        t = float(second)
        # A logistic ramp to ~700 sign-ups/s around the two-minute mark, with jitter.
        signups = 700.0 / (1.0 + math.exp(-(t - 110.0) / 22.0)) * rng.uniform(0.9, 1.1)
        in_failover = KILL_S <= t < KILL_S + FAILOVER_S
        capacity = 0.3 if in_failover else (0.7 if KILL_S <= t < RESTART_S else 1.0)
        throttled = 0.0
        for name, quota in (("kv:threads_graph", 1300.0), ("kv:notifications", 1800.0)):
            if rates[name] > quota * capacity:  # pushed back: halve, count the refusals
                throttled += (rates[name] - quota * capacity) * rng.uniform(2.0, 4.0)
                rates[name] /= 2.0
            else:
                rates[name] += 25.0
        completed = min(queue + signups, rates["kv:threads_graph"] * rng.uniform(0.9, 1.0))
        queue = max(0.0, queue + signups - completed)
        kv_ops = (signups * 24.0 + 2500.0) * capacity * rng.uniform(0.95, 1.05)
        spike = 40.0 * math.exp(-(t - KILL_S) / 4.0) if t >= KILL_S else 1.0
        spike = max(spike, 1.0)
        load = 1.0 + signups / 700.0
        samples.append(
            Sample(
                t_s=t,
                signups_per_s=signups,
                kv_ops_per_s=kv_ops,
                calls_completed_per_s=completed,
                queue_depth=round(queue),
                throttled_per_s=throttled,
                p50_ms=None if in_failover else 1.8 * load * rng.uniform(0.9, 1.1),
                p99_ms=None if in_failover else 14.0 * load * spike * rng.uniform(0.8, 1.2),
                other_p99_ms=9.0 * rng.uniform(0.85, 1.15) * (1.5 if in_failover else 1.0),
                controller_rates=dict(rates),
            )
        )
        totals["signups"] += signups
        totals["kv_ops"] += kv_ops
        totals["calls"] += completed
    events = [
        Event(t_s=RESHARD_S, label="reshard threads_graph 2 → 8"),
        Event(t_s=KILL_S, label="SIGKILL n2"),
        Event(t_s=RESTART_S, label="restart n2"),
    ]
    edges = round(totals["signups"] * 37)
    checks = [
        Check(
            name="every follow edge copied exactly once",
            passed=True,
            detail=f"{edges:,} edges, 0 missing, 0 duplicated",
        ),
        Check(
            name="every follower counter equals its edges",
            passed=True,
            detail=f"{round(totals['signups']):,} counters checked, 0 off",
        ),
        Check(
            name="every notification delivered",
            passed=passed,
            detail="18,204 of 18,204 delivered" if passed else "18,191 of 18,204 delivered",
        ),
        Check(
            name="no acknowledged write lost",
            passed=True,
            detail="52,118 acknowledged writes read back",
        ),
        Check(
            name="the other tenant's p99 stayed within bounds",
            passed=True,
            detail="max p99 13.4 ms ≤ 50 ms",
        ),
        Check(name="no call dead-lettered", passed=True, detail="0 dead-lettered"),
    ]
    return DemoReport(
        title="loom demo threads — launch replay",
        started_at="2026-11-22T09:00:00Z",
        duration_s=float(DURATION_S),
        settings={
            "users": 120_000,
            "regions": ["a", "b", "c"],
            "nodes": 3,
            "workers": 2,
            "seed": seed,
        },
        samples=samples,
        events=events,
        checks=checks,
        totals={
            **{k: round(v) for k, v in totals.items()},
            "failed_requests": 0.0,
            "lost_writes": 0.0,
        },
    )


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Headless Debian Chromium: no sandbox (CI runs as root), a throwaway profile."""
    return subprocess.run(
        [
            "chromium",
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
        check=True,
    )


def main(argv: list[str]) -> None:
    html_path = Path(argv[0])
    write_html(sample_report(), html_path)
    if len(argv) > 1:
        png_path = Path(argv[1]).resolve()
        with tempfile.TemporaryDirectory() as profile:
            # The top of the page: banner, checks, totals, throughput and latency.
            chromium(
                SCREENSHOT_WINDOW,
                f"--screenshot={png_path}",
                html_path.resolve().as_uri(),
                profile=Path(profile),
            )
        # 256 colours are plenty for flat fills and lines, and a third of the bytes.
        with Image.open(png_path) as image:
            small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        small.save(png_path, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1:])
