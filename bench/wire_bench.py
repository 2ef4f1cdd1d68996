"""Loopback RPC: loom's wire layer against grpc.aio. A measurement, never a test.

    .venv/bin/python -m bench.wire_bench [--seconds 12]

Each scenario starts an echo server in its own process (no shared GIL), then this
process drives it for an equal share of `--seconds` (after a short warm-up) with 64
concurrent callers sending 100-byte bodies:
- loom 1/frame: `RpcClient.call`, coalescing off on both sides (one request, one reply
  per frame);
- loom coalesced: `RpcClient.call`, requests/replies of one loop turn share a frame;
- loom batch 16: `RpcClient.call_many` of 16 bodies (16 requests per frame);
- grpc.aio unary: a generic bytes-in/bytes-out handler, if `grpcio` is importable.
Latency is per call (per `call_many` for the batch scenario). Prints a table and
loom/grpc ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from loom.runtime.rpc import RpcClient, RpcLimits, RpcServer, run

CONCURRENCY = 64
BATCH_BODIES = 16
BODY = b"b" * 100
CALL_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 20.0
GRPC_METHOD = "/loom.Bench/Echo"


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    name: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float


async def _echo(body: bytes) -> bytes:
    return body


def _loom_limits(kind: str) -> RpcLimits:
    return RpcLimits(batch_items_max=1 if kind == "loom1" else 64, in_flight_max=4096)


async def _serve_loom(kind: str) -> None:
    async with RpcServer(_echo, limits=_loom_limits(kind)) as server:
        print(f"PORT {server.port}", flush=True)
        await asyncio.Event().wait()  # until the parent terminates this process


async def _serve_grpc() -> None:
    import grpc  # noqa: PLC0415 - optional: only this benchmark needs it

    async def echo(body: bytes, _context: Any) -> bytes:
        return body

    handler = grpc.method_handlers_generic_handler(
        "loom.Bench", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


def _start_server(
    kind: str, module: str = "bench.wire_bench", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], int]:
    """`python -m MODULE --serve KIND [EXTRA…]`, which prints `PORT n` once it listens."""
    command = [sys.executable, "-m", module, "--serve", kind, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], SERVER_START_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        _stop_server(process)
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return process, int(line.split()[1])


def _stop_server(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


async def _drive(
    name: str, call: Callable[[], Awaitable[int]], warmup_s: float, measure_s: float
) -> Result:
    """Run CONCURRENCY callers; `call` returns how many requests it carried."""
    latencies_s: list[float] = []
    requests = 0
    loop = time.perf_counter
    measure_from = loop() + warmup_s
    measure_until = measure_from + measure_s

    async def caller() -> None:
        nonlocal requests
        while (started := loop()) < measure_until:
            carried = await call()
            if started >= measure_from:
                latencies_s.append(loop() - started)
                requests += carried

    async with asyncio.timeout(warmup_s + measure_s + CALL_TIMEOUT_S), asyncio.TaskGroup() as group:
        for _ in range(CONCURRENCY):
            group.create_task(caller())
    cuts = statistics.quantiles(latencies_s, n=100)
    return Result(
        name=name, requests_per_s=requests / measure_s, p50_ms=cuts[49] * 1e3, p99_ms=cuts[98] * 1e3
    )


async def _measure_loom(kind: str, port: int, warmup_s: float, measure_s: float) -> Result:
    async with await RpcClient.connect("127.0.0.1", port, limits=_loom_limits(kind)) as client:
        if kind == "loom-batch":
            bodies = [BODY] * BATCH_BODIES

            async def call_batch() -> int:
                await client.call_many(bodies, timeout_s=CALL_TIMEOUT_S)
                return BATCH_BODIES

            name = f"loom batch {BATCH_BODIES}/frame (call_many)"
            return await _drive(name, call_batch, warmup_s, measure_s)

        async def call_one() -> int:
            await client.call(BODY, timeout_s=CALL_TIMEOUT_S)
            return 1

        name = "loom 1/frame" if kind == "loom1" else "loom coalesced per loop turn"
        return await _drive(name, call_one, warmup_s, measure_s)


async def _measure_grpc(port: int, warmup_s: float, measure_s: float) -> Result:
    import grpc  # noqa: PLC0415 - optional

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(GRPC_METHOD)

        async def call_one() -> int:
            await echo(BODY, timeout=CALL_TIMEOUT_S)
            return 1

        return await _drive("grpc.aio unary", call_one, warmup_s, measure_s)


def _measure(kind: str, seconds: float) -> Result:
    warmup_s = min(0.5, seconds * 0.2)
    process, port = _start_server(kind)
    try:
        if kind == "grpc":
            return run(_measure_grpc(port, warmup_s, seconds - warmup_s))
        return run(_measure_loom(kind, port, warmup_s, seconds - warmup_s))
    finally:
        _stop_server(process)


def _has_grpc() -> bool:
    try:
        import grpc  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="total measuring budget")
    parser.add_argument("--serve", choices=["loom1", "loom", "loom-batch", "grpc"])
    arguments = parser.parse_args()
    if arguments.serve == "grpc":
        run(_serve_grpc())
        return
    if arguments.serve is not None:
        run(_serve_loom(arguments.serve))
        return
    kinds = ["loom1", "loom", "loom-batch"]
    if _has_grpc():
        kinds.append("grpc")
    else:
        print("grpcio is not importable: grpc.aio skipped", file=sys.stderr)
    share_s = arguments.seconds / len(kinds)
    results = [_measure(kind, share_s) for kind in kinds]
    table = Table(title=f"loopback RPC, {CONCURRENCY} concurrent callers, {len(BODY)} B bodies")
    for column in ("scenario", "requests/s", "p50 ms", "p99 ms", "× grpc"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    grpc_rate = results[-1].requests_per_s if kinds[-1] == "grpc" else None
    for result in results:
        ratio = f"{result.requests_per_s / grpc_rate:.1f}" if grpc_rate else "-"
        table.add_row(
            result.name,
            f"{result.requests_per_s:,.0f}",
            f"{result.p50_ms:.2f}",
            f"{result.p99_ms:.2f}",
            ratio,
        )
    Console().print(table)


if __name__ == "__main__":
    main()
