"""The YCSB harness of `loom bench kv` against etcd alone. A measurement, never a test.

    .venv/bin/python -m bench.ycsb_etcd --clients 64 --duration 10 --workload A

Starts a fresh local 3-member etcd cluster (WAL fsync on, etcd's defaults) in a
temporary directory, preloads `--records` records of `--value-bytes` bytes, runs the
workload for `--warmup` unmeasured then `--duration` measured seconds, and prints one
JSON object on stdout (progress on stderr). Needs Debian's etcd-server and aetcd.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from loom.benchmarks import ycsb
from loom.benchmarks.etcd_peer import EtcdCluster, EtcdDrivers, Placement
from loom.runtime.rpc import run


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def measure(args: argparse.Namespace, data_dir: Path) -> dict[str, object]:
    workload = ycsb.WORKLOADS[args.workload]
    placement: Placement = args.placement
    started = time.monotonic()
    async with EtcdCluster(data_dir) as cluster:
        _progress(f"etcd: 3 members healthy in {time.monotonic() - started:.1f} s")
        drivers = await EtcdDrivers.for_cluster(cluster, placement)
        started = time.monotonic()
        await ycsb.load(
            drivers,
            args.records,
            args.value_bytes,
            args.load_concurrency,
            seed=args.seed,
            progress=lambda done: _progress(f"loaded {done}/{args.records}"),
        )
        _progress(f"load: {time.monotonic() - started:.1f} s; running {workload.name}")
        wall_started, cpu_started = time.monotonic(), time.process_time()
        stats = await ycsb.run(
            drivers,
            workload,
            clients=args.clients,
            duration_s=args.duration,
            records=args.records,
            value_bytes=args.value_bytes,
            seed=args.seed,
            warmup_s=args.warmup,
        )
        harness_cpu = (time.process_time() - cpu_started) / (time.monotonic() - wall_started)
    for sample in stats.error_samples:
        _progress(f"error: {sample}")
    return {
        "workload": workload.name,
        "clients": args.clients,
        "duration_s": args.duration,
        "etcd": stats.as_json(),
        "reads": stats.reads,
        "updates": stats.updates,
        "records": args.records,
        "value_bytes": args.value_bytes,
        "placement": placement,
        # This process's CPU seconds per wall second while it ran the workload (all its
        # threads, gRPC's included): near 1.0 the Python client, not etcd, is the limit.
        "harness_cpu": round(harness_cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(ycsb.WORKLOADS), default="A")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=ycsb.WARMUP_S_DEFAULT)
    parser.add_argument("--records", type=int, default=ycsb.RECORDS_DEFAULT)
    parser.add_argument("--value-bytes", type=int, default=ycsb.VALUE_BYTES_DEFAULT)
    parser.add_argument("--load-concurrency", type=int, default=ycsb.LOAD_CONCURRENCY_DEFAULT)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--placement", choices=["spread", "leader"], default="leader")
    args = parser.parse_args()
    try:
        ycsb.check_settings(
            clients=args.clients,
            duration_s=args.duration,
            records=args.records,
            value_bytes=args.value_bytes,
            warmup_s=args.warmup,
        )
    except ValueError as error:
        parser.error(str(error))
    with tempfile.TemporaryDirectory(prefix="loom-ycsb-etcd-") as tmp:
        result = run(measure(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
