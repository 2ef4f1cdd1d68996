"""Every benchmark, briefly: `make bench`, or

    .venv/bin/python -m bench [--seconds 36] [--json]

`--seconds` is the measuring budget, shared out as core 60 %, storage 25 %, profile
15 %; setup (opening stores, activating primaries) adds a few seconds on top.
`--json` prints one JSON document on stdout instead of tables (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import core_bench, core_profile, storage_bench

CORE_SHARE = 0.60
STORAGE_SHARE = 0.25
PROFILE_SHARE = 0.15
SECONDS_DEFAULT = 36.0
# Rich wraps at 80 columns when stdout is not a terminal; the tables need more.
PIPE_WIDTH = 120
SECONDS_MIN = 1.0


def machine() -> dict[str, object]:
    load_1m, _, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rocksdict": importlib.metadata.version("rocksdict"),
        "load_average_1m_at_start": round(load_1m, 2),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    machine: dict[str, object]
    seconds_budget: float
    seconds_taken: float
    core: list[core_bench.CoreFigure]
    storage: dict[str, float]
    profile: core_profile.Profile


def run_all(seconds: float, progress: Console) -> Report:
    started = time.perf_counter()
    progress.log(f"core: one p-shard, 3 in-process replicas ({seconds * CORE_SHARE:.0f} s)")
    core = core_bench.run(seconds * CORE_SHARE)
    progress.log(f"storage: RocksStore group commit ({seconds * STORAGE_SHARE:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="loom-storage-bench-") as directory:
        storage = storage_bench.run(str(Path(directory) / "db"), seconds * STORAGE_SHARE)
    progress.log(f"profile: puts over MemoryStores, B=16 ({seconds * PROFILE_SHARE:.0f} s)")
    spots = core_profile.profile(seconds * PROFILE_SHARE)
    return Report(
        machine=machine(),
        seconds_budget=seconds,
        seconds_taken=round(time.perf_counter() - started, 1),
        core=core,
        storage=storage,
        profile=spots,
    )


def _core_table(figures: list[core_bench.CoreFigure]) -> Table:
    table = Table(title="One p-shard through the core: 3 replicas in one process, closed loop")
    table.add_column("store")
    table.add_column("workload")
    headings = (
        "B/flush",
        "ops/s",
        "round p50 ms",
        "round p99 ms",
        "fsyncs/round",
        "cpu",
        "ops/cpu-s",
        "errors",
    )
    for heading in headings:
        table.add_column(heading, justify="right")
    for figure in figures:
        table.add_row(
            figure.store,
            figure.workload,
            str(figure.requests_per_flush),
            f"{figure.ops_per_s:,.0f}",
            f"{figure.round_p50_ms:.2f}",
            f"{figure.round_p99_ms:.2f}",
            f"{figure.fsyncs_per_round:.1f}",
            f"{figure.cpu_share:.0%}",
            f"{figure.ops_per_cpu_s:,.0f}",
            str(figure.errors),
        )
    return table


def _storage_table(figures: dict[str, float]) -> Table:
    table = Table(title=f"RocksStore alone ({len(storage_bench.VALUE)}-byte values)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, figure in figures.items():
        table.add_row(name, f"{figure:.2f}" if figure < 10 else f"{figure:,.0f}")
    return table


def _profile_table(title: str, spots: list[core_profile.HotSpot]) -> Table:
    table = Table(title=title)
    table.add_column("where")
    for heading in ("calls", "own %", "cumulative %"):
        table.add_column(heading, justify="right")
    for spot in spots:
        table.add_row(
            spot.name,
            f"{spot.calls:,}",
            f"{spot.own_share * 100:.1f}",
            f"{spot.cumulative_share * 100:.1f}" if spot.cumulative_s else "",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run every loom benchmark briefly."
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=SECONDS_DEFAULT,
        help=f"measuring budget in seconds, all benchmarks together (default {SECONDS_DEFAULT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    arguments = parser.parse_args()
    if arguments.seconds < SECONDS_MIN:
        parser.error(f"--seconds must be at least {SECONDS_MIN:g}")
    progress = Console(stderr=True)
    report = run_all(arguments.seconds, progress)
    if arguments.json:
        json.dump(dataclasses.asdict(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    console.print(f"machine: {report.machine}")
    console.print(_core_table(report.core))
    console.print(_storage_table(report.storage))
    title = "Where a put's time goes (cProfile, QUORUM puts, MemoryStore, B=16)"
    console.print(_profile_table(f"{title}: functions", report.profile.functions))
    console.print(_profile_table(f"{title}: modules", report.profile.modules))
    console.print(_profile_table(f"{title}: layers", report.profile.layers))
    console.print(f"measured in {report.seconds_taken} s (budget {report.seconds_budget:g} s)")


if __name__ == "__main__":
    main()
