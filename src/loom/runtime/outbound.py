"""One-way delivery to one peer: a bounded queue and one owned sender task.

Used for replication messages between nodes and for the shard manager's traffic. The
protocols above re-send whatever matters (Accepts, heartbeats, announcements, reports),
so a full queue or a failed connection drops messages and counts them: nothing here
waits or grows without bound.
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
log = logging.getLogger("loom.outbound")


class Outbound:
    def __init__(
        self, address: Callable[[], tuple[str, int]], *, tls: TlsConfig | None = None
    ) -> None:
        self.address = address
        self.tls = tls
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_MAX)
        self.dropped = 0
        self.misconfigured: str | None = None  # the last refusal, logged once

    def put(self, body: bytes) -> None:
        if self.queue.full():
            self.dropped += 1
            return
        self.queue.put_nowait(body)

    async def run(self) -> None:
        """Sends until cancelled: batches what is queued, reconnects after a failure."""
        client: RpcClient | None = None
        try:
            while True:
                bodies = [await self.queue.get()]
                while not self.queue.empty() and len(bodies) < BATCH_MAX:
                    bodies.append(self.queue.get_nowait())
                try:
                    if client is None:
                        host, port = self.address()
                        client = await RpcClient.connect(host, port, tls=self.tls)
                    await client.call_many(bodies, timeout_s=CALL_TIMEOUT_S)
                except Exception as failure:  # noqa: BLE001 - any failure: drop, reconnect next time
                    # TLS settings that disagree, or a peer refusing our messages (e.g.
                    # without the cluster certificate), are retried too (a restart may
                    # fix them), but an operator must hear of them, once.
                    refused = isinstance(failure, ConnectionFailed | RemoteError)
                    if refused and str(failure) != self.misconfigured:
                        self.misconfigured = str(failure)
                        log.error("cannot deliver to %s: %s", self.address(), failure)
                    self.dropped += len(bodies)
                    if client is not None:
                        await client.close()
                    client = None
        finally:
            if client is not None:
                await client.close()
