"""loom kv's asyncio client: `connect()` and `Client` (DESIGN §5).

`Client` is built in layers, one module each: `Transport` (transport.py: connections,
routing, retries, request ids, writes), `ClusterAdmin` (admin.py: the operator calls)
and `Client` here, which hands out `Keyspace` handles (keyspace.py: reads, writes,
transactions). Argument checks are in arguments.py, the retry rules in retries.py.

Rules: a `Client` belongs to one event loop; `connect()` fetches the routing table
before it returns the client and closes the client if that fails. This module still
exports the names callers and tests imported from it before it was split (`__all__`).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from types import TracebackType
from typing import Any

from loom.kv.admin import KEYSPACE_READY_TIMEOUT_S, RESHARD_STALL_S, ClusterAdmin
from loom.kv.arguments import INT64, TTL_S_MAX, parse_seeds
from loom.kv.keyspace import Keyspace, T
from loom.kv.retries import BACKOFF_BASE_S, BACKOFF_MAX_S, Target, _RequestIds, _result
from loom.kv.transport import ATTEMPT_TIMEOUT_S, DEFAULT_TIMEOUT_S, ROUTING_TIMEOUT_S
from loom.runtime.latency import LatencyMatrix
from loom.runtime.tls import TlsConfig

# Every public name this module had before it was split, and the private helpers that
# tests import from here.
__all__ = [
    "ATTEMPT_TIMEOUT_S",
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "DEFAULT_TIMEOUT_S",
    "INT64",
    "KEYSPACE_READY_TIMEOUT_S",
    "RESHARD_STALL_S",
    "ROUTING_TIMEOUT_S",
    "TTL_S_MAX",
    "Client",
    "Keyspace",
    "T",
    "Target",
    "_RequestIds",
    "_result",
    "connect",
    "parse_seeds",
]


class Client(ClusterAdmin):
    """A connection to a loom kv cluster. Make one with `connect()`; share it freely
    among tasks of one event loop; `close()` it (or use `async with`)."""

    def keyspace(self, name: str) -> Keyspace:
        """A handle on keyspace `name` (checked at its first request)."""
        return Keyspace(self, name)


class _Connecting:
    """What `connect()` returns: await it, or use it with `async with`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._start().__await__()

    async def _start(self) -> Client:
        try:
            await self._client.router.refresh(force=True)
        except BaseException:
            await self._client.close()
            raise
        return self._client

    async def __aenter__(self) -> Client:
        return await self._start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()


def connect(
    address: str | Sequence[str],
    *,
    token: str | None = None,
    region: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tls: TlsConfig | None = None,
    latency: str | LatencyMatrix | None = None,
) -> _Connecting:
    """Connect to a cluster through any of its addresses (the shard manager or nodes:
    `"127.0.0.1:7300"`, `"h1:p1,h2:p2"`). `region` makes relaxed reads prefer replicas
    there and is sent with requests (Akkio placement counts accesses by region);
    `timeout_s` bounds every request, retries included. `tls`: connect with TLS
    (`kv.TlsConfig(ca=..., cert=..., key=...)`; a cluster with TLS refuses clients
    without it with `TlsRequired`). `latency` (`"a-b=40,…"`, a .json/.toml path, or
    $LOOM_LATENCY when None) injects inter-region delays."""
    client = Client(
        parse_seeds(address),
        token=token,
        region=region,
        timeout_s=timeout_s,
        tls=tls,
        latency=latency,
    )
    return _Connecting(client)
