"""Minimal pipelined RPC over TCP: `RpcServer` and `RpcClient`, bytes in, bytes out.

Frames are `loom.wire.frames`, payloads `loom.wire.envelope`. Rules of this module:
- every task is owned: a connection's handler tasks live in its TaskGroup; the client's
  reader task is cancelled and awaited by `close()`; `CancelledError` is never swallowed;
- every network await is under a timeout; replies and requests are coalesced per event
  loop turn (one write, up to `batch_items_max` per frame);
- everything is bounded: in-flight handlers per connection (over it: an `overloaded`
  error response), in-flight calls per client (over it: `Overloaded` raised locally),
  frame size, batch size; reads pause while the peer does not drain our writes;
- a peer that breaks the protocol gets its connection closed: a byte stream cannot be
  resynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import itertools
import math
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from loom.core.errors import ConnectionFailed, InvalidArgument, LoomError, Throttled, Unavailable
from loom.runtime import tls as tls_
from loom.runtime.tls import TlsConfig
from loom.wire.envelope import (
    BATCH_ITEMS_MAX,
    ERROR_DEADLINE_EXCEEDED,
    ERROR_HANDLER_FAILED,
    ERROR_OVERLOADED,
    BadEnvelope,
    Request,
    Response,
    decode_items,
    encode_items,
)
from loom.wire.frames import FRAME_BYTES_MAX, FrameDecoder, FrameError, encode_frame

Handler = Callable[[bytes], Awaitable[bytes]]
T = TypeVar("T")
READ_BYTES = 256 * 1024
# Below this many unsent bytes, writers do not wait for the transport to drain.
WRITE_BUFFER_BYTES_LOW = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcLimits:
    frame_bytes_max: int = FRAME_BYTES_MAX
    # Items per frame when coalescing; 1 sends one request/response per frame.
    batch_items_max: int = 64
    in_flight_max: int = 1024
    # A server closes a connection idle (no call in flight) this long.
    idle_timeout_s: float = 300.0
    # Bound on connect, on a blocked write (peer not reading) and on close.
    io_timeout_s: float = 10.0
    overloaded_retry_after_ms: int = 10

    def __post_init__(self) -> None:
        assert 1 <= self.batch_items_max <= BATCH_ITEMS_MAX
        assert self.in_flight_max >= 1


DEFAULT_RPC_LIMITS = RpcLimits()


class Overloaded(Throttled):
    """Too many calls in flight on this connection; retry after `retry_after_ms`."""


class ConnectionLost(Unavailable):
    """The connection failed or closed before the reply arrived; the call may have run."""


class CallTimedOut(Unavailable):
    """No reply within the call's timeout; the handler may or may not have run."""


class RemoteError(LoomError):
    """The server's handler raised; the message names the exception."""


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is installed."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if importlib.util.find_spec("uvloop") is not None:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def _error_of(response: Response) -> LoomError:
    assert response.error is not None
    code, _, detail = response.error.partition(": ")
    if code == ERROR_OVERLOADED:
        retry_after_ms = int(detail) if detail.isdigit() else None
        return Overloaded(f"server overloaded: {detail}", retry_after_ms=retry_after_ms)
    if code == ERROR_DEADLINE_EXCEEDED:
        return CallTimedOut(f"server gave up at the call's deadline: {detail}")
    return RemoteError(response.error)


class _Outbox:
    """Items to send, coalesced into frames once per loop turn by a `call_soon` flush."""

    def __init__(self, writer: asyncio.StreamWriter, limits: RpcLimits) -> None:
        self._writer = writer
        self._limits = limits
        self._items: list[Request | Response] = []
        self._is_flush_scheduled = False

    def put(self, item: Request | Response) -> None:
        self._items.append(item)
        if not self._is_flush_scheduled:
            self._is_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._is_flush_scheduled = False
        items, self._items = self._items, []
        if self._writer.is_closing():
            return
        step = self._limits.batch_items_max
        for start in range(0, len(items), step):
            payload = encode_items(items[start : start + step])
            frame = encode_frame(payload, frame_bytes_max=self._limits.frame_bytes_max)
            self._writer.write(frame)

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        # Cheap check first: a timeout context per call costs more than the call's IO.
        if self._writer.transport.get_write_buffer_size() < WRITE_BUFFER_BYTES_LOW:
            return
        async with asyncio.timeout(self._limits.io_timeout_s):
            await self._writer.drain()


