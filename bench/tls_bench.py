"""Loopback RPC with and without TLS (ADR 0015). A measurement, never a test.

    .venv/bin/python -m bench.tls_bench [--rounds 4] [--seconds 3]

An echo `RpcServer` in its own process, plaintext or TLS (certificates made by
`init_certificates` in a temporary directory), driven by 64 concurrent callers sending
100-byte bodies over one connection (`RpcClient.call`, coalescing on), as in
`bench/wire_bench.py`. Plain and TLS rounds alternate, so a busy neighbour on a shared
machine weighs on both alike. Besides requests/s it reports CPU per request (client plus
server process), the steadier figure when other work competes for the cores. Prints
each round and the medians' TLS/plain ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.wire_bench import BODY, CALL_TIMEOUT_S, _drive, _start_server, _stop_server
from loom.runtime.rpc import RpcClient, RpcLimits, RpcServer, run
from loom.runtime.tls import TlsConfig
from loom.runtime.tls_certs import CertificateFiles, init_certificates

LIMITS = RpcLimits(in_flight_max=4096)
MODULE = "bench.tls_bench"


async def _echo(body: bytes) -> bytes:
    return body


async def _serve(tls: TlsConfig | None) -> None:
    async with RpcServer(_echo, limits=LIMITS, tls=tls) as server:
        print(f"PORT {server.port}", flush=True)
        await asyncio.Event().wait()  # until the parent terminates this process


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(port: int, tls: TlsConfig | None, seconds: float) -> float:
    async with await RpcClient.connect("127.0.0.1", port, limits=LIMITS, tls=tls) as client:

        async def call_one() -> int:
            await client.call(BODY, timeout_s=CALL_TIMEOUT_S)
            return 1

        result = await _drive("echo", call_one, _warmup_s(seconds), seconds)
    return result.requests_per_s


def _measure(files: CertificateFiles | None, seconds: float) -> tuple[float, float]:
    """(requests/s, CPU µs per request) of one round."""
    extra = () if files is None else (str(files.directory),)
    process, port = _start_server("tls" if files else "plain", MODULE, extra)
    tls = None if files is None else TlsConfig(ca=files.ca)
    try:
        cpu_before = time.process_time() + _cpu_s(process.pid)
        rate = run(_round(port, tls, seconds))
        cpu_used = time.process_time() + _cpu_s(process.pid) - cpu_before
    finally:
        _stop_server(process)
    # The CPU figure spans the warm-up too (at about the measured rate).
    requests = rate * (seconds + _warmup_s(seconds))
    return rate, cpu_used / requests * 1e6


def _warmup_s(seconds: float) -> float:
    return min(0.5, seconds * 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="plain/TLS pairs")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument("--serve", choices=["plain", "tls"])
    parser.add_argument("certificates", nargs="?", help="(with --serve tls) their directory")
    arguments = parser.parse_args()
    if arguments.serve is not None:
        files = CertificateFiles(directory=Path(arguments.certificates or "."))
        run(_serve(files.cluster() if arguments.serve == "tls" else None))
        return
    with tempfile.TemporaryDirectory(prefix="loom-tls-bench-") as tmp:
        files = init_certificates(Path(tmp))
        figures: dict[str, list[tuple[float, float]]] = {"plain": [], "tls": []}
        for index in range(arguments.rounds):
            for name, chosen in (("plain", None), ("tls", files)):
                rate, cpu_us = _measure(chosen, arguments.seconds)
                figures[name].append((rate, cpu_us))
                print(
                    f"round {index + 1} {name:>5}: {rate:9,.0f} requests/s, "
                    f"{cpu_us:6.1f} µs CPU/request"
                )
    rates = {n: statistics.median(r for r, _ in f) for n, f in figures.items()}
    cpus = {n: statistics.median(c for _, c in f) for n, f in figures.items()}
    print(
        f"median: plain {rates['plain']:,.0f}/s {cpus['plain']:.1f} µs, "
        f"TLS {rates['tls']:,.0f}/s {cpus['tls']:.1f} µs; "
        f"TLS/plain requests/s {rates['tls'] / rates['plain']:.2f}, "
        f"CPU per request {cpus['tls'] / cpus['plain']:.2f}"
    )


if __name__ == "__main__":
    main()
