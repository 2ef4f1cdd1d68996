"""Where a committed put spends its time: the core bench's write loop under cProfile.

    .venv/bin/python -m bench.core_profile [--seconds 6] [--batch 16] [--top 15] [--reads]

QUORUM puts (or, with --reads, STRONG reads) over three MemoryStores (no fsync cost, so
what remains is Python in the core), B per flush. Reports the functions and the modules
with the most own time, and the cumulative time of the layers a request crosses.
cProfile slows everything down about twofold, evenly enough that the shares are the
figure, not the seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
from dataclasses import dataclass

from bench.core_bench import (
    KEYS_FOR_READS,
    Kind,
    Workload,
    run_phase,
    running_cluster,
    write_keys,
)

TOP_DEFAULT = 5
BUILTIN = "(built-in)"
# The layers a request crosses, by the qualified name of the function that enters each.
LAYERS = (
    ("ShardHost.flush", "ShardHost.flush: all a flush does"),
    ("ShardHost._apply", "ShardHost._apply: apply + its store write"),
    ("apply_entry", "kv apply_entry: the state machine"),
    ("remember", "kv dedupe.remember: the exactly-once table"),
    ("ShardHost._write", "ShardHost._write: prefixing + store.write"),
    ("MemoryStore.write", "MemoryStore.write"),
    ("Replica.step", "Replica.step: protocol messages"),
    ("Replica.propose", "Replica.propose"),
    ("Replica.tick", "Replica.tick: timers"),
    ("ShardHost.submit", "ShardHost.submit: admission (+ lease reads)"),
    ("Replica.read", "Replica.read: may this read be served"),
    ("Replica.lease_valid", "Replica.lease_valid: lease checks"),
    ("read_item", "kv read_item"),
    ("read_version", "kv read_version"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HotSpot:
    name: str
    calls: int
    own_s: float
    own_share: float
    cumulative_s: float
    cumulative_share: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    ops_per_s_under_profile: float
    total_s: float
    functions: list[HotSpot]
    modules: list[HotSpot]
    layers: list[HotSpot]


def profile(
    seconds: float, requests_per_flush: int = 16, top: int = TOP_DEFAULT, kind: Kind = "write"
) -> Profile:
    with running_cluster("memory") as cluster:
        workload = Workload()
        if kind == "read":
            write_keys(cluster, workload, KEYS_FOR_READS)
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            figure = run_phase(
                cluster,
                workload,
                store="memory",
                kind=kind,
                requests_per_flush=requests_per_flush,
                seconds=seconds,
            )
        finally:
            profiler.disable()
    entries = profiler.getstats()
    total = sum(entry.inlinetime for entry in entries) or 1.0
    functions: list[HotSpot] = []
    own_by_module: dict[str, tuple[int, float]] = {}
    for entry in entries:
        code = entry.code
        if isinstance(code, str):
            module, qualname, where = BUILTIN, code, BUILTIN
        else:
            module = _short_path(code.co_filename)
            qualname = code.co_qualname
            where = f"{module}:{code.co_firstlineno}"
        functions.append(
            HotSpot(
                name=f"{qualname} ({where})",
                calls=entry.callcount,
                own_s=entry.inlinetime,
                own_share=entry.inlinetime / total,
                cumulative_s=entry.totaltime,
                cumulative_share=entry.totaltime / total,
            )
        )
        module_calls, module_own = own_by_module.get(module, (0, 0.0))
        own_by_module[module] = (module_calls + entry.callcount, module_own + entry.inlinetime)
    modules = [
        HotSpot(
            name=module,
            calls=calls,
            own_s=own,
            own_share=own / total,
            cumulative_s=0.0,
            cumulative_share=0.0,
        )
        for module, (calls, own) in own_by_module.items()
    ]
    by_name = {spot.name.split(" (", 1)[0]: spot for spot in functions}
    layers = [
        dataclasses.replace(by_name[qualname], name=label)
        for qualname, label in LAYERS
        if qualname in by_name
    ]
    return Profile(
        ops_per_s_under_profile=figure.ops_per_s,
        total_s=total,
        functions=sorted(functions, key=lambda spot: spot.own_s, reverse=True)[:top],
        modules=sorted(modules, key=lambda spot: spot.own_s, reverse=True)[:top],
        layers=layers,
    )


def _short_path(file_name: str) -> str:
    for marker in ("/src/", "/site-packages/", "/lib/python3.11/"):
        if marker in file_name:
            return file_name.split(marker, 1)[1]
    return file_name


def _print(title: str, spots: list[HotSpot]) -> None:
    print(title)
    for spot in spots:
        print(
            f"  {spot.own_share * 100:5.1f} % own  {spot.cumulative_share * 100:5.1f} % cum"
            f"  {spot.calls:>9,} calls  {spot.name}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=6.0, help="time under the profiler")
    parser.add_argument("--batch", type=int, default=16, help="puts per flush")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--reads", action="store_true", help="profile STRONG reads instead")
    arguments = parser.parse_args()
    kind: Kind = "read" if arguments.reads else "write"
    result = profile(arguments.seconds, arguments.batch, arguments.top, kind)
    print(
        f"{result.ops_per_s_under_profile:,.0f} {kind}s/s under the profiler,"
        f" {result.total_s:.2f} s profiled"
    )
    _print("functions by own time", result.functions)
    _print("modules by own time", result.modules)
    _print("layers (cumulative)", result.layers)


if __name__ == "__main__":
    main()
