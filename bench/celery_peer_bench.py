"""The Celery peer of `loom bench functions` alone, for choosing its settings. A
measurement, never a test.

    .venv/bin/python -m bench.celery_peer_bench [--calls 5000] [--pool threads]
        [--concurrency 16] [--submitters 4] [--runs 1]

Each run starts a fresh redis-server and Celery worker in a temporary directory (see
`loom.benchmarks.celery_peer`), sends the calls, stops both, and prints one JSON line:
the settings, the figures of `loom.benchmarks.calls_figures`, and the 1-minute load
average at the end (the machine is shared: a high load explains a slow run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import cast

from loom.benchmarks.celery_peer import POOL_DEFAULT, POOLS, Pool, run_celery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--pool", choices=POOLS, default=POOL_DEFAULT)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="loom-bench-celery-") as tmp:
            figures = run_celery(
                args.calls,
                concurrency=args.concurrency,
                submitters=args.submitters,
                timeout_s=args.timeout,
                workdir=Path(tmp),
                pool=cast(Pool, args.pool),
                progress=lambda line: print(line, file=sys.stderr),
            )
        settings = {"pool": args.pool, "concurrency": args.concurrency}
        load_1m = os.getloadavg()[0]
        line = {**settings, "calls": figures.calls, **figures.to_json(), "load_1m": load_1m}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