class _ServerConnection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RpcServer
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = server.handler
        self._limits = server.limits
        self._outbox = _Outbox(writer, server.limits)
        self._decoder = FrameDecoder(frame_bytes_max=server.limits.frame_bytes_max)
        self._in_flight = 0

    async def serve(self) -> None:
        try:
            async with asyncio.TaskGroup() as handlers:
                await self._read_requests(handlers)
            self._outbox.flush()
            await self._outbox.drain()
        except* (OSError, TimeoutError, FrameError, BadEnvelope):
            pass  # the peer is gone, stuck or broke the protocol: drop the connection
        finally:
            self._writer.close()

    async def _read_requests(self, handlers: asyncio.TaskGroup) -> None:
        while True:
            await self._outbox.drain()  # backpressure: stop reading while replies pile up
            try:
                async with asyncio.timeout(self._limits.idle_timeout_s):
                    data = await self._reader.read(READ_BYTES)
            except TimeoutError:
                if self._in_flight == 0:
                    return
                continue
            if not data:
                return
            for payload in self._decoder.feed(data):
                for item in decode_items(payload):
                    if not isinstance(item, Request):
                        raise BadEnvelope("a client sent a response")
                    self._admit(item, handlers)

    def _admit(self, request: Request, handlers: asyncio.TaskGroup) -> None:
        if self._in_flight >= self._limits.in_flight_max:
            retry_after_ms = self._limits.overloaded_retry_after_ms
            error = f"{ERROR_OVERLOADED}: {retry_after_ms}"
            self._outbox.put(Response(request_id=request.request_id, error=error))
            return
        self._in_flight += 1
        handlers.create_task(self._call(request))

    async def _call(self, request: Request) -> None:
        try:
            async with asyncio.timeout(request.deadline_ms / 1000):
                body = await self._handler(request.body)
            response = Response(request_id=request.request_id, body=body)
        except TimeoutError:
            error = f"{ERROR_DEADLINE_EXCEEDED}: {request.deadline_ms} ms"
            response = Response(request_id=request.request_id, error=error)
        except Exception as failure:  # noqa: BLE001 - a handler failure is the caller's answer
            error = f"{ERROR_HANDLER_FAILED}: {type(failure).__name__}: {failure}"
            response = Response(request_id=request.request_id, error=error)
        finally:
            self._in_flight -= 1
        self._outbox.put(response)


