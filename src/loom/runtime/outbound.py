"""One-way delivery to one peer: a bounded queue and one owned sender task.

Used for replication messages between nodes and for the shard manager's traffic. The
protocols above re-send whatever matters (Accepts, heartbeats, announcements, reports),
so a full queue or a failed connection drops messages and counts them: nothing here
waits or grows without bound. With injected latency (`delay`, runtime/latency.py) up to
PIPELINE_MAX batches are in flight at once, so a long round trip does not cap the rate
at one batch per round trip; without it, one batch waits for its answer as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from loom.core.errors import ConnectionFailed
from loom.runtime.rpc import RemoteError, RpcClient
from loom.runtime.tls import TlsConfig

QUEUE_MAX = 4_096
BATCH_MAX = 64
CALL_TIMEOUT_S = 2.0
PIPELINE_MAX = 8
log = logging.getLogger("loom.outbound")


class Outbound:
    def __init__(
        self,
        address: Callable[[], tuple[str, int]],
        delay: Callable[[tuple[str, int]], Callable[[], float] | None] | None = None,
        *,
        tls: TlsConfig | None = None,
    ) -> None:
        self.address = address
        # For an address, the injected latency of a connection to it (None: none).
        self.delay = delay
        self.tls = tls
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_MAX)
        self.dropped = 0
        self.misconfigured: str | None = None  # the last refusal, logged once
        # The connection a pipelined batch failed on (replaced before the next batch);
        # batches that fail on a connection already replaced do not mark the new one.
        self.failed: RpcClient | None = None

    def put(self, body: bytes) -> None:
        if self.queue.full():
            self.dropped += 1
            return
        self.queue.put_nowait(body)

    async def run(self) -> None:
        """Sends until cancelled: batches what is queued, reconnects after a failure."""
        client: RpcClient | None = None
        pipelined = False
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                bodies = [await self.queue.get()]
                while not self.queue.empty() and len(bodies) < BATCH_MAX:
                    bodies.append(self.queue.get_nowait())
                try:
                    if client is None or self.failed is client:
                        if client is not None:
                            await client.close()
                        client, self.failed = None, None
                        host, port = self.address()
                        delay = self.delay((host, port)) if self.delay is not None else None
                        client = await RpcClient.connect(host, port, tls=self.tls, delay=delay)
                        pipelined = delay is not None
                    if pipelined:
                        await self._pipeline(client, bodies, calls)
                    else:
                        await client.call_many(bodies, timeout_s=CALL_TIMEOUT_S)
                except Exception as failure:  # noqa: BLE001 - any failure: drop, reconnect next time
                    self._note(failure)
                    self.dropped += len(bodies)
                    if client is not None:
                        await client.close()
                    client = None
        finally:
            for call in list(calls):
                call.cancel()
            if calls:
                await asyncio.wait(calls)
            if client is not None:
                await client.close()

    async def _pipeline(
        self, client: RpcClient, bodies: list[bytes], calls: set[asyncio.Task[None]]
    ) -> None:
        """Sends `bodies` without waiting for the answer (at most PIPELINE_MAX batches in
        flight); a failed batch marks the connection failed for the next turn."""
        while len(calls) >= PIPELINE_MAX:
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)

        async def call() -> None:
            try:
                await client.call_many(bodies, timeout_s=CALL_TIMEOUT_S)
            except Exception as failure:  # noqa: BLE001 - any failure: drop, reconnect next time
                self._note(failure)
                self.dropped += len(bodies)
                self.failed = client

        task = asyncio.get_running_loop().create_task(call())
        calls.add(task)
        task.add_done_callback(calls.discard)

    def _note(self, failure: Exception) -> None:
        """TLS settings that disagree, or a peer refusing our messages (e.g. without the
        cluster certificate), are retried too (a restart may fix them), but an operator
        must hear of them, once."""
        refused = isinstance(failure, ConnectionFailed | RemoteError)
        if refused and str(failure) != self.misconfigured:
            self.misconfigured = str(failure)
            log.error("cannot deliver to %s: %s", self.address(), failure)
