"""RpcServer and RpcClient over real TCP on 127.0.0.1 (ephemeral ports, no sleeps)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from loom.runtime.rpc import (
    CallTimedOut,
    ConnectionLost,
    Overloaded,
    RemoteError,
    RpcClient,
    RpcLimits,
    RpcServer,
)

TIMEOUT_S = 5.0


async def _echo(body: bytes) -> bytes:
    return body


async def _failing(body: bytes) -> bytes:
    raise ValueError(f"cannot handle {body!r}")


def test_echo_calls_return_their_bodies() -> None:
    async def main() -> None:
        async with (
            RpcServer(_echo) as server,
            await RpcClient.connect("127.0.0.1", server.port) as client,
        ):
            assert await client.call(b"ping", timeout_s=TIMEOUT_S) == b"ping"
            assert await client.call(b"", timeout_s=TIMEOUT_S) == b""
            bodies = [b"a", b"b", b"c"]
            assert await client.call_many(bodies, timeout_s=TIMEOUT_S) == bodies

    asyncio.run(main())


@pytest.mark.parametrize("batch_items_max", [1, 64])
def test_a_thousand_pipelined_calls_complete_with_matching_bodies(batch_items_max: int) -> None:
    limits = RpcLimits(batch_items_max=batch_items_max)

    async def main() -> None:
        async with (
            RpcServer(_echo, limits=limits) as server,
            await RpcClient.connect("127.0.0.1", server.port, limits=limits) as client,
        ):
            bodies = [index.to_bytes(4, "big") * (index % 7) for index in range(1000)]
            async with asyncio.TaskGroup() as group:
                calls = [
                    group.create_task(client.call(body, timeout_s=TIMEOUT_S)) for body in bodies
                ]
            assert [call.result() for call in calls] == bodies

    asyncio.run(main())


def test_a_handler_exception_becomes_an_error_response() -> None:
    async def main() -> None:
        async with (
            RpcServer(_failing) as server,
            await RpcClient.connect("127.0.0.1", server.port) as client,
        ):
            with pytest.raises(RemoteError, match="ValueError"):
                await client.call(b"x", timeout_s=TIMEOUT_S)
            # The connection survives a failed call.
            with pytest.raises(RemoteError):
                await client.call(b"y", timeout_s=TIMEOUT_S)

    asyncio.run(main())


def test_calls_over_the_servers_in_flight_limit_are_answered_overloaded() -> None:
    server_limits = RpcLimits(in_flight_max=2)

    async def main() -> None:
        release = asyncio.Event()
        both_started = asyncio.Event()
        started: list[bytes] = []

        async def blocked(body: bytes) -> bytes:
            started.append(body)
            if len(started) == 2:
                both_started.set()
            await release.wait()
            return body

        async with (
            RpcServer(blocked, limits=server_limits) as server,
            await RpcClient.connect("127.0.0.1", server.port) as client,
        ):
            async with asyncio.TaskGroup() as group:
                first = group.create_task(client.call(b"1", timeout_s=TIMEOUT_S))
                second = group.create_task(client.call(b"2", timeout_s=TIMEOUT_S))
                async with asyncio.timeout(TIMEOUT_S):
                    await both_started.wait()
                with pytest.raises(Overloaded) as overloaded:
                    await client.call(b"3", timeout_s=TIMEOUT_S)
                assert overloaded.value.retry_after_ms == 10
                release.set()
            assert first.result() == b"1"
            assert second.result() == b"2"

    asyncio.run(main())


def test_a_call_without_a_reply_times_out_within_its_timeout() -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def stuck(body: bytes) -> bytes:
            await never.wait()
            return body

        async with (
            RpcServer(stuck) as server,
            await RpcClient.connect("127.0.0.1", server.port) as client,
        ):
            started = time.monotonic()
            with pytest.raises(CallTimedOut):
                await client.call(b"x", timeout_s=0.2)
            assert time.monotonic() - started < TIMEOUT_S

    asyncio.run(main())


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_connecting_to_a_dead_server_fails_with_connection_lost() -> None:
    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="cannot connect"):
            await RpcClient.connect("127.0.0.1", _unused_port(), limits=RpcLimits(io_timeout_s=1))
        assert time.monotonic() - started < TIMEOUT_S

    asyncio.run(main())


def test_calls_fail_with_connection_lost_when_the_server_goes_away() -> None:
    async def main() -> None:
        server = RpcServer(_echo)
        await server.start()
        async with await RpcClient.connect("127.0.0.1", server.port) as client:
            assert await client.call(b"up", timeout_s=TIMEOUT_S) == b"up"
            await server.close()
            started = time.monotonic()
            with pytest.raises(ConnectionLost):
                await client.call(b"down", timeout_s=TIMEOUT_S)
            assert time.monotonic() - started < TIMEOUT_S

    asyncio.run(main())


def test_injected_delay_holds_each_request_and_reply_and_keeps_their_order() -> None:
    """`delay` (runtime/latency.py) waits once on the way out and once on the way back;
    pipelined calls keep their order. Only a lower bound on time is asserted."""
    seen: list[bytes] = []

    async def record(body: bytes) -> bytes:
        seen.append(body)
        return body

    async def main() -> None:
        async with (
            RpcServer(record) as server,
            await RpcClient.connect("127.0.0.1", server.port, delay=lambda: 0.05) as client,
        ):
            started = time.monotonic()
            bodies = [str(i).encode() for i in range(20)]
            replies = await asyncio.gather(*(client.call(b, timeout_s=TIMEOUT_S) for b in bodies))
            assert time.monotonic() - started >= 0.1
            assert replies == bodies
            assert seen == bodies

    asyncio.run(main())