class RpcServer:
    """Serves `handler(body) -> body` on host:port (port 0: an ephemeral port, see `.port`)."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: RpcLimits = DEFAULT_RPC_LIMITS,
        tls: TlsConfig | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self._host = host
        self._port = port
        self._tls = tls
        self._server: asyncio.Server | tls_.TlsListener | None = None
        self._connections: dict[int, asyncio.Task[Any]] = {}
        self._connection_ids = itertools.count()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        assert self._server is None
        if self._tls is None:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        else:
            listener = tls_.TlsListener(self._tls, self._serve, self.limits.io_timeout_s)
            await listener.start(self._host, self._port)
            self._server = listener

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection_id = next(self._connection_ids)
        task = asyncio.current_task()
        assert task is not None
        self._connections[connection_id] = task
        try:
            await _ServerConnection(reader, writer, self).serve()
        except asyncio.CancelledError:
            # `close()` cancelled this connection and waits for it. Ending normally keeps
            # asyncio's stream callback from logging the cancelled task as an error; this
            # is the task's outermost frame, so nothing else needed the cancellation.
            return
        finally:
            del self._connections[connection_id]

    async def close(self) -> None:
        """Stop listening, cancel every connection and wait for them to end."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._connections.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.io_timeout_s)
        async with asyncio.timeout(self.limits.io_timeout_s):
            await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class RpcClient:
    """One connection; many calls pipelined on it, replies matched by request id."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: RpcLimits,
        *,
        peer: tuple[str, int] = ("?", 0),
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._limits = limits
        self._peer = peer
        self._outbox = _Outbox(writer, limits)
        self._pending: dict[int, asyncio.Future[Response]] = {}
        # Ids start at 1: a response with id 0 is a connection-level error (e.g. TLS).
        self._request_ids = itertools.count(1)
        self._closed_because: LoomError | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_responses())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        limits: RpcLimits = DEFAULT_RPC_LIMITS,
        tls: TlsConfig | None = None,
    ) -> RpcClient:
        """`ConnectionLost` if nobody answers (retryable); with `tls`, `ConnectionFailed`
        if the TLS handshake fails (the server runs without TLS, or a certificate is
        refused): trying again will not help."""
        try:
            async with asyncio.timeout(limits.io_timeout_s):
                if tls is None:
                    reader, writer = await asyncio.open_connection(host, port)
                else:
                    opening = tls_.open_connection(host, port, tls, limits.io_timeout_s)
                    reader, writer = await opening
        except (OSError, TimeoutError) as failure:
            raise ConnectionLost(f"cannot connect to {host}:{port}: {failure!r}") from None
        return cls(reader, writer, limits, peer=(host, port))

    async def call(self, body: bytes, *, timeout_s: float) -> bytes:
        """Send one request; its reply's body, or a `LoomError` within `timeout_s`."""
        (response,) = await self._call_many((body,), timeout_s)
        if response.error is not None:
            raise _error_of(response)
        return response.body

    async def call_many(self, bodies: Sequence[bytes], *, timeout_s: float) -> list[bytes]:
        """Send several requests together (they share frames); replies in the same order."""
        responses = await self._call_many(bodies, timeout_s)
        for response in responses:
            if response.error is not None:
                raise _error_of(response)
        return [response.body for response in responses]

    async def _call_many(self, bodies: Sequence[bytes], timeout_s: float) -> list[Response]:
        if self._closed_because is not None:
            raise type(self._closed_because)(str(self._closed_because))
        if len(self._pending) + len(bodies) > self._limits.in_flight_max:
            raise Overloaded(
                f"{len(self._pending)} calls in flight on this connection",
                retry_after_ms=self._limits.overloaded_retry_after_ms,
            )
        if timeout_s <= 0:
            raise InvalidArgument(f"timeout_s must be positive, not {timeout_s}")
        deadline_ms = min(math.ceil(timeout_s * 1000), 2**32 - 1)
        loop = asyncio.get_running_loop()
        futures: list[tuple[int, asyncio.Future[Response]]] = []
        for body in bodies:
            request_id = next(self._request_ids)
            future: asyncio.Future[Response] = loop.create_future()
            self._pending[request_id] = future
            futures.append((request_id, future))
            self._outbox.put(Request(request_id=request_id, deadline_ms=deadline_ms, body=body))
        try:
            async with asyncio.timeout(timeout_s):
                await self._outbox.drain()
                return [await future for _, future in futures]
        except TimeoutError:
            raise CallTimedOut(f"no reply within {timeout_s} s") from None
        except OSError as failure:
            raise ConnectionLost(f"connection failed: {failure!r}") from None
        finally:
            for request_id, future in futures:
                self._pending.pop(request_id, None)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: a sibling's failure already surfaced

    async def _read_responses(self) -> None:
        decoder = FrameDecoder(frame_bytes_max=self._limits.frame_bytes_max)
        failure: LoomError = ConnectionLost("the server closed the connection")
        try:
            # Waiting for replies has no deadline of its own: each call bounds its wait.
            while data := await self._reader.read(READ_BYTES):
                for payload in decoder.feed(data):
                    for item in decode_items(payload):
                        if not isinstance(item, Response):
                            raise BadEnvelope("a server sent a request")
                        future = self._pending.pop(item.request_id, None)
                        if future is not None and not future.done():
                            future.set_result(item)
                        elif item.request_id == 0 and item.error is not None:
                            raise tls_.connection_error(item.error)
                        # else: a late reply to a call that timed out; nothing waits for it
        except (FrameError, BadEnvelope) as error:
            failure = ConnectionLost(f"the server broke the protocol: {error}")
        except ConnectionFailed as error:
            failure = error
        except ssl.SSLError as error:
            failure = tls_.stream_error(*self._peer, error)
        except OSError as error:
            failure = ConnectionLost(f"connection failed: {error!r}")
        finally:
            if isinstance(failure, ConnectionLost) and tls_.is_refused_after_handshake(
                self._writer
            ):
                failure = tls_.certificate_refused(*self._peer)
            self._fail_all(failure)
            self._writer.close()

    def _fail_all(self, failure: LoomError) -> None:
        if self._closed_because is None:
            self._closed_because = failure
        pending = list(self._pending.values())
        self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(type(failure)(str(failure)))

    async def close(self) -> None:
        """Fail calls still waiting, close the connection and end the reader task."""
        self._fail_all(ConnectionLost("the client was closed"))
        self._writer.close()
        self._reader_task.cancel()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(self._limits.io_timeout_s):
                await asyncio.wait([self._reader_task])
                await self._writer.wait_closed()
        if self._reader_task.done() and not self._reader_task.cancelled():
            self._reader_task.result()  # a bug in the reader surfaces here, not in a log

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
