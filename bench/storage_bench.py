"""RocksStore throughput and GIL behaviour. A measurement, never a test: nothing asserts a time.

    .venv/bin/python bench/storage_bench.py [--seconds 4] [--path DIR]

Measures, on one RocksStore in a fresh directory:
- group commit: entries/s when each synced batch holds 1, 16 or 128 entries of
  ~200-byte values (`write(sync=True)`), and the same for 1 entry written unsynced
  then made durable with `sync()` (the flush_wal path);
- unsynced single-put batches/s and point gets/s;
- whether the GIL is free while a thread fsyncs: the main thread counts loop turns
  alone, then beside a thread doing synced writes, then beside a thread doing
  `sync()`. A ratio near 1.0 means the fsync ran without the GIL.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loom.storage.api import WriteBatch
from loom.storage.rocks import RocksStore

VALUE = b"v" * 200
ENTRIES_PER_SYNCED_BATCH = (1, 16, 128)


def _key(index: int) -> bytes:
    return index.to_bytes(8, "big")


def _batch(first: int, entries: int) -> WriteBatch:
    batch = WriteBatch()
    for index in range(first, first + entries):
        batch.put(_key(index), VALUE)
    return batch


def _repeat_for(seconds: float, step: Callable[[int], None]) -> tuple[int, float]:
    """Call step(0), step(1), ... until `seconds` pass; return (calls, elapsed seconds)."""
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        step(calls)
        calls += 1
    return calls, time.perf_counter() - started


def run(path: str, seconds: float) -> dict[str, float]:
    """Throughput figures for a RocksStore at `path`, spending about `seconds` in all."""
    phase_seconds = seconds / (len(ENTRIES_PER_SYNCED_BATCH) + 3)
    figures: dict[str, float] = {}
    store = RocksStore(path)
    next_key = 0
    try:
        for entries in ENTRIES_PER_SYNCED_BATCH:
            first = next_key

            def synced(call: int, first: int = first, entries: int = entries) -> None:
                store.write(_batch(first + call * entries, entries), sync=True)

            batches, elapsed = _repeat_for(phase_seconds, synced)
            next_key += batches * entries
            figures[f"synced_batch_{entries}_batches_per_s"] = batches / elapsed
            figures[f"synced_batch_{entries}_entries_per_s"] = batches * entries / elapsed

        first = next_key

        def write_then_sync(call: int) -> None:
            store.write(_batch(first + call, 1), sync=False)
            store.sync()

        batches, elapsed = _repeat_for(phase_seconds, write_then_sync)
        next_key += batches
        figures["write_then_sync_1_entries_per_s"] = batches / elapsed

        first = next_key

        def unsynced(call: int) -> None:
            store.write(_batch(first + call, 1), sync=False)

        batches, elapsed = _repeat_for(phase_seconds, unsynced)
        next_key += batches
        figures["unsynced_put_per_s"] = batches / elapsed

        stored = next_key
        assert stored > 0

        def get(call: int) -> None:
            # A fixed stride through every stored key: deterministic and cache-unfriendly.
            assert store.get(_key(call * 7919 % stored)) is not None

        gets, elapsed = _repeat_for(phase_seconds, get)
        figures["get_per_s"] = gets / elapsed
        figures["keys_stored"] = float(stored)
    finally:
        store.close()
    return figures


def _count_turns(seconds: float) -> int:
    turns = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        turns += 1
    return turns


def _turns_beside(seconds: float, step: Callable[[int], None]) -> tuple[int, int]:
    """Main-thread loop turns while a thread repeats `step`; and how many steps it did."""
    stop = threading.Event()
    steps = [0]

    def worker() -> None:
        while not stop.is_set():
            step(steps[0])
            steps[0] += 1

    thread = threading.Thread(target=worker, name="bench-storage-writer")
    thread.start()
    try:
        turns = _count_turns(seconds)
    finally:
        stop.set()
        thread.join()
    return turns, steps[0]


def measure_gil(path: str, seconds: float) -> dict[str, float]:
    """How much the main thread still runs while another thread fsyncs (1.0 = unhindered)."""
    phase_seconds = seconds / 3
    store = RocksStore(path)
    try:
        alone = _count_turns(phase_seconds)

        def synced(step: int) -> None:
            store.write(_batch(step, 1), sync=True)

        def write_then_sync(step: int) -> None:
            store.write(_batch(1_000_000_000 + step, 1), sync=False)
            store.sync()

        beside_synced, synced_steps = _turns_beside(phase_seconds, synced)
        beside_sync, sync_steps = _turns_beside(phase_seconds, write_then_sync)
    finally:
        store.close()
    return {
        "main_progress_beside_synced_write": beside_synced / alone,
        "synced_write_per_s_beside_busy_main": synced_steps / phase_seconds,
        "main_progress_beside_write_then_sync": beside_sync / alone,
        "write_then_sync_per_s_beside_busy_main": sync_steps / phase_seconds,
    }


def _print_table(title: str, figures: dict[str, float]) -> None:
    print(title)
    width = max(len(name) for name in figures)
    for name, figure in figures.items():
        shown = f"{figure:.2f}" if figure < 10 else f"{figure:,.0f}"
        print(f"  {name:<{width}}  {shown:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="total time budget")
    parser.add_argument("--path", help="directory for the databases (default: a temp dir)")
    arguments = parser.parse_args()
    throughput_seconds = arguments.seconds * 0.7
    gil_seconds = arguments.seconds - throughput_seconds
    with tempfile.TemporaryDirectory(dir=arguments.path) as directory:
        _print_table(
            f"RocksStore throughput ({len(VALUE)}-byte values)",
            run(str(Path(directory) / "throughput"), throughput_seconds),
        )
        _print_table(
            "GIL while a thread fsyncs (progress: 1.0 = main thread unhindered)",
            measure_gil(str(Path(directory) / "gil"), gil_seconds),
        )


if __name__ == "__main__":
    main()
